"""The package's layout at a git revision: modules per folder, lines per folder, and the longest functions.

    python benchmarks/layout.py                 # the working tree
    python benchmarks/layout.py --rev d291909   # a commit (read with git, nothing checked out)
    python benchmarks/layout.py --rev d291909 --rev HEAD --top 12

Issue 35's "before and after": the count of modules per folder of ``editing/`` (and ``callbacks/``) and the
functions longer than the limit, longest first.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _files(rev: str | None) -> dict[str, str]:
    if rev is None:
        paths = sorted(str(p.relative_to(REPO)) for root in ("editing", "callbacks")
                       for p in (REPO / root).rglob("*.py"))
        return {p: (REPO / p).read_text(encoding="utf-8") for p in paths}
    listing = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, "editing", "callbacks"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    return {p: subprocess.run(["git", "show", f"{rev}:{p}"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout for p in listing if p.endswith(".py")}


def layout(rev: str | None, top: int, limit: int) -> None:
    files = _files(rev)
    modules: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    functions = []
    for path, source in files.items():
        folder = str(Path(path).parent)
        if Path(path).name != "__init__.py":
            modules[folder] += 1
        lines[folder] += len(source.splitlines())
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{path}:{node.lineno} {node.name}"))
    print(f"## {rev or 'working tree'}: {sum(modules.values())} modules (without __init__.py) in {len(modules)} "
          f"folders")
    print("| folder | modules | lines |\n|---|---|---|")
    for folder in sorted(modules | lines):
        print(f"| {folder}/ | {modules[folder]} | {lines[folder]} |")
    long = sorted((f for f in functions if f[0] > limit), reverse=True)
    print(f"\nfunctions over {limit} lines: {len(long)}; the {top} longest:")
    for length, name in sorted(functions, reverse=True)[:top]:
        print(f"  {length:4d}  {name}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", action="append", help="git revision (repeatable); default: the working tree")
    parser.add_argument("--top", type=int, default=10, help="how many of the longest functions to list")
    parser.add_argument("--limit", type=int, default=60, help="the length above which a function is counted")
    args = parser.parse_args()
    for rev in args.rev or [None]:
        layout(rev, args.top, args.limit)


if __name__ == "__main__":
    main()
