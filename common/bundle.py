"""The digest of an app bundle (FAB): what a site pins to run only code it trusts.

One number for one app, computed the same way from the ``.fab`` file the coordinator submits
(:func:`fab_digest`, by ``python -m deploy.bundle``) and from the bundle as a site's ClientApp
runs it (:func:`tree_digest` of the installed app folder): SHA-256 over the sorted list of
``<relative path> <sha256 of the file>`` lines of every file of the bundle, Flower's own
``.info/`` folder and Python byte-code caches left out. Stdlib only.
"""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Iterable

DIGEST_PREFIX = "sha256:"


def _skipped(relative: str) -> bool:
    parts = relative.split("/")
    return parts[0] == ".info" or "__pycache__" in parts or relative.endswith((".pyc", ".pyo"))


def digest_of(files: Iterable[tuple[str, bytes]]) -> str:
    lines = sorted(f"{name} {hashlib.sha256(data).hexdigest()}" for name, data in files if not _skipped(name))
    return DIGEST_PREFIX + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def tree_digest(root: Path) -> str:
    """The digest of the bundle installed in ``root`` (a ClientApp's app folder)."""
    root = Path(root)
    return digest_of((p.relative_to(root).as_posix(), p.read_bytes()) for p in root.rglob("*") if p.is_file())


def fab_digest(fab: bytes | Path) -> str:
    """The digest of a ``.fab`` file (a zip archive), equal to :func:`tree_digest` once installed."""
    import io

    data = fab if isinstance(fab, bytes) else Path(fab).read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return digest_of((i.filename, archive.read(i)) for i in archive.infolist() if not i.is_dir())
