"""How long ``editing --help`` and each command's ``--help`` take, and whether ``editing --help`` imports torch.

Each is a fresh ``python -m editing.cli`` process (imports included), the median of ``--repeats`` runs:

    python benchmarks/cli_help.py                 # editing --help only
    python benchmarks/cli_help.py --all           # also every command's --help
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parents[1]


def seconds(args: list[str], repeats: int) -> float:
    """Median wall time of ``python -m editing.cli ARGS`` (a failed run is an error)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "editing.cli", *args], check=True, env=env, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--all", action="store_true", help="also time every command's --help")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_DIR))
    from editing.cli import COMMANDS

    code = "import sys; from editing.cli import main; main(['--help']); print('torch' in sys.modules)"
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=REPO_DIR).stdout.strip().splitlines()[-1]
    print(f"editing --help: {seconds(['--help'], args.repeats):.2f} s (median of {args.repeats}); "
          f"torch imported: {imported}")
    if args.all:
        for name in COMMANDS:
            print(f"editing {name} --help: {seconds([*name.split(), '--help'], max(1, args.repeats // 5)):.2f} s")


if __name__ == "__main__":
    main()
