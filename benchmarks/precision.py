"""Can a bf16 evaluation resolve the 1e-5 degradation ball, and do issue 37's changes keep the numbers? Measures
general NLL on G with today's fp32 evaluator and other ways.

Prints, for the base model and for edits of known size (random perturbations of one MLP down-projection, scaled
so the fp32 relative NLL change is around 1e-5 .. 1e-3), the relative change measured by today's evaluator (the
machine's chosen product mode, attention in IEEE fp32, chunked log-sum-exp, no mask for right-padded batches) and
by each way, and the difference in units of the 1e-5 ball. Also prints evaluation time per way. The ways: ``bf16``
and ``fpmath-bf16`` (rounding ways), and ``before-issue-37`` (every product on the default kernels, the head's
log-sum-exp over whole blocks, the padding mask passed, attention under the mode: the evaluator before issue 37,
against which each adopted change must stay below a tenth of the ball).

    python benchmarks/precision.py [--model smollm2-135m] [--limit N] [--ways bf16,fpmath-bf16,before-issue-37]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

import editing.evaluation.evaluator as evaluator
from editing.data.datamodule import TaskDataModule
from editing.evaluation import backend, evaluate, products
from editing.methods.base import EditingModule
from editing.models.loading import ModelConfig


def general_nll(module: EditingModule, dm: TaskDataModule) -> tuple[float, float]:
    start = time.time()
    with _before_issue_37() if _WAY[0] == "before-issue-37" else nullcontext():
        summary = evaluate(module, dm, roles=["general"])
    return summary["general_nll"], time.time() - start


def _before_issue_37():
    """The evaluator before issue 37: ``fit_time.before_issue_37`` (the default products pinned, roofline.py's
    ``overheads_back``; its LoRA branch does not apply to this benchmark's perturbed weights)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import fit_time

    return fit_time.before_issue_37()

WAYS = ("bf16", "fpmath-bf16", "before-issue-37")
"""The ways compared with fp32: ``bf16`` weights and activations (the ``bf16`` precision setting), and fp32 tensors
under oneDNN's bf16 math mode (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``: matrix products round
their inputs to bf16 on the AMX units and accumulate and return fp32; see ``benchmarks/amx_matmul.py``)."""


@contextmanager
def _evaluation_products(device="cpu"):
    # the evaluator's product mode for this benchmark: fpmath-bf16 while that way runs, else the machine's choice.
    # The evaluator sets every fp32 backend to IEEE (full_precision) and then its own mode, so a mode set outside it
    # (as this benchmark once did) never reached the products; and the evaluator refuses a rounding mode, which is
    # what this benchmark measures.
    if _WAY[0] == "fpmath-bf16":
        with backend.MODES["fpmath-bf16"]():
            yield "fpmath-bf16"
    else:
        with _CHOSEN(device) as mode:
            yield mode


_WAY = ["fp32"]
_CHOSEN = evaluator.evaluation_products


def _set_way(module: EditingModule, way: str, state: dict[str, torch.Tensor]) -> None:
    """Run ``module`` the ``way`` given, with the fp32 weights ``state`` (reloaded: a bf16 round trip loses bits)."""
    _WAY[0] = way
    module.model.to(torch.float32)
    module.model.load_state_dict(state)
    if way == "bf16":
        module.model.to(torch.bfloat16)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=None, help="first N texts of G (default: all)")
    parser.add_argument("--scales", default="0.002,0.005,0.01,0.03", help="perturbation std / weight std")
    parser.add_argument("--ways", default="bf16", help=f"comma-separated ways to compare with fp32, of {WAYS}")
    args = parser.parse_args(argv)
    ways = [w for w in args.ways.split(",") if w]
    unknown = sorted(set(ways) - set(WAYS))
    if unknown:
        parser.error(f"--ways: unknown {unknown}; choose from {', '.join(WAYS)}")
    evaluator.evaluation_products = _evaluation_products  # put back on leaving (the tests import this module)
    try:
        return _compare(args, ways)
    finally:
        evaluator.evaluation_products = _CHOSEN
        _WAY[0] = "fp32"


def _compare(args: argparse.Namespace, ways: list[str]) -> dict:
    """The comparison; returns the base NLLs and each perturbation's relative changes by way."""
    torch.manual_seed(0)
    module = EditingModule(ModelConfig(name=args.model, precision="fp32"))
    dm = TaskDataModule(task="country_capital", general_limit=args.limit)
    fp32_state = copy.deepcopy(module.model.state_dict())
    base, seconds = {}, {}
    for way in ["fp32", *ways]:
        _set_way(module, way, fp32_state)
        base[way], seconds[way] = general_nll(module, dm)
    print(f"model {args.model}; G: {dm.describe()['general']['examples']} texts; fp32 is today's evaluator (product "
          f"mode {products.chosen_mode('cpu')}, {torch.get_num_threads()} threads)")
    for way in ["fp32", *ways]:
        speed = "" if way == "fp32" else f"; {seconds['fp32'] / seconds[way]:.2f}x fp32's speed, relative " \
            f"difference {(base[way] - base['fp32']) / base['fp32']:+.2e} (the 1e-5 ball is a relative change of 1e-5)"
        print(f"{way}: general NLL {base[way]:.7f} ({seconds[way]:.1f}s){speed}")
    layers = [n for n in fp32_state if n.endswith("mlp.down_proj.weight") or n.endswith("mlp.c_proj.weight")
              or n.endswith("mlp.dense_4h_to_h.weight")]
    target = layers[len(layers) // 2]
    print(f"edits: random perturbation of {target}")
    print("| perturbation | fp32 relative change | " + " | ".join(f"{w} relative change | {w} error / 1e-5"
                                                          for w in ways) + " |")
    print("|---|---|" + "---|---|" * len(ways))
    rows = {}
    for scale in [float(s) for s in args.scales.split(",")]:
        state = copy.deepcopy(fp32_state)
        w = state[target]
        noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * w.std() * scale
        state[target] = w + noise
        rel = {}
        for way in ["fp32", *ways]:
            _set_way(module, way, state)
            edited, _ = general_nll(module, dm)
            rel[way] = edited / base[way] - 1
        cells = " | ".join(f"{rel[w]:+.3e} | {abs(rel[w] - rel['fp32']) / 1e-5:.2f}" for w in ways)
        print(f"| {scale:g} | {rel['fp32']:+.3e} | {cells} |", flush=True)
        rows[scale] = rel
    _set_way(module, "fp32", fp32_state)
    return {"base": base, "seconds": seconds, "rows": rows}


if __name__ == "__main__":
    main()
