"""Every bad input of the shared case table (tests/bad_input_cases.py), run through the real ``editing`` command.

Prints one line per case that did not end as it must, then
``N cases: C clear errors, K correct results, T tracebacks, S silently accepted`` (plus failures, unclear messages
and timeouts when there are any). A clear error: non-zero exit, no Python traceback, a message naming the
file/line/setting and the fix. A correct result (damage to survive, e.g. a damaged or unwritable cache): exit 0, no
traceback, the damage said on stderr, and results equal to those without the damage.

    python benchmarks/bad_inputs.py [--workers 2] [--mode subprocess|fork] [--only NAME ...] [--keep DIR]

``--mode subprocess`` (default) runs ``python -m editing.cli`` per case, as a user does; ``--mode fork`` runs the
same ``main()`` in children of a fork server that has the heavy modules imported (what the tests use; minutes
faster).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bad_input_cases import CASES, run_cases  # noqa: E402 - the table lives beside the tests that share it


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="cases run at once (each is a subprocess)")
    parser.add_argument("--mode", choices=("subprocess", "fork"), default="subprocess",
                        help="a fresh interpreter per case, or forked children of a preloaded server")
    parser.add_argument("--only", nargs="*", help="run only these case names")
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary folder)")
    parser.add_argument("--verbose", action="store_true", help="print every case as it finishes")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or c.name in args.only]
    if args.only and len(cases) != len(set(args.only)):
        parser.error(f"unknown case(s): {sorted(set(args.only) - {c.name for c in cases})}")

    def progress(outcome) -> None:
        if args.verbose:
            print(f"  {outcome.case.name}: {outcome.kind} ({outcome.seconds:.0f}s)", flush=True)

    start = time.time()
    if args.keep:
        outcomes = run_cases(Path(args.keep), cases, args.workers, args.mode, progress)
    else:
        with tempfile.TemporaryDirectory(prefix="bad-inputs-") as tmp:
            outcomes = run_cases(Path(tmp), cases, args.workers, args.mode, progress)
    counts = Counter(o.kind for o in outcomes)
    for outcome in outcomes:
        if outcome.kind not in ("clear", "correct"):
            depends = f" [depends on {outcome.case.depends}]" if outcome.case.depends else ""
            print(f"FAIL{depends} {outcome.summary()}")
    extra = "".join(f", {counts[k]} {label}" for k, label in (("unclear", "unclear messages"), ("timeout", "timeouts"))
                    if counts[k])
    print(f"({time.time() - start:.0f}s, {args.mode} mode, {args.workers} at a time)")
    survived = f", {counts['correct']} correct results (damage survived)" if counts["correct"] else ""
    failed = f", {counts['failed']} failed to survive" if counts["failed"] else ""
    print(f"{len(outcomes)} cases: {counts['clear']} clear errors{survived}, {counts['traceback']} tracebacks, "
          f"{counts['accepted']} silently accepted{failed}{extra}")
    return 0 if counts["clear"] == len(outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
