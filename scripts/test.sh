#!/usr/bin/env bash
# Run the whole test suite, slow tests (embedded SmolLM2 model) included, in the project's .venv.
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -k tokenize -x  # extra arguments go to pytest
# Exits with pytest's exit code.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/setup.sh

echo "test: .venv/bin/python -m pytest -q -ra --durations=15 tests $*" >&2
exec .venv/bin/python -m pytest -q -ra --durations=15 tests "$@"
