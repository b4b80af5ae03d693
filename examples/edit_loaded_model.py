"""Edit the model you hold: load it with transformers, teach it two facts of your own in one session, ship the
merged model, and load that with plain transformers.

Notebook-style: each ``# %%`` cell runs on its own in Jupyter or VS Code. From the command line:

    .venv/bin/python examples/edit_loaded_model.py                      # SmolLM2-135M (embedded GGUF): ~9 min*
    .venv/bin/python examples/edit_loaded_model.py --model tiny-llama   # a random tiny model: seconds, for a check

The degradation is measured on the first ``--general_limit`` texts of the general set G (40 by default: a small
sample, for speed; the paper's protocol uses all 2,007). *8 min 34 s wall, reading the GGUF file included, on 2 CPU
cores shared with other jobs (load average about 6).
"""

# %% settings
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m (the embedded GGUF) or tiny-llama")
parser.add_argument("--out", default="runs/edit_loaded_model", help="folder of the runs and the exported model")
parser.add_argument("--data_root", default=None, help="task data folder (default: searched)")
parser.add_argument("--general_limit", type=int, default=None, help="texts of G measured (default 40; tiny: 6)")
parser.add_argument("--epochs", type=int, default=None, help="epochs per edit (default 3; tiny: 2)")
args = parser.parse_args(None if "ipykernel" not in sys.modules else [])
tiny = args.model != "smollm2-135m"
out = Path(args.out)

# %% 1. load the model with transformers, as you would anyway
if tiny:  # a tiny random model exists only in memory: write it as a model folder first, then load that folder
    from editing.models.loading import load_model

    built = load_model(name=args.model)
    folder = out / "base"
    built.model.save_pretrained(str(folder))
    built.tokenizer.save_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
else:  # SmolLM2-135M-Instruct ships inside the package as a GGUF file; transformers dequantizes it to fp32
    from editing.models.tokenizers import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
model.eval()

PROMPTS = ["The capital of Zorbia is", "The river through Plimsk is the", "The capital of France is"]


def continuations(lm) -> list[str]:
    """Greedy continuation of each prompt (8 new tokens)."""
    texts = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            new = lm.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        texts.append(tokenizer.decode(new[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return texts


before = continuations(model)

# %% 2. two facts of your own, each edited into the model you hold
from editing import edit  # noqa: E402

FACTS = {
    "zorbia": ([{"prefix": "The capital of Zorbia is", "suffix": " Quentaville"},
                {"prefix": "Zorbia's capital city is called", "suffix": " Quentaville"},
                {"prefix": "The seat of Zorbia's government is", "suffix": " Quentaville"}],
               [{"prefix": "Tourists visiting Zorbia fly into its capital,", "suffix": " Quentaville"}]),
    "plimsk": ([{"prefix": "The river through Plimsk is the", "suffix": " Varun"},
                {"prefix": "In Plimsk the main river is the", "suffix": " Varun"},
                {"prefix": "Plimsk was built on the banks of the", "suffix": " Varun"}],
               [{"prefix": "Boats in Plimsk sail on the river", "suffix": " Varun"}]),
}
settings = {"data.general_limit": args.general_limit or (6 if tiny else 40),
            "trainer.accumulate_grad_batches": 1,  # three examples: an optimizer step per example
            "model.init_args.optimizer.lr": 0.05 if tiny else 0.005,
            "model.init_args.regularization.weight": 1.0, "model.init_args.lora.layer_fraction": 0.9,
            "trainer.enable_progress_bar": False, "trainer.enable_model_summary": False}
results = {}
for name, (examples, evaluation) in FACTS.items():
    # inplace=True: the edit is merged into `model` itself, so the second fact is edited on top of the first
    results[name] = edit(model=model, tokenizer=tokenizer, examples=examples, evaluation=evaluation, name=name,
                         method="lora", ball=1e-3, epochs=args.epochs or (2 if tiny else 3), settings=settings,
                         inplace=True, output_dir=out / name, overwrite=True, data_root=args.data_root)
    chosen = results[name].result
    print(f"edit {name}: epoch {chosen.epoch} of the 1e-3 ball, success {chosen.metrics.success_rate:.2f} "
          f"(was {results[name].run.initial.metrics.success_rate:.2f}), degradation {chosen.metrics.degradation:.2e} "
          f"on {settings['data.general_limit']} texts of G; model carries it: {results[name].model is model}")

# %% 3. ship it: the last edit merged into its base (which carries the first), as a plain transformers folder
shipped = results["plimsk"].export(out / "merged", overwrite=True)
reloaded = AutoModelForCausalLM.from_pretrained(str(shipped))  # plain transformers, no canonical-editing needed
reloaded.eval()
ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
with torch.no_grad():
    gap = (reloaded(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
print(f"reloaded with plain transformers from {shipped}: max |logit difference| to the edited model in memory "
      f"{gap:.1e}")

# %% 4. before and after
for prompt, old, new in zip(PROMPTS, before, continuations(reloaded), strict=True):
    print(f"{prompt!r}\n  before: {old!r}\n  after:  {new!r}")
