#!/usr/bin/env bash
# Run the whole test suite, slow tests (embedded SmolLM2 model) included, in the project's .venv.
#   bash scripts/test.sh                 # everything, one pytest worker per CPU core
#   bash scripts/test.sh -k tokenize -x  # extra arguments go to pytest
#   TEST_WORKERS=1 bash scripts/test.sh  # in one process (no pytest-xdist), e.g. to debug a failure
# Exits with pytest's exit code.
#
# Workers: TEST_WORKERS (default: the cores this process may use). Each worker gets whole test files
# (--dist loadfile), so a module's fixtures are built once, and torch threads = cores / workers (OMP_NUM_THREADS,
# unless already set): two workers of one thread each keep both cores busy through the many tests that spend their
# time in Python, imports and subprocesses, where one process of two threads leaves a core idle.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

CORES="$(.venv/bin/python -c 'import os; print(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)')"
WORKERS="${TEST_WORKERS:-$CORES}"
case "$WORKERS" in (''|*[!0-9]*|0) echo "test: error: TEST_WORKERS must be a whole number >= 1, not '$WORKERS'" >&2; exit 2;; esac
ARGS=(-q -ra --durations=30)
if [ "$WORKERS" -gt 1 ]; then
    ARGS+=(-n "$WORKERS" --dist loadfile)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( CORES / WORKERS > 0 ? CORES / WORKERS : 1 ))}"
fi

# the whole suite unless the arguments name test paths of their own (`bash scripts/test.sh tests/methods`)
TARGET=(tests)
for arg in "$@"; do
    case "$arg" in (-*) ;; (*) if [ -e "${arg%%::*}" ]; then TARGET=(); break; fi;; esac
done

echo "test: .venv/bin/python -m pytest ${ARGS[*]} ${TARGET[*]} $* (OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset})" >&2
exec .venv/bin/python -m pytest "${ARGS[@]}" "${TARGET[@]}" "$@"
