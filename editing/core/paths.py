"""Where things live on disk: the checkout's shipped configs, the data root and the cache folder."""

from __future__ import annotations

import os
from pathlib import Path

from editing.core.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # editing/, this file being editing/core/paths.py
REPO_DIR = PACKAGE_DIR.parent
CONFIGS_DIR = REPO_DIR / "lightning_configs"
FIT_DIR = CONFIGS_DIR / "fit"
"""The shipped ``editing fit`` config of each method (``<method>.yaml``): the base of its sweeps, auto and the API."""
SPACE_DIR = CONFIGS_DIR / "sweeps"
"""The shipped search space of each method (``<method>.yaml``), read by ``editing sweep``."""
EVALUATION_CACHE_ENV = "EDITING_EVAL_CACHE_DIR"


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
