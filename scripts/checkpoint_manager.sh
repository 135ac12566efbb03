#!/usr/bin/env bash
# Spec entry point: checkpoint management (shim onto `llm-pipeline ckpt`).
#   bash scripts/checkpoint_manager.sh list                                  stage, step, size, validity, promotion
#   bash scripts/checkpoint_manager.sh archive checkpoints/pretrain_final    tarball + sha256 manifests
#   bash scripts/checkpoint_manager.sh cleanup pretrain 3                    keep the newest 3 (never promoted/final/in use)
#   bash scripts/checkpoint_manager.sh disk-usage                            per stage, total, free space
# also: restore ARCHIVE (back where it was archived from), verify [PATH] (checkpoints and exports);
# any `llm-pipeline ckpt VERB` flag passes through (e.g. --dry-run).
# The checkpoints folder is CKPT_ROOT (or --root), else ./checkpoints, else the newest run under runs/;
# with none at all (a fresh clone) `list` prints an empty list.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_python.sh"
if [ $# -eq 0 ]; then
  exec "$PYTHON" -m llm_pipeline ckpt --help
fi
exec "$PYTHON" -m llm_pipeline ckpt "$@"
