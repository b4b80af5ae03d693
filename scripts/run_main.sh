#!/usr/bin/env bash
# The main job: LoRA-edit the embedded SmolLM2-135M on country_capital (validation pair) and print, before and
# after, the success rate and the degradation for each ball. Run folder: runs/main/fit/version_N/.
#   bash scripts/run_main.sh                              # as described (about 15-20 minutes on 2 CPU cores)
#   bash scripts/run_main.sh --trainer.max_epochs 2       # extra arguments go to `editing fit` (and win)
# The unedited model on all six tasks, one table:  .venv/bin/editing evaluate --split val
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

echo "run_main: .venv/bin/editing fit --config lightning_configs/main/lora_country_capital.yaml $*" >&2
exec .venv/bin/editing fit --config lightning_configs/main/lora_country_capital.yaml "$@"
