#!/usr/bin/env bash
# One device call (see prepare.sh): install the carried wheels and run the `gpu`-marked tests that need no GGUF
# (tests/gpu/test_gpu.py but the SmolLM2 precision test, and tests/commands/test_fsdp.py, which skips on fewer than two GPUs).
# Extra arguments go to pytest (e.g. -k memit).
set -u
PY="${DEVICE_PY:-python3}"
C="$PWD/.gpu_carry_tests"
SITE=/tmp/site
[ -d "$C/whl" ] || { echo "tests.sh: $C is missing: run scripts/device/prepare.sh and carry .gpu_carry_tests" >&2; exit 3; }
rm -rf $SITE && mkdir -p $SITE
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE "$C"/whl/*.whl \
    || exit 4
cp -r "$C"/vendor/. $SITE/
export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1 EDITING_DATA_ROOT="$C/data"
# tests/conftest.py reads the task data from ../shared/data beside the checkout.
if [ ! -f ../shared/data/general/degradation.jsonl ]; then mkdir -p ../shared && ln -sfn "$C/data" ../shared/data; fi
"$PY" -c 'import torch; print("tests.sh: torch", torch.__version__, "on",
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device")'
"$PY" -m pytest -q -ra -m gpu tests/gpu/test_gpu.py tests/commands/test_fsdp.py -p no:cacheprovider \
    -k "not evaluation_precision" "$@"
