#!/usr/bin/env bash
# Spec entry point: resume the pipeline at STAGE and continue with the stages after it.
#   bash scripts/resume_pipeline.sh pretrain        # CONFIG=configs/demo/pipeline.yaml for the demo
# STAGE resumes from its newest committed checkpoint (an interrupted save is never used); finished
# stages before it are not re-run. Output is appended to $LOG (production_training.log) for `tail -f`.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash scripts/resume_pipeline.sh STAGE [extra llm-pipeline run flags]" >&2
  echo "  (CONFIG=${CONFIG:-configs/pipeline.yaml}; stages: see its 'stages:' list)" >&2
  exit 2
fi
stage=$1
shift
config=${CONFIG:-configs/pipeline.yaml}
log=${LOG:-production_training.log}
export PYTHONUNBUFFERED=1
{
  echo "=== $(date '+%Y-%m-%d %H:%M:%S') resume_pipeline.sh: $config from stage $stage ==="
  "$PYTHON" -m llm_pipeline run --config "$config" --from "$stage" "$@"
} 2>&1 | tee -a "$log"
exit "${PIPESTATUS[0]}"
