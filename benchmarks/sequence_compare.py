"""Several methods' ``editing sequence`` runs side by side (issue 38 item 4): one markdown table and one plot.

Each sequence folder holds ``sequence.json`` (written by ``editing.protocol.sequence``). Per method and step the
table gives the first chunk's success (and its mean score), the current chunk's success, the degradation against the
original model, the epoch the step's fit kept for the ball (0: the step's own edit left the ball, so the previous
edit was kept) and whether the general NLL is inside the ball. The plot: chunk 1's success and the degradation per
step, one line per method.

    python benchmarks/sequence_compare.py rome=runs/sequence/country_capital-rome \\
        alphaedit=runs/sequence/country_capital-alphaedit --plot docs/sequence_country_capital.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def load(folder: Path) -> dict:
    """A sequence folder's ``sequence.json`` (settings and rows)."""
    return json.loads((folder / "sequence.json").read_text(encoding="utf-8"))


def table_rows(state: dict) -> list[dict]:
    """One row per step: chunk 1's success and score, the current chunk's success, the degradation (general NLL /
    the original's - 1), the kept epoch and whether the general NLL is inside the sequence's ball (strict, SPEC 6)."""
    from editing.rules.budget import inside

    eps = float(state["settings"]["ball"])
    rows = sorted(state["rows"], key=lambda r: r["step"])
    original = rows[0]["general_nll"]
    out = []
    for row in rows:
        step = row["step"]
        current = str(max(step, 1))
        out.append({"step": step, "first": row["chunks"].get("1"), "first_score": row["chunk_scores"].get("1"),
                    "current": row["chunks"].get(current), "success_rate": row["success_rate"],
                    "degradation": row["general_nll"] / original - 1.0, "epoch": row["epoch"],
                    "inside": inside(row["general_nll"], original, eps)})
    return out


def _number(value, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def markdown(methods: dict[str, list[dict]]) -> str:
    """The table of every method's rows."""
    lines = ["| method | step | chunk 1 success (score) | current chunk success | evaluation success | "
             "degradation | kept epoch | inside the ball |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in methods.items():
        for r in rows:
            epoch = "" if r["epoch"] is None else str(r["epoch"])
            lines.append(f"| {name} | {r['step']} | {_number(r['first'], '.0%')} ({_number(r['first_score'], '.3f')}) "
                         f"| {_number(r['current'], '.0%')} | {_number(r['success_rate'], '.0%')} "
                         f"| {_number(r['degradation'], '+.2e')} | {epoch} | {'yes' if r['inside'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, methods: dict[str, list[dict]], eps: float) -> None:
    """Chunk 1's success (left), its mean score (middle) and the degradation (right) per step, one line per
    method."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, rows in methods.items():
        steps = [r["step"] for r in rows]
        left.plot(steps, [r["first"] for r in rows], marker="o", label=name, alpha=0.8)
        middle.plot(steps, [r["first_score"] for r in rows], marker="o", label=name)
        right.plot(steps, [r["degradation"] for r in rows], marker="o", label=name)
    left.set_xlabel("step (0: the original model)")
    left.set_ylabel("chunk 1 success rate")
    left.set_title("first chunk: success")
    middle.set_xlabel("step (0: the original model)")
    middle.set_ylabel("chunk 1 mean score (task loss)")
    middle.set_title("first chunk: score (lower is better)")
    right.axhline(eps, color="grey", linestyle="--", linewidth=1, label=f"ball {eps:g}")
    right.set_xlabel("step (0: the original model)")
    right.set_ylabel("degradation (general NLL / original - 1)")
    right.set_title("degradation")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sequences", nargs="+", help="NAME=FOLDER of a finished (or partial) editing sequence")
    parser.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    args = parser.parse_args(argv)
    methods, eps = {}, None
    for item in args.sequences:
        name, _, folder = item.partition("=")
        if not folder or not (Path(folder) / "sequence.json").is_file():
            print(f"{item}: give NAME=FOLDER, FOLDER holding an editing sequence's sequence.json", file=sys.stderr)
            return 2
        state = load(Path(folder))
        eps = float(state["settings"]["ball"])
        methods[name] = table_rows(state)
    sys.stdout.write(markdown(methods))
    if args.plot is not None:
        plot(args.plot, methods, eps)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
