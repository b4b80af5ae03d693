"""Where things live on disk: the shipped configs (a checkout's or an installed wheel's), the data root and the cache
folder."""

from __future__ import annotations

import os
from pathlib import Path

from editing.core.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # editing/, this file being editing/core/paths.py
REPO_DIR = PACKAGE_DIR.parent
CONFIGS_NAME = "lightning_configs"
"""The shipped configs' folder: top level in the checkout; inside the package in a wheel (setup.py maps it there)."""


def config_folders(package_dir: Path | None = None) -> list[Path]:
    """Where the shipped configs may be, in the order looked: the checkout's top-level ``lightning_configs/`` beside
    the package, then the copy a wheel installs inside the package (``editing/lightning_configs/``)."""
    package_dir = PACKAGE_DIR if package_dir is None else package_dir
    return [package_dir.parent / CONFIGS_NAME, package_dir / CONFIGS_NAME]


def configs_dir(package_dir: Path | None = None) -> Path:
    """The folder of the shipped configs (``fit/``, ``sweeps/``, ``tasks/``, ``tiny/``, ...), for a checkout and an
    installed wheel alike: the one function every reader of them goes through.

    Args:
        package_dir: the ``editing`` package's folder (default: this one; tests pass another).

    Raises:
        ConfigError: neither place holds it (an install without its data files), naming both places and the fix.
    """
    for folder in config_folders(package_dir):
        if (folder / "fit").is_dir():
            return folder
    raise ConfigError(
        f"the shipped configs ({CONFIGS_NAME}/) are missing: looked in "
        + " and ".join(str(p) for p in config_folders(package_dir))
        + "; reinstall the package from its wheel (`pip install --force-reinstall canonical_editing-*.whl`) or run "
        "from a checkout of the repository")


def _configs_or_checkout() -> Path:
    # import time must not fail (``editing --help`` and tests import this module); a missing folder is reported
    # by the reader that needs a file from it (each names the path it looked for)
    try:
        return configs_dir()
    except ConfigError:
        return config_folders()[0]


CONFIGS_DIR = _configs_or_checkout()
FIT_DIR = CONFIGS_DIR / "fit"
"""The shipped ``editing fit`` config of each method (``<method>.yaml``): the base of its sweeps, auto and the API."""
SPACE_DIR = CONFIGS_DIR / "sweeps"
"""The shipped search space of each method (``<method>.yaml``), read by ``editing sweep``."""
EVALUATION_CACHE_ENV = "EDITING_EVAL_CACHE_DIR"


def shipped_config_path(path: str) -> str:
    """A ``--config`` path as given, or, when no such file is here and it names a shipped config the way the README
    writes them (``lightning_configs/fit/lora.yaml``), that file in the shipped configs: so the documented commands
    work from any folder with an installed wheel. A file of that name in the current folder always wins."""
    given = Path(path)
    if given.exists() or given.is_absolute() or len(given.parts) < 2 or given.parts[0] != CONFIGS_NAME:
        return path
    try:
        shipped = configs_dir().joinpath(*given.parts[1:])
    except ConfigError:
        return path
    return str(shipped) if shipped.is_file() else path


def cache_dir() -> Path:
    """Root of the project's cache (``$EDITING_CACHE``, else ``~/.cache/canonical-editing``)."""
    root = os.environ.get("EDITING_CACHE") or Path.home() / ".cache" / "canonical-editing"
    return Path(root)


def evaluation_cache_dir() -> Path:
    """Folder of the evaluation caches: ``$EDITING_EVAL_CACHE_DIR``, else ``<cache>/evaluation``."""
    return Path(os.environ.get(EVALUATION_CACHE_ENV) or cache_dir() / "evaluation")


def _has_tasks(path: Path) -> bool:
    return (path / "general" / "degradation.jsonl").is_file()


def candidate_data_roots() -> list[Path]:
    """Data roots tried in order when none is set: ``$EDITING_DATA_ROOT``, ``../shared/data`` beside the checkout
    or the working directory, and the cache folder that ``editing data download`` fills."""
    roots = []
    if os.environ.get("EDITING_DATA_ROOT"):
        roots.append(Path(os.environ["EDITING_DATA_ROOT"]))
    roots += [REPO_DIR.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", cache_dir() / "data"]
    return roots


def resolve_data_root(data_root: str | Path | None = None) -> Path:
    """The data root to use.

    Args:
        data_root: an explicit folder (used as is), or None to search ``candidate_data_roots``.

    Returns:
        The folder holding ``<task>/split/*.jsonl`` and ``general/*.jsonl``.
    """
    if data_root is not None:
        path = Path(data_root).expanduser()
        if not _has_tasks(path):
            raise ConfigError(
                f"data_root={str(path)!r} does not hold the task data (no general/degradation.jsonl); "
                "point it at the data folder or run `editing data download --root <folder>`"
            )
        return path
    for path in candidate_data_roots():
        if _has_tasks(path):
            return path
    raise ConfigError(
        "no data root found (looked in: " + ", ".join(str(p) for p in candidate_data_roots())
        + "); set data_root, set $EDITING_DATA_ROOT, or run `editing data download`"
    )
