"""Can a bf16 evaluation resolve the 1e-5 degradation ball? Measures general NLL on G in fp32 and bf16.

Prints, for the base model and for edits of known size (random perturbations of one MLP down-projection, scaled
so the fp32 relative NLL change is around 1e-5 .. 1e-3), the relative change measured in fp32 and in bf16, and
the error of the bf16 measurement in units of the 1e-5 ball. Also prints evaluation time per precision.

    python benchmarks/precision.py [--model smollm2-135m] [--limit N]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from editing.data.datamodule import TaskDataModule
from editing.evaluation import evaluate
from editing.methods.base import EditingModule
from editing.models.loading import ModelConfig


def general_nll(module: EditingModule, dm: TaskDataModule) -> tuple[float, float]:
    start = time.time()
    summary = evaluate(module, dm, roles=["general"])
    return summary["general_nll"], time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=None, help="first N texts of G (default: all)")
    parser.add_argument("--scales", default="0.002,0.005,0.01,0.03", help="perturbation std / weight std")
    args = parser.parse_args()
    torch.manual_seed(0)
    module = EditingModule(ModelConfig(name=args.model, precision="fp32"))
    dm = TaskDataModule(task="country_capital", general_limit=args.limit)
    base32, t32 = general_nll(module, dm)
    fp32_state = copy.deepcopy(module.model.state_dict())
    module.model.to(torch.bfloat16)
    base16, t16 = general_nll(module, dm)
    tokens = dm.describe()["general"]["examples"]
    print(f"model {args.model}; G: {tokens} texts")
    print(f"fp32 general NLL {base32:.7f} ({t32:.1f}s); bf16 {base16:.7f} ({t16:.1f}s); "
          f"bf16 speed-up {t32 / t16:.2f}x")
    print(f"bf16 vs fp32 on the base model: relative difference {(base16 - base32) / base32:+.2e} "
          f"(the 1e-5 ball is a relative change of 1e-5)")
    layers = [n for n in fp32_state if n.endswith("mlp.down_proj.weight") or n.endswith("mlp.c_proj.weight")
              or n.endswith("mlp.dense_4h_to_h.weight")]
    target = layers[len(layers) // 2]
    print(f"edits: random perturbation of {target}")
    print("| perturbation | fp32 relative change | bf16 relative change | bf16 error / 1e-5 |")
    print("|---|---|---|---|")
    for scale in [float(s) for s in args.scales.split(",")]:
        state = copy.deepcopy(fp32_state)
        w = state[target]
        noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * w.std() * scale
        state[target] = w + noise
        module.model.to(torch.float32)
        module.model.load_state_dict(state)
        edit32, _ = general_nll(module, dm)
        module.model.to(torch.bfloat16)
        edit16, _ = general_nll(module, dm)
        rel32 = edit32 / base32 - 1
        rel16 = edit16 / base16 - 1
        print(f"| {scale:g} | {rel32:+.3e} | {rel16:+.3e} | {abs(rel16 - rel32) / 1e-5:.2f} |", flush=True)


if __name__ == "__main__":
    main()
