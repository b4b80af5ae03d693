"""Token NLL on the general set G of a distilled Backpack beside its teacher (default: SmolLM2-135M).

    python benchmarks/distilled_nll.py --backpack ~/.cache/canonical-editing/models/smollm2-135m-backpack \
        [--teacher smollm2-135m] [--general_limit 500]

Both models score the same texts with the same evaluator (fp32, the first ``general_limit`` texts of G).
"""

from __future__ import annotations

import argparse
import json
import time


def nll_on_g(name: str, limit: int | None) -> dict:
    from editing.data.datamodule import TaskDataModule
    from editing.evaluation import evaluate
    from editing.methods.base import EditingModule
    from editing.models.loading import ModelConfig

    module = EditingModule(ModelConfig(name=name))
    dm = TaskDataModule(task="country_capital", general_limit=limit)
    start = time.perf_counter()
    summary = evaluate(module, dm, roles=["general"], progress=True)
    return {"model": name, "general_nll": summary["general_nll"], "tokens": summary["counts"]["general_tokens"],
            "seconds": round(time.perf_counter() - start, 1), "parameters": module.identity["num_parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backpack", required=True, help="the distilled Backpack's model folder")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--general_limit", type=int, default=None, help="first N texts of G (default: all)")
    args = parser.parse_args()
    rows = [nll_on_g(args.teacher, args.general_limit), nll_on_g(args.backpack, args.general_limit)]
    for row in rows:
        print(json.dumps(row), flush=True)
    ratio = rows[1]["general_nll"] / rows[0]["general_nll"]
    print(f"general NLL on G ({rows[0]['tokens']} tokens): teacher {rows[0]['general_nll']:.4f}, distilled Backpack "
          f"{rows[1]['general_nll']:.4f} nats/token, ratio {ratio:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
