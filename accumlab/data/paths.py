"""Where accumlab finds its shipped data and where it writes built caches.

- ``data_dir()``: ``$ACCUMLAB_DATA`` if set, else the repository's ``data/`` folder.
- ``cache_dir()``: ``$ACCUMLAB_CACHE`` if set, else ``data_dir()/"cache"`` (git-ignored).
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "ACCUMLAB_DATA"
CACHE_ENV = "ACCUMLAB_CACHE"


def data_dir() -> Path:
    """Return the folder holding the shipped data (tokenizer, datasheets, checkpoint)."""
    env = os.environ.get(DATA_ENV)
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[2] / "data"
    if not path.is_dir():
        where = f"${DATA_ENV}={env!r}" if env else f"the repository folder {path}"
        raise FileNotFoundError(
            f"accumlab data folder not found ({where}). The data ships with the git "
            "repository, not with the package: clone the repository and install it with "
            f"`pip install -e .`, or set {DATA_ENV} to a copy of its data/ folder."
        )
    return path


def cache_dir() -> Path:
    """Return (creating it) the folder for caches built at first use, e.g. the corpus."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else data_dir() / "cache"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OSError(
            f"cannot create the accumlab cache folder {path} ({exc}); "
            f"set {CACHE_ENV} to a writable folder."
        ) from exc
    return path
