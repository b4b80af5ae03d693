#!/usr/bin/env bash
# Device call 1 of 2 (see prepare.sh): keep the GGUF's first part and the tokenizer files in /tmp/gc for call 2 on
# the same warm machine, and print what the machine has.
set -u
mkdir -p /tmp/gc && cp -r .gpu_carry1/part1 .gpu_carry1/vendor /tmp/gc/ && ls -la /tmp/gc
nvidia-smi -L || true
python3 -c 'import sys, torch, lightning, transformers; print("python", sys.version.split()[0], "torch",
  torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), "lightning", lightning.__version__,
  "transformers (image)", transformers.__version__)'
echo "stash: done; make call 2 now (the machine is given back 30 s after a call)"
