"""Token NLL on the general set G of a distilled Backpack beside its teacher (default: SmolLM2-135M).

    python benchmarks/distilled_nll.py --backpack ~/.cache/canonical-editing/models/smollm2-135m-backpack \
        [--teacher smollm2-135m] [--general_limit 500] [--without_r_duplicates]

Both models score the same texts with the same evaluator (fp32, the first ``general_limit`` texts of G).
``--without_r_duplicates`` leaves out the texts among them that are also texts of R (web boilerplate: 2 of the first
300), for a Backpack distilled on a corpus that includes R.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def g_without_r_duplicates(limit: int | None, folder: Path) -> tuple[str, int]:
    """A data root in ``folder`` whose G is the first ``limit`` texts of G less those that are also texts of R.

    Returns:
        The data root, and how many texts were left out.
    """
    from editing.core.paths import resolve_data_root
    from editing.data.corpus import read_texts

    general = resolve_data_root(None) / "general"
    r_texts = set(read_texts(general / "regularization.jsonl"))
    texts = read_texts(general / "degradation.jsonl")[:limit]
    kept = [t for t in texts if t not in r_texts]
    (folder / "general").mkdir(parents=True, exist_ok=True)
    (folder / "general" / "degradation.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in kept))
    (folder / "general" / "regularization.jsonl").symlink_to(general / "regularization.jsonl")
    return str(folder), len(texts) - len(kept)


def nll_on_g(name: str, limit: int | None, data_root: str | None = None) -> dict:
    from editing.data.datamodule import TaskDataModule
    from editing.evaluation import evaluate
    from editing.methods.base import EditingModule
    from editing.models.loading import ModelConfig

    module = EditingModule(ModelConfig(name=name))
    dm = TaskDataModule(task="country_capital", general_limit=limit, data_root=data_root)
    start = time.perf_counter()
    summary = evaluate(module, dm, roles=["general"], progress=True)
    return {"model": name, "general_nll": summary["general_nll"], "tokens": summary["counts"]["general_tokens"],
            "seconds": round(time.perf_counter() - start, 1), "parameters": module.identity["num_parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backpack", required=True, help="the distilled Backpack's model folder")
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--general_limit", type=int, default=None, help="first N texts of G (default: all)")
    parser.add_argument("--without_r_duplicates", action="store_true",
                        help="leave out the texts of G that are also texts of R")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = None
        if args.without_r_duplicates:
            root, dropped = g_without_r_duplicates(args.general_limit, Path(tmp))
            print(f"left out {dropped} texts of G that are also texts of R", flush=True)
        rows = [nll_on_g(name, args.general_limit, root) for name in (args.teacher, args.backpack)]
    for row in rows:
        print(json.dumps(row), flush=True)
    ratio = rows[1]["general_nll"] / rows[0]["general_nll"]
    print(f"general NLL on G ({rows[0]['tokens']} tokens): teacher {rows[0]['general_nll']:.4f}, distilled Backpack "
          f"{rows[1]['general_nll']:.4f} nats/token, ratio {ratio:.2f} (target <= 1.3)")


if __name__ == "__main__":
    main()
