#!/usr/bin/env bash
# Spec entry point: the production run. Pre-flight first (stops on any blocker), then the whole pipeline
# (`llm-pipeline run --config configs/pipeline.yaml`), everything appended to production_training.log:
#   bash START_PRODUCTION_TRAINING.sh            # then, in another terminal:
#   tail -f production_training.log              # progress;  watch -n 2 nvidia-smi;  tensorboard --logdir runs/7b/logs
# CONFIG=... picks another pipeline config, LOG=... another log file; extra arguments go to `llm-pipeline run`
# (e.g. --from sft). SKIP_PREFLIGHT=1 starts despite blockers (you were warned). Exit codes: those of
# `llm-pipeline run` (3 = a promotion gate blocked, 75 = a stage was stopped: run this again to resume).
set -uo pipefail
cd "$(dirname "$0")"
source scripts/_python.sh
config=${CONFIG:-configs/pipeline.yaml}
log=${LOG:-production_training.log}
export PYTHONUNBUFFERED=1  # lines reach the log as they are printed
{
  echo "=== $(date '+%Y-%m-%d %H:%M:%S') START_PRODUCTION_TRAINING: $config (pid $$, $("$PYTHON" --version 2>&1)) ==="
  if [ "${SKIP_PREFLIGHT:-0}" = "1" ]; then
    echo "SKIP_PREFLIGHT=1: starting without the pre-flight checks"
  else
    "$PYTHON" -m llm_pipeline preflight --config "$config"
    code=$?
    if [ "$code" -ne 0 ]; then
      echo "pre-flight failed (exit $code): not starting. Fix the blockers above (or SKIP_PREFLIGHT=1)."
      exit "$code"
    fi
  fi
  "$PYTHON" -m llm_pipeline run --config "$config" "$@"
  code=$?
  echo "=== $(date '+%Y-%m-%d %H:%M:%S') llm-pipeline run exited $code ==="
  exit "$code"
} 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
