"""``editing data download``: the task data from the paper's public repository."""

from __future__ import annotations


def download_data(root: str | None = None, base_url: str | None = None, overwrite: bool = False) -> None:
    """Download the six tasks' files and the general sets from the paper's public repository.

    Args:
        root: destination (default: the cache folder searched by default).
        base_url: the repository's raw ``data/`` URL (a mirror or a ``file://`` folder works too).
        overwrite: replace files already there.
    """
    from editing.data.download import DEFAULT_BASE_URL, download

    download(root=root, base_url=base_url or DEFAULT_BASE_URL, overwrite=overwrite)
