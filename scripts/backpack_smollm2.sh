#!/usr/bin/env bash
# A Backpack distilled from the embedded SmolLM2-135M, on a fresh machine (issue 15): fill the teacher cache, distil
# from it (the model folder is written at the end), then compare the Backpack's NLL on the first 300 texts of G with
# SmolLM2's. Each stage prints its time.
#   bash scripts/backpack_smollm2.sh                                   # the config below (about 1.5-2 hours)
#   BACKPACK_CONFIG=lightning_configs/distill/tiny.yaml BACKPACK_TEACHER=tiny-llama bash scripts/backpack_smollm2.sh
# Extra arguments go to both `editing backpack cache-teacher` and `editing backpack distill` (and win), e.g.
# --trainer.max_time 00:00:30:00 or --data.max_tokens 1000000.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh

CONFIG="${BACKPACK_CONFIG:-lightning_configs/distill/smollm2_backpack_cached.yaml}"
TEACHER="${BACKPACK_TEACHER:-smollm2-135m}"
OUT="${BACKPACK_OUT:-$HOME/.cache/canonical-editing/models/smollm2-135m-backpack-cached}"

stage() {
    local name="$1"
    shift
    local start=$SECONDS
    echo "backpack_smollm2: stage $name: $*" >&2
    "$@"
    echo "backpack_smollm2: stage $name took $((SECONDS - start)) s" >&2
}

stage cache .venv/bin/editing backpack cache-teacher --config "$CONFIG" --model.teacher_cache.enabled true "$@"
stage distill .venv/bin/editing backpack distill --config "$CONFIG" --model.teacher_cache.enabled true \
    --model.output "$OUT" --model.overwrite true "$@"
stage nll .venv/bin/python benchmarks/distilled_nll.py --backpack "$OUT" --teacher "$TEACHER" --general_limit 300
