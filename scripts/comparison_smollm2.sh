#!/usr/bin/env bash
# The paper's central comparison on the embedded SmolLM2-135M and the Backpack distilled from it (issue 15): per task,
# a small random search on the validation pair and test runs over seeds for LoRA and full finetuning of SmolLM2 and
# sense finetuning of the Backpack, then the ensemble (SmolLM2 plus each test seed's sense edit, beta searched per
# ball on the test pair), then one report: a SmolLM2 table (full, LoRA, ensemble) and a Backpack table (senses).
#   bash scripts/backpack_smollm2.sh      # first, once: the distilled Backpack (about 1.5 hours)
#   bash scripts/comparison_smollm2.sh    # the three tasks on a 2-core CPU (measured): country_capital about 85
#                                         # minutes, pronoun_gender_bias 45, verb_conjugation (240 canonical
#                                         # examples) about 4 hours
#   TASKS=country_capital TRIALS=2 SEEDS=3 bash scripts/comparison_smollm2.sh
#   METHODS="rome alphaedit grace" TRIALS=6 COMPARE_OUT=runs/comparison_new bash scripts/comparison_smollm2.sh
#                                         # the field's newer methods on SmolLM2 (issue 38; no epochs of training)
#   METHODS=senses BACKPACK=<another Backpack> COMPARE_OUT=runs/comparison_b2 bash scripts/comparison_smollm2.sh
#                                         # only the Backpack's rows (senses, then the ensemble on its edits), e.g.
#                                         # for a newly distilled Backpack; LoRA and full finetuning need no Backpack
# The evaluation is reduced so that a 2-core CPU can run it (COMPARE_ARGS: 50 examples per set, 100 general texts,
# 3 epochs); the paper's protocol is 25 trials, 10 seeds, every example and all of G. Outputs under
# runs/comparison/ (sweeps/, report/). A rerun resumes: finished trials, test runs and ensembles are kept.
set -euo pipefail
shopt -s nullglob  # a senses study without test seeds gives the ensemble loop nothing, not its literal pattern

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-2}"

TASKS="${TASKS:-country_capital verb_conjugation pronoun_gender_bias}"
METHODS="${METHODS:-lora full senses}"
TRIALS="${TRIALS:-3}"
SEEDS="${SEEDS:-3}"
LARGE="${LARGE:-smollm2-135m}"
BACKPACK="${BACKPACK:-$HOME/.cache/canonical-editing/models/smollm2-135m-backpack-cached}"
OUT="${COMPARE_OUT:-runs/comparison}"
EVAL_LIMIT="${EVAL_LIMIT:-50}"
GENERAL_LIMIT="${GENERAL_LIMIT:-100}"
ARGS="${COMPARE_ARGS:---data.eval_limit $EVAL_LIMIT --data.general_limit $GENERAL_LIMIT --trainer.max_epochs 3}"
EDITING=.venv/bin/editing

wants_senses=false
n_methods=0
for method in $METHODS; do
    case "$method" in
        lora | full | memit | rome | alphaedit | grace) ;;
        senses) wants_senses=true ;;
        *)
            echo "comparison_smollm2: METHODS names '$method'; use some of: lora full memit rome alphaedit grace" \
                 "senses (the ensemble runs with senses)" >&2
            exit 2
            ;;
    esac
    n_methods=$((n_methods + 1))
done
[ "$n_methods" -gt 0 ] || { echo "comparison_smollm2: METHODS is empty; use some of: lora full memit rome alphaedit" \
    "grace senses" >&2; exit 2; }

if $wants_senses && [ ! -f "$BACKPACK/config.json" ]; then
    echo "comparison_smollm2: no distilled Backpack at $BACKPACK; run scripts/backpack_smollm2.sh first (or set" \
         "BACKPACK to a Backpack folder distilled from $LARGE)" >&2
    exit 2
fi
bash scripts/setup.sh

stage() {
    local start=$SECONDS
    echo "comparison_smollm2: $*" >&2
    "$@"
    echo "comparison_smollm2: took $((SECONDS - start)) s" >&2
}

for task in $TASKS; do
    for method in $METHODS; do
        model="$LARGE"
        [ "$method" = senses ] && model="$BACKPACK"
        study="$task-$method"
        stage $EDITING sweep --task "$task" --method "$method" --model "$model" --n_trials "$TRIALS" \
            --root "$OUT/sweeps" --study_name "$study" --args="$ARGS"
        stage $EDITING select --study_name "$study" --root "$OUT/sweeps"
        stage $EDITING test-runs --study_name "$study" --root "$OUT/sweeps" --seeds "$SEEDS"
    done
    $wants_senses || continue
    # the ensemble on each test seed of every senses trial that some ball selected (the report reads, per ball,
    # the seeds of that ball's trial)
    for seed_dir in "$OUT/sweeps/$task-senses"/test/trial_*/seed_*; do
        [ -f "$seed_dir/ensemble/results.json" ] && continue
        stage $EDITING ensemble --large "$LARGE" --backpack_edits "$seed_dir" --task "$task" --split test \
            --eval_limit "$EVAL_LIMIT" --general_limit "$GENERAL_LIMIT" --output_dir "$seed_dir/ensemble"
    done
done
stage $EDITING report --root "$OUT/sweeps" --output_dir "$OUT/report" --overwrite true
