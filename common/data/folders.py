"""Real sites: an ImageFolder tree or a CSV manifest, decoded with PIL.

* :class:`FolderSiteDataset`: one split of a real site; item ``(image, label)`` as the
  synthetic dataset's (float [3, S, S] in [0, 1], or ``transform(PIL.Image)``). Layout
  ``<root>/{train,val,test}/<class>/*.{png,jpg,jpeg}`` or ``<root>/manifest.csv``
  (``path,label,split``), with an optional ``<root>/site.json`` declaring the modality. All
  structural problems raise :class:`~common.data.base.DataError` eagerly, naming the file or
  folder and the fix; unreadable images when touched (or by :meth:`FolderSiteDataset.verify`).
* :func:`load_image` / :func:`to_rgb`: any PIL mode a medical export produces -> 8-bit RGB.
* :func:`discover_class_names`, :func:`class_names_source`, :func:`has_split`: what a site's
  folders say before a dataset is built; :func:`write_site_json` writes ``site.json``.
* :func:`read_manifest`: the one reader of ``manifest.csv`` (discovery and the loader share it).

Images are decoded with PIL: ``torchvision.io`` has no kernels on the CPU build used here.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from common.data.base import (
    IMAGE_SUFFIXES,
    MANIFEST_COLUMNS,
    MANIFEST_FILE,
    SITE_FILE,
    SPLITS,
    DataError,
    check_modality,
    check_split,
)

log = logging.getLogger("common.data")


def class_names_source(configured: Sequence[str], root: str | os.PathLike | None = None) -> str:
    """Where a site's class names came from, for error messages that say what to change."""
    if configured:
        return "the run's data.class_names"
    where = f" of {Path(root) / 'train'}" if root is not None else ""
    return f"the class folders{where} (ImageFolder: sorted folder names)"


def discover_class_names(root: str | os.PathLike) -> tuple[str, ...] | None:
    """A real site's class names, in label order, as torchvision's ImageFolder finds them.

    With a ``manifest.csv``: the sorted distinct labels that are names (a manifest of class
    indices only names nothing -> None). Otherwise the sorted non-hidden folders of
    ``<root>/train`` (None when that folder is missing: :class:`FolderSiteDataset` then says
    what to create). Every site of a federation must find the same names: the server checks.
    """
    root = Path(root)
    manifest = root / MANIFEST_FILE
    if manifest.is_file():
        try:
            rows = read_manifest(manifest).rows
        except DataError:
            return None  # FolderSiteDataset reports the unreadable manifest with its fix
        labels = {row["label"] for _, row in rows}
        names = sorted(label for label in labels if label and not label.isdigit())
        return tuple(names) or None
    train = root / "train"
    if not train.is_dir():
        return None
    return tuple(sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")))


@dataclass(frozen=True)
class Manifest:
    """A site's ``manifest.csv`` as read by :func:`read_manifest`: its data rows as (line
    number, {column: cell}) over :data:`MANIFEST_COLUMNS`, cells stripped, ``split`` lower-cased."""

    path: Path
    delimiter: str
    rows: list[tuple[int, dict[str, str]]]


_DELIMITERS = (",", ";", "\t")


def read_manifest(manifest: Path) -> Manifest:
    """The one reader of a manifest (discovery, :func:`has_split` and the loader all use it, so
    they cannot read one file two ways), tolerant of how spreadsheet tools save it: a UTF-8 BOM,
    CRLF line ends, ``,`` ``;`` or tab as the delimiter (the one the header line holds most
    of), spaces around cells, quoted cells, blank cells and rows. Raises :class:`DataError`
    naming the file, the line and the fix."""
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{manifest} is not a UTF-8 text CSV ({err}); re-save it as CSV (UTF-8)") from err
    except OSError as err:
        raise DataError(f"cannot read {manifest} ({err}); check that it exists and this user may read it") from err
    first = next((line for line in text.splitlines() if line.strip()), "")
    delimiter = max(_DELIMITERS, key=first.count)
    try:
        # skipinitialspace: a space after the delimiter ("a.png, x") must not hide a quote.
        reader = csv.reader(text.splitlines(), delimiter=delimiter, skipinitialspace=True)
        rows = [(n, [cell.strip() for cell in row]) for n, row in enumerate(reader, start=1)]
    except csv.Error as err:
        raise DataError(f"{manifest} is not a valid CSV ({err}); fix the file") from err
    rows = [(n, row) for n, row in rows if any(row)]  # blank lines and rows of empty cells
    if not rows:
        raise DataError(f"{manifest} is empty; the first line must be the header {','.join(MANIFEST_COLUMNS)}")
    header_line, header = rows[0]
    header = [h.lower() for h in header]
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"{manifest} line {header_line}: missing column(s) {missing}; found {header} (read with delimiter "
            f"{delimiter!r}). The header must be {','.join(MANIFEST_COLUMNS)}, its columns separated by ',' (or ';' or a tab)"
        )
    column = {name: header.index(name) for name in MANIFEST_COLUMNS}
    cells = [(n, {name: row[i] if i < len(row) else "" for name, i in column.items()}) for n, row in rows[1:]]
    for _, cell in cells:
        cell["split"] = cell["split"].lower()
    return Manifest(manifest, delimiter, cells)


def write_site_json(folder: Path, modality: str, class_names: Sequence[str], extra: dict | None = None) -> None:
    """``<folder>/site.json``: ``{"modality": ..., "class_names": [...], **extra}``."""
    payload = {"modality": modality, "class_names": list(class_names)}
    if extra:
        payload.update(extra)
    (folder / SITE_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def load_image(path: Path) -> Image.Image:
    """Decode fully to 8-bit RGB (:func:`to_rgb`), upright, or raise DataError naming the file.

    The EXIF orientation is applied (a camera stores a portrait frame sideways and says so in
    the tag; read as stored, it was a different image from the one the clinician saw), and a
    16-bit PNG's ``sBIT`` (significant bits) is passed on to :func:`to_rgb`."""
    try:
        with Image.open(path) as im:
            im.load()  # the full decode: truncation shows here
            bits = _png_significant_bits(path) if im.format == "PNG" else None
            return to_rgb(ImageOps.exif_transpose(im), path, bits)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(
            f"cannot read image {path}: {err}; replace or delete this file "
            "(FolderSiteDataset.verify() lists the first bad file of a split)"
        ) from err


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_significant_bits(path: Path) -> tuple[int, int] | None:
    """(bit depth, fewest significant bits of its channels) of a PNG with an ``sBIT`` chunk
    whose bits are fewer than its depth, else None. PIL does not read ``sBIT``: the chunks
    before the image data are walked here (length, type, data, CRC each)."""
    with open(path, "rb") as fh:
        if fh.read(8) != _PNG_SIGNATURE:
            return None
        depth = None
        while header := fh.read(8):
            if len(header) < 8:
                return None
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind in (b"IDAT", b"IEND"):  # sBIT comes before the image data or not at all
                return None
            data = fh.read(length)
            fh.seek(4, os.SEEK_CUR)  # CRC (PIL checked the file when it decoded it)
            if kind == b"IHDR" and len(data) >= 9:
                depth = data[8]
            elif kind == b"sBIT" and data and depth is not None:
                bits = min(data)
                return (depth, bits) if 0 < bits < depth else None
    return None


# PIL modes PIL's own convert("RGB") maps right (8 bits per channel, no alpha, no palette transparency).
_DIRECT_MODES = ("RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "P", "RGBX")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Integer modes wider than 8 bits: scaled from their full 16-bit range (convert() would clip at 255).
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: Image.Image, path: str | Path = "image", png_bits: tuple[int, int] | None = None) -> Image.Image:
    """An image of any PIL mode a medical export produces, as 8-bit RGB with the right values.

    * 8-bit modes (RGB, L, 1, CMYK, YCbCr, P...): PIL's conversion (1 -> 0/255, CMYK -> RGB).
    * Alpha (RGBA, LA, a palette with a transparent entry): composited over black, the
      background of an endoscopy frame; ``convert("RGB")`` would show whatever colour the
      transparent pixels happen to hold.
    * 16-bit and 32-bit integer grayscale (I;16*, I): value v -> round(v * 255 / 65535) (the
      16-bit range; ``convert`` clips everything above 255 to white). Values outside
      0..65535 are refused: their range is not known.
    * Float grayscale (F): values in [0, 1] -> round(255 v); any other range is refused.
    * ``png_bits`` (bit depth, significant bits) of a 16-bit PNG whose ``sBIT`` says b < 16:
      PNG asks for values scaled to the full range (then read as above), but exports write
      the raw b-bit values, which read as a 16th of the range for b = 12. Grayscale values that
      all fit in b bits, and are not all multiples of 2^(16-b) (shifted), are read as raw:
      v -> round(v * 255 / (2^b - 1)). A colour one holding raw values is refused (PIL keeps
      only the high byte of 16-bit colour: the values are lost).
    Anything else raises :class:`DataError` naming the file and the mode.
    """
    mode = image.mode
    depth, bits = png_bits or (8, 8)
    if mode == "P" and "transparency" in image.info:
        mode, image = "RGBA", image.convert("RGBA")
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    if mode in _DIRECT_MODES:
        if depth == 16 and bits < 16 and mode == "RGB" and np.asarray(image).max() < 2 ** (bits - 8):
            raise DataError(
                f"image {path}: a 16-bit colour PNG whose sBIT says {bits} significant bits holds unscaled {bits}-bit "
                f"values (all below {2**bits}), which cannot be read without losing them; re-export it scaled to the "
                f"full 16-bit range as PNG asks (v * 65535 / {2**bits - 1}), or as an 8-bit PNG"
            )
        return image.convert("RGB")
    if mode in _WIDE_INT_MODES or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            low, high, scale = 0.0, 1.0, 255.0
        elif depth == 16 and bits < 16 and values.max(initial=0) < 2**bits and (values % 2 ** (16 - bits)).any():
            low, high, scale = 0.0, 2.0**bits - 1, 255.0 / (2**bits - 1)  # raw b-bit values (see above)
        else:
            low, high, scale = 0.0, 65535.0, 255.0 / 65535.0
        if values.size and not (np.isfinite(values).all() and values.min() >= low and values.max() <= high):
            lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
            raise DataError(
                f"image {path}: mode {mode} with values in [{lo:g}, {hi:g}], outside the [{low:g}, {high:g}] this loader "
                "maps to 8 bits; export it as an 8- or 16-bit PNG (or a float image scaled to [0, 1])"
            )
        gray = Image.fromarray(np.rint(values * scale).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    raise DataError(f"image {path}: PIL mode {mode!r} is not supported; export it as an 8-bit RGB or grayscale PNG/JPEG")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _not_read(path: Path) -> str | None:
    """Why a file of a class folder is not read (the reason it is counted under), or None for an
    image that is: the loader reads .png/.jpg/.jpeg files only."""
    if path.name.startswith("."):
        return "hidden file"
    if path.is_symlink() and not path.exists():
        return "dangling link"
    if path.is_dir():
        return "folder inside a class folder (not searched)"
    if not path.is_file():
        return "not a regular file"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"unsupported extension {path.suffix.lower() or '(none)'} (read: {', '.join(IMAGE_SUFFIXES)})"
    return None


def has_split(root: str | os.PathLike, split: str) -> bool:
    """Whether a real site folder holds images of ``split`` (in its ImageFolder sub-folder, or
    manifest rows with that split); used for the optional val split. Structure errors are left
    to the loader."""
    root = Path(root)
    manifest = root / MANIFEST_FILE
    if not manifest.is_file():
        folder = root / check_split(split)
        return folder.is_dir() and any(_is_image(p) for p in folder.rglob("*"))
    try:
        return any(row["split"] == split for _, row in read_manifest(manifest).rows)
    except DataError:
        return True  # let the loader report the broken manifest with its line


class FolderSiteDataset(torch.utils.data.Dataset):
    """One split of a real site. Item: (image, label), as :class:`SyntheticEndoscopyDataset`.

    Layout, either
      * ImageFolder: ``<root>/{train,val,test}/<class>/*.{png,jpg,jpeg}``, or
      * manifest: ``<root>/manifest.csv`` with columns ``path,label,split`` (paths relative to
        ``root``; ``label`` a class name or its index).
    An optional ``<root>/site.json`` ``{"modality": ..., "class_names": [...]}`` declares the
    modality. Structure is validated eagerly (no decoding); see :meth:`verify` for pixels.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        class_names: Sequence[str],
        transform: Callable | None = None,
        expected_modality: str | None = None,
        names_source: str = "the configured class names",
    ) -> None:
        self.root = Path(root)
        self.split = check_split(split)
        self.class_names = tuple(class_names)
        self.transform = transform
        self.names_source = names_source  # said in errors: what the user changes to fix a class
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise DataError(f"class_names={list(self.class_names)}: need at least 2 distinct class names")
        if expected_modality is not None:
            check_modality(expected_modality, "expected_modality")
        if not self.root.is_dir():
            raise DataError(
                f"site data folder {self.root} does not exist (or is not a folder); point data-path at the "
                f"folder holding {'/'.join(SPLITS)}/<class>/ images or {MANIFEST_FILE}"
            )
        self.modality = self._read_modality(expected_modality)
        # Files of the split's folders that are not read, by reason ("dangling link",
        # "unsupported extension .tif", ...): counted and reported, never dropped without a word
        # (they change the class counts the site declares).
        self.skipped: dict[str, list[Path]] = {}
        self._real_root = self.root.resolve()
        manifest = self.root / MANIFEST_FILE
        if manifest.is_file():
            paths, labels = self._scan_manifest(manifest)
        else:
            paths, labels = self._scan_folders()
        self.paths: list[Path] = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        for reason, files in self.skipped.items():
            log.warning("%s/%s: %d file(s) not read: %s (e.g. %s)", self.root, self.split, len(files), reason, files[0])

    def _inside(self, path: Path, what: str) -> Path:
        """``path`` if it resolves (links followed) inside the site's folder, else a DataError
        naming ``what`` (the manifest row or the file): a path or link out of the folder would
        read another site's images, or anything this process may read, as this site's."""
        target = path.resolve()
        if not target.is_relative_to(self._real_root):
            raise DataError(
                f"{what} resolves to {target}, outside the site folder {self.root}: a site reads only its own "
                "files; copy the image into the site folder (paths relative to it, no '..' out of it, no link out of it)"
            )
        return path

    # -- validation helpers --
    def _read_modality(self, expected: str | None) -> str | None:
        site_file = self.root / SITE_FILE
        if not site_file.is_file():
            return expected
        try:
            meta = json.loads(site_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{site_file} is not valid JSON ({err}); fix it or delete it") from err
        if not isinstance(meta, dict) or "modality" not in meta:
            raise DataError(f'{site_file} has no "modality" key; write {{"modality": "wli" or "nbi"}} or delete it')
        modality = check_modality(str(meta["modality"]).lower(), str(site_file))
        declared = meta.get("class_names")
        # Order may differ (discovered names are sorted, a writer may list them in label order);
        # other names mean the declaration is stale.
        if declared is not None and sorted(map(str, declared)) != sorted(self.class_names):
            log.warning(
                "%s declares class_names %s; using %s from %s", site_file, declared, list(self.class_names), self.names_source
            )
        if expected is not None and modality != expected:
            raise DataError(
                f"{site_file} declares modality {modality!r} but this site is configured as {expected!r}; "
                "fix the site's modality in its node config or point data-path at the right folder"
            )
        return modality

    def _class_error(self, what: str, where: str) -> DataError:
        return DataError(
            f"{where}: unknown class {what!r}; expected one of {list(self.class_names)}. Rename or remove it, "
            f"or set data.class_names to this federation's classes (now: {self.names_source})"
        )

    def _scan_folders(self) -> tuple[list[Path], list[int]]:
        split_dir = self.root / self.split
        if not split_dir.is_dir():
            present = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise DataError(
                f"split folder {split_dir} is missing; {self.root} has folders {present} "
                f"(expected {list(SPLITS)}). Create {split_dir}/<class>/ or add a {MANIFEST_FILE}"
            )
        index = {name: i for i, name in enumerate(self.class_names)}
        paths: list[Path] = []
        labels: list[int] = []
        found: dict[str, int] = {}
        for entry in sorted(split_dir.iterdir()):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                self.skipped.setdefault(f"not in a class folder (images belong in {split_dir}/<class>/)", []).append(entry)
                continue
            if entry.name not in index:
                raise self._class_error(entry.name, f"class folder {entry}")
            files = []
            for path in sorted(entry.iterdir()):
                if (reason := _not_read(path)) is not None:
                    self.skipped.setdefault(reason, []).append(path)
                else:
                    files.append(self._inside(path, f"image {path}"))
            found[entry.name] = len(files)
            paths.extend(files)
            labels.extend([index[entry.name]] * len(files))
        if not paths:
            raise DataError(
                f"no images in {split_dir}: expected {split_dir}/<class>/*.png|jpg with classes {list(self.class_names)}"
            )
        if self.split == "train":
            for name in self.class_names:
                if found.get(name, 0) == 0:
                    folder = split_dir / name
                    state = "has no .png/.jpg images" if folder.is_dir() else "is missing"
                    raise DataError(
                        f"class folder {folder} {state}: every class needs training images; add images "
                        f"there or drop {name!r} from {self.names_source}"
                    )
        return paths, labels

    def _scan_manifest(self, manifest: Path) -> tuple[list[Path], list[int]]:
        """Rows of this split from a manifest (:func:`read_manifest`, as discovery reads it). An
        image listed twice (in one split or in two: a training image must never be evaluated)
        is refused with both lines."""
        index = {name: i for i, name in enumerate(self.class_names)}
        paths: list[Path] = []
        labels: list[int] = []
        counts = [0] * len(self.class_names)
        seen: dict[Path, tuple[int, str]] = {}  # every row's image, any split: (line, split)
        for line_no, cell in read_manifest(manifest).rows:
            where = f"{manifest} line {line_no}"
            split = cell["split"]
            if split not in SPLITS:
                raise DataError(f"{where}: split {cell['split']!r} is not one of {list(SPLITS)}; fix the split column")
            label_text = cell["label"]
            if label_text in index:
                label = index[label_text]
            elif label_text.isdigit() and int(label_text) < len(self.class_names):
                label = int(label_text)
            else:
                raise self._class_error(label_text, where)
            rel = cell["path"]
            if not rel:
                raise DataError(f"{where}: empty path; give the image path relative to {self.root}")
            path = self._inside(self.root / rel, f"{where}: image path {rel!r}")
            key = path.resolve()
            if key in seen:
                other_line, other_split = seen[key]
                what = f"in both '{other_split}' and '{split}'" if other_split != split else f"twice in '{split}'"
                raise DataError(
                    f"{where}: image {path} is listed {what} (line {other_line} too); list each image once"
                    + (": a training image must never be evaluated" if other_split != split else "")
                )
            seen[key] = (line_no, split)
            if split != self.split:
                continue
            if not path.is_file():
                raise DataError(f"{where}: image {path} does not exist; fix the path (relative to {self.root})")
            paths.append(path)
            labels.append(label)
            counts[label] += 1
        if not paths:
            raise DataError(f"{manifest} lists no images for split {self.split!r}; add rows with split={self.split}")
        if self.split == "train":
            for name, count in zip(self.class_names, counts):
                if count == 0:
                    raise DataError(
                        f"{manifest}: class {name!r} has no training images; add rows with label={name} "
                        f"split=train or drop {name!r} from {self.names_source}"
                    )
        return paths, labels

    # -- dataset protocol --
    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """Image ``index`` decoded to RGB; DataError naming the file if it cannot be read."""
        return load_image(self.paths[index])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.load(index)
        label = int(self.labels[index])
        if self.transform is not None:
            return self.transform(image), label
        arr = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0), label

    def verify(self) -> None:
        """Decode every image of the split; DataError naming the first unreadable file."""
        for path in self.paths:
            load_image(path)

    def class_counts(self) -> np.ndarray:
        """[C] int64 number of images per class in this split."""
        return np.bincount(self.labels, minlength=len(self.class_names)).astype(np.int64)
