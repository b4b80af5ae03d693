#!/usr/bin/env bash
# The protocol end to end on the embedded SmolLM2-135M, small enough for a shared 2-core CPU (about 1.5 hours):
# a 4-trial LoRA sweep on country_capital with a quick evaluation (50 examples, 100 general texts, 3 epochs),
# selection, test runs with 2 seeds, and the report. Outputs under runs/protocol/ (sweeps/ and report/).
#   bash scripts/protocol_smollm2.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
OUT=runs/protocol
STUDY=country_capital-smollm2-135m-lora
ARGS="--data.eval_limit 50 --data.general_limit 100 --trainer.max_epochs 3"

python -m editing.cli sweep --task country_capital --method lora --model smollm2-135m --n_trials 4 \
    --root "$OUT/sweeps" --args="$ARGS"
python -m editing.cli sweep-status --study_name "$STUDY" --root "$OUT/sweeps"
python -m editing.cli select --study_name "$STUDY" --root "$OUT/sweeps"
python -m editing.cli test-runs --study_name "$STUDY" --root "$OUT/sweeps" --seeds 2
python -m editing.cli report --root "$OUT/sweeps" --output_dir "$OUT/report"
