"""What every part of :mod:`common.data` shares: the error type, names, file names and checks.

* :class:`DataError`: every dataset problem, its message naming the file, folder or field and the fix.
* Names: :data:`MODALITIES` ``("wli", "nbi")``, :data:`SPLITS` ``("train", "val", "test")``,
  :data:`DEFAULT_CLASS_NAMES` (PICCOLO's three, :func:`default_class_names` for any C >= 2), the
  ImageNet normalisation (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`, 3 floats each) and the
  files of a real site (``site.json``, ``manifest.csv`` with columns ``path,label,split``).
* :func:`check_site_name`: a site name of a safe set of characters (:data:`SITE_NAME_RE`).
* :class:`SiteData`: one site's splits (any ``torch.utils.data.Dataset`` whose item is
  ``(image [3, S, S] float, label int)``), its modality and class names; what
  :mod:`common.data.synthetic` and ``client.site`` build and the ClientApp trains on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch.utils.data import Dataset

MODALITIES = ("wli", "nbi")
DEFAULT_CLASS_NAMES = ("hyperplasia", "adenoma", "adenocarcinoma")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SITE_FILE = "site.json"
MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS = ("path", "label", "split")
# A site's name: it is a key of metrics.json, the ledger and the DP accounting, a word of every
# server log line about the site and a certificate name (deploy/supernode.py and
# deploy/certs/make_certs.py hold the same rule). A newline in it forged a server log line.
SITE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
SITE_NAME_RULE = "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit (e.g. 'hospital-a-nbi')"


class DataError(ValueError):
    """A dataset problem; the message names the offending file, folder or field and the fix."""


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """PICCOLO's three class names, then ``class_3``, ``class_4``, ... for larger C."""
    if num_classes < 2:
        raise DataError(f"num_classes={num_classes}: need at least 2 classes; set num_classes >= 2")
    extra = tuple(f"class_{i}" for i in range(len(DEFAULT_CLASS_NAMES), num_classes))
    return (DEFAULT_CLASS_NAMES + extra)[:num_classes]


def normalise_modality(modality: str, where: str) -> str:
    """``'NBI'`` or ``'nbi'`` -> ``'nbi'``; anything else is a DataError naming ``where``."""
    return check_modality(str(modality).strip().lower(), where)


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {list(SPLITS)}; pass one of those")
    return split


def check_site_name(name: object, where: str) -> str:
    """``name`` if it is a safe site name (:data:`SITE_NAME_RE`), else a DataError naming
    ``where`` (the node config key or the sites.toml entry) and the rule."""
    if not isinstance(name, str) or not SITE_NAME_RE.fullmatch(name):
        raise DataError(f"{where}: site name {name!r} is not allowed; use {SITE_NAME_RULE}")
    return name


def check_modality(modality: str, where: str) -> str:
    if modality not in MODALITIES:
        raise DataError(f"{where}: modality {modality!r} is not one of {list(MODALITIES)}; use 'wli' or 'nbi'")
    return modality


@dataclass
class SiteData:
    """One site's data: its name, modality (``wli`` | ``nbi``), class names in label order and
    splits; ``val`` is None for a site without a model-selection split."""

    name: str
    modality: str
    train: Dataset  # training split (augmented per batch by the training loop)
    test: Dataset  # held-out split for the final evaluation (read once, at the end)
    class_names: tuple[str, ...]
    val: Dataset | None = None  # model-selection split (per-round evaluation); None: the site has none

    def split(self, name: str) -> Dataset:
        """The ``train`` / ``val`` / ``test`` split; a missing val split is an error naming the site."""
        data = {"train": self.train, "val": self.val, "test": self.test}.get(name)
        if data is None:
            raise DataError(f"site '{self.name}' has no '{name}' split; add {name}/ (or manifest rows with split={name})")
        return data
