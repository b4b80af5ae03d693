#!/usr/bin/env bash
# Evaluate the embedded default model (smollm2-135m) on all six tasks, split val, and print one table.
# Results go to runs/main/<timestamp>/<task>-val/ and runs/main/<timestamp>/table-val.md.
#   bash scripts/run_main.sh                       # as described
#   bash scripts/run_main.sh --precision fp32      # extra arguments go to `editing evaluate` (and win)
#   bash scripts/run_main.sh --eval_limit 20 --general_limit 100   # a quick look
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

OUT="runs/main/$(date +%Y%m%d-%H%M%S)"
echo "run_main: .venv/bin/editing evaluate --split val --output_dir $OUT $*" >&2
exec .venv/bin/editing evaluate --split val --output_dir "$OUT" "$@"
