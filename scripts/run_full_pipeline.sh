#!/usr/bin/env bash
# Spec entry point: prepare data and run every configured stage (shim onto `llm-pipeline run`).
# Usage: bash scripts/run_full_pipeline.sh [CONFIG] [llm-pipeline run flags]
#   CONFIG defaults to configs/pipeline.yaml (the offline demo: configs/demo/pipeline.yaml);
#   flags such as --run-dir, --only STEP, --from STEP pass through; --help shows them all.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh
config=configs/pipeline.yaml
case "${1:-}" in
  -h|--help)
    echo "usage: bash scripts/run_full_pipeline.sh [CONFIG] [llm-pipeline run flags]"
    echo "  CONFIG: pipeline YAML (default $config; the offline demo: configs/demo/pipeline.yaml)"
    echo "  the flags are those of \`llm-pipeline run\`:"
    echo
    exec "$PYTHON" -m llm_pipeline run --help
    ;;
  "" | -*) ;;          # no config named: the default, flags pass through
  *) config=$1; shift ;;
esac
exec "$PYTHON" -m llm_pipeline run --config "$config" "$@"
