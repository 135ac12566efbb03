#!/usr/bin/env bash
# Spec entry point: prepare data and run every configured stage (shim onto `llm-pipeline run`).
# Usage: bash scripts/run_full_pipeline.sh [configs/pipeline.yaml] [extra llm-pipeline run flags]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh
config=${1:-configs/pipeline.yaml}
shift || true
exec "$PYTHON" -m llm_pipeline run --config "$config" "$@"
