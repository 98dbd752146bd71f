"""The app bundle (FAB) that ``flwr run`` ships to every site: its size, files and digest.

``python -m deploy.bundle [APP_DIR | FILE.fab] [--list | --digest] [--out FILE]`` builds the bundle exactly as
``flwr run APP_DIR`` does (Flower's own ``build_fab_from_disk``: ``.gitignore`` plus the
``fab-include`` / ``fab-exclude`` lists of ``[tool.flwr.app]`` in pyproject.toml), or reads a
``.fab`` file, and prints its size and its digest (:func:`deploy.supernode.fab_digest`). A site
pins that digest with ``fedpagkd-supernode --app-digest sha256:...`` (``FEDPAGKD_APP_DIGEST``);
the site's SuperNode then refuses any other bundle before Flower installs it (deploy/README.md,
"Trusted code only").
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script or with -m from anywhere

from deploy.supernode import fab_digest  # noqa: E402  (stdlib only)


def build(app_dir: Path) -> bytes:
    """The bundle ``flwr run app_dir`` submits (or the bytes of ``app_dir`` when it is a .fab file)."""
    if Path(app_dir).is_file():
        return Path(app_dir).read_bytes()
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app_dir))


def summary(fab: bytes) -> dict:
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        files = sorted(i.filename for i in archive.infolist() if not i.is_dir())
    top = sorted({f.split("/")[0] for f in files})
    return {"bytes": len(fab), "files": len(files), "top-level": top, "digest": fab_digest(fab), "list": files}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "app_dir", nargs="?", type=Path, default=REPO, help="an app folder (default: this checkout) or a .fab file"
    )
    parser.add_argument("--list", action="store_true", help="print every file of the bundle")
    parser.add_argument("--out", type=Path, help="also write the .fab here")
    parser.add_argument("--digest", action="store_true", help="print only the digest (FEDPAGKD_APP_DIGEST=$(... --digest))")
    args = parser.parse_args(argv)
    fab = build(args.app_dir)
    info = summary(fab)
    if args.out:
        args.out.write_bytes(fab)
    if args.digest:
        print(info["digest"])
        return 0
    if not args.list:
        info.pop("list")
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
