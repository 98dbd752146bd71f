"""Site datasets for FedPaGKD: a synthetic NBI/WLI endoscopy generator, real image folders, loaders.

Three pieces (DESIGN.md section 5):

* :class:`SyntheticEndoscopyDataset` renders endoscopy-like images on demand from a
  :class:`SyntheticSiteSpec`. Each image draws a latent lesion "biology" (pit and vessel
  pattern parameters) from class-conditional distributions that overlap, then renders it as
  NBI (high contrast, crisp) or WLI (faint, blurred, noisy, partly hidden by glare).
  Nothing is paired: every image has its own random stream.
* :class:`FolderSiteDataset` reads a real site: an ImageFolder tree or a CSV manifest. All
  structural problems are reported eagerly by :class:`DataError` naming the file/folder and
  the fix; unreadable images are reported when touched (or by :meth:`FolderSiteDataset.verify`).
* :func:`build_transform`, :class:`BatchAugment` and :class:`ClassBalancedBatchSampler` turn either into batches
  fit for PaGKD's class groups.

Images are decoded with PIL: ``torchvision.io`` has no kernels on the CPU build used here.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from scipy.ndimage import gaussian_filter

log = logging.getLogger(__name__)

MODALITIES = ("wli", "nbi")
DEFAULT_CLASS_NAMES = ("hyperplasia", "adenoma", "adenocarcinoma")
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SITE_FILE = "site.json"
MANIFEST_FILE = "manifest.csv"
MANIFEST_COLUMNS = ("path", "label", "split")

_SPLIT_ID = {name: i for i, name in enumerate(SPLITS)}
_MODALITY_ID = {name: i for i, name in enumerate(MODALITIES)}
# Domain tags keep the random streams of images, label lists and site looks disjoint even
# when the other seed words coincide.
_TAG_IMAGE, _TAG_LABELS, _TAG_SITE = 0x1A6E, 0x1AB1, 0x517E


class DataError(ValueError):
    """A dataset problem; the message names the offending file, folder or field and the fix."""


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """PICCOLO's three class names, then ``class_3``, ``class_4``, ... for larger C."""
    if num_classes < 2:
        raise DataError(f"num_classes={num_classes}: need at least 2 classes; set num_classes >= 2")
    extra = tuple(f"class_{i}" for i in range(len(DEFAULT_CLASS_NAMES), num_classes))
    return (DEFAULT_CLASS_NAMES + extra)[:num_classes]


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
            with manifest.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
        except (UnicodeDecodeError, csv.Error):
            return None  # FolderSiteDataset reports the unreadable manifest with its fix
        labels = {(row.get("label") or "").strip() for row in rows}
        names = sorted(label for label in labels if label and not label.isdigit())
        return tuple(names) or None
    train = root / "train"
    if not train.is_dir():
        return None
    return tuple(sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")))


def normalise_modality(modality: str, where: str) -> str:
    """``'NBI'`` or ``'nbi'`` -> ``'nbi'``; anything else is a DataError naming ``where``."""
    return _check_modality(str(modality).strip().lower(), where)


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {list(SPLITS)}; pass one of those")
    return split


def _check_modality(modality: str, where: str) -> str:
    if modality not in MODALITIES:
        raise DataError(f"{where}: modality {modality!r} is not one of {list(MODALITIES)}; use 'wli' or 'nbi'")
    return modality


# --------------------------------------------------------------------------------------------
# Synthetic generator
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSiteSpec:
    """One synthetic site: its modality, split sizes, class balance and rendering offsets.

    ``class_weights`` (length ``num_classes``) makes a site non-IID in class balance; the split
    compositions follow them exactly up to rounding. ``render_shift`` in [0, 1] scales a
    per-site colour cast, brightness offset and extra blur drawn from ``seed``.
    """

    modality: str
    num_train: int = 96
    num_val: int = 32
    num_test: int = 48
    num_classes: int = 3
    class_weights: tuple[float, ...] | None = None
    render_shift: float = 0.0
    seed: int = 0
    image_size: int = 64
    names: tuple[str, ...] | None = None  # class names in label order (None: default_class_names)

    def __post_init__(self) -> None:
        _check_modality(self.modality, "SyntheticSiteSpec.modality")
        if self.names is not None:
            object.__setattr__(self, "names", tuple(str(n) for n in self.names))
            if len(self.names) != self.num_classes or len(set(self.names)) != len(self.names):
                raise DataError(f"SyntheticSiteSpec.names={list(self.names)}: give num_classes={self.num_classes} distinct names")
        for name in ("num_train", "num_val", "num_test"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise DataError(f"SyntheticSiteSpec.{name}={value!r}: must be an int >= 0")
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 2:
            raise DataError(f"SyntheticSiteSpec.num_classes={self.num_classes!r}: must be an int >= 2")
        if self.class_weights is not None:
            weights = tuple(float(w) for w in self.class_weights)
            if len(weights) != self.num_classes:
                raise DataError(
                    f"SyntheticSiteSpec.class_weights has {len(weights)} entries but num_classes="
                    f"{self.num_classes}; give one weight per class (or None for balanced)"
                )
            if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
                raise DataError(
                    f"SyntheticSiteSpec.class_weights={weights}: weights must be finite, >= 0 and not all 0"
                )
            object.__setattr__(self, "class_weights", weights)
        if not 0.0 <= float(self.render_shift) <= 1.0:
            raise DataError(f"SyntheticSiteSpec.render_shift={self.render_shift!r}: must lie in [0, 1]")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise DataError(f"SyntheticSiteSpec.seed={self.seed!r}: must be an int >= 0")
        if not isinstance(self.image_size, (int, np.integer)) or self.image_size < 16:
            raise DataError(f"SyntheticSiteSpec.image_size={self.image_size!r}: must be an int >= 16")

    def split_size(self, split: str) -> int:
        return int(getattr(self, f"num_{_check_split(split)}"))

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.names or default_class_names(self.num_classes)


# Latent lesion biology. Every image draws a "severity" s around its class's position on [0, 1]
# (classes spread evenly along it, any C >= 2) with a spread of _SEVERITY_SPREAD class gaps, so
# neighbouring classes overlap and even a perfect classifier's AUC stays below 1. Each latent is
# a saturating function of s plus its own jitter, so the pattern changes in stages, as the
# NICE/JNET classifications describe: round regular pits -> elongated/tubular pits -> irregular,
# fading pits; thin regular vessels -> denser -> thick, tortuous, disrupted vessels.
LATENT_NAMES = (
    "severity",
    "pit_elongation",
    "pit_irregularity",
    "pit_visibility",
    "vessel_density",
    "vessel_calibre",
    "vessel_tortuosity",
    "vessel_disruption",
)
_SEVERITY_SPREAD = 0.4  # std of s in units of the gap between neighbouring class means
_LATENT_JITTER = 0.06


def _sat(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def _class_position(label: int, num_classes: int) -> float:
    return label / (num_classes - 1)


def _draw_latents(rng: np.random.Generator, label: int, num_classes: int) -> dict[str, float]:
    """Latent biology of one image of class ``label`` (the first draws of its random stream)."""
    gap = 1.0 / (num_classes - 1)
    s = _class_position(label, num_classes) + _SEVERITY_SPREAD * gap * rng.standard_normal()
    j = s + _LATENT_JITTER * rng.standard_normal(7)
    return {
        "severity": float(s),
        "pit_elongation": 1.0 + 2.5 * _sat(2.0 * j[0]),  # length/width of a pit: 1 round, 3.5 tubular
        "pit_irregularity": _sat(2.0 * j[1] - 0.9),  # position/size disorder of pits
        "pit_visibility": 1.0 - 0.75 * _sat(2.0 * j[2] - 1.0),  # pits fade (absent) when severe
        "vessel_density": _sat(0.25 + 1.1 * j[3]),
        "vessel_calibre": _sat(1.6 * j[4] - 0.45),  # 0 thin .. 1 thick
        "vessel_tortuosity": _sat(2.0 * j[5] - 0.8),
        "vessel_disruption": _sat(2.2 * j[6] - 1.2),
    }


def severity_posterior(severity: np.ndarray, num_classes: int, class_weights: Sequence[float] | None = None) -> np.ndarray:
    """The true class posterior given the latent severity: severity [N] -> p(class | s) [N, C].

    Under the generator, s ~ N(c / (C - 1), (_SEVERITY_SPREAD / (C - 1))^2) for class c, and every
    other latent (hence every pixel) depends on the class only through s. So no classifier of
    the images can beat the AUC of this posterior: it is the Bayes ceiling of the task, for WLI
    and NBI alike (what WLI hides costs AUC below it; NBI knowledge can fill at most the gap).
    ``class_weights`` is the prior (None: balanced)."""
    severity = np.asarray(severity, dtype=np.float64).reshape(-1, 1)
    means = np.array([_class_position(c, num_classes) for c in range(num_classes)])[None, :]
    std = _SEVERITY_SPREAD / (num_classes - 1)
    prior = np.ones(num_classes) if class_weights is None else np.asarray(class_weights, dtype=np.float64)
    log_joint = -0.5 * ((severity - means) / std) ** 2 + np.log(prior / prior.sum())[None, :]
    log_joint -= log_joint.max(axis=1, keepdims=True)
    joint = np.exp(log_joint)
    return joint / joint.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class _Look:
    """How one modality shows the biology: palette, pattern amplitude, optics."""

    mucosa: tuple[float, float, float]
    lesion: tuple[float, float, float]
    pit: tuple[float, float, float]
    vessel: tuple[float, float, float]
    pit_amp: float  # pit contrast inside the lesion (background gets a fraction)
    vessel_amp: float
    blur: float  # Gaussian blur sigma, in image half-widths
    noise: float  # sensor noise std
    glare_count: tuple[int, int]  # inclusive range of specular blobs
    glare_size: tuple[float, float]  # blob radius range, in image half-widths
    glare_on_lesion: float  # share of blobs centred on the lesion (raised tissue reflects)


# Registry, not if/else: a new modality look is one entry.
_LOOKS: dict[str, _Look] = {
    # NBI: 415/540 nm light, haemoglobin absorbs strongly -> dark brown vessels on a teal/cyan
    # mucosa, whitish crisp pits. High contrast, little blur.
    "nbi": _Look(
        mucosa=(0.40, 0.55, 0.54),
        lesion=(0.52, 0.46, 0.36),
        pit=(0.88, 0.92, 0.86),
        vessel=(0.20, 0.12, 0.08),
        pit_amp=0.75,
        vessel_amp=0.9,
        blur=0.004,
        noise=0.015,
        glare_count=(0, 1),
        glare_size=(0.012, 0.025),
        glare_on_lesion=0.3,
    ),
    # WLI: pink/orange mucosa, vessels only slightly redder, pits faint; soft optics, more
    # noise and large specular highlights that hide part of the lesion. Pattern amplitude is
    # about half of NBI's: at a quarter (the first version) a CNN trained on a few hundred
    # WLI images stayed at chance (AUC 0.55), i.e. WLI showed nothing rather than "faint".
    "wli": _Look(
        mucosa=(0.86, 0.50, 0.42),
        lesion=(0.88, 0.44, 0.38),
        pit=(0.94, 0.62, 0.56),
        vessel=(0.66, 0.22, 0.20),
        pit_amp=0.38,
        vessel_amp=0.42,
        blur=0.015,
        noise=0.022,
        glare_count=(1, 4),
        glare_size=(0.015, 0.045),
        glare_on_lesion=0.6,
    ),
}

# Normal mucosa around the lesion: regular round pits, a thin regular vessel mesh, shown at a
# fraction of the lesion's contrast. It is the same for every class (no class cue outside).
_BACKGROUND_BIOLOGY = {
    "pit_elongation": 1.0,
    "pit_irregularity": 0.1,
    "vessel_density": 0.2,
    "vessel_calibre": 0.0,
    "vessel_tortuosity": 0.3,
    "vessel_disruption": 0.0,
}
_BACKGROUND_AMP = 0.45
_CALIBRE_RANGE = (0.010, 0.034)  # vessel half-width, in image half-widths, thin .. thick


@functools.lru_cache(maxsize=32)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``x, y`` [S, S] in [-1, 1]."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
    x, y = np.meshgrid(c, c)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=128)
def _rbf_matrix(size: int, cells: int) -> np.ndarray:
    """[S, cells] Gaussian interpolation weights, rows of unit L2 norm.

    ``M @ g @ M.T`` with ``g`` i.i.d. N(0, 1) on a cells x cells lattice is a smooth field of
    unit variance at every pixel: band-limited noise in two matrix products, no pixel loops.
    """
    x = ((np.arange(size) + 0.5) / size) * 2.0 - 1.0
    centres = np.linspace(-1.2, 1.2, cells)
    width = 0.8 * (centres[1] - centres[0])
    w = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / width) ** 2)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    w = w.astype(np.float32)
    w.setflags(write=False)
    return w


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """[S, S] float32 smooth Gaussian noise, unit variance, feature size ~ 2/cells."""
    m = _rbf_matrix(size, cells)
    return m @ rng.standard_normal((cells, cells), dtype=np.float32) @ m.T


@dataclass(frozen=True)
class _SiteLook:
    """Per-site rendering offsets (scaled by ``render_shift``)."""

    cast: np.ndarray  # [3] multiplicative colour cast
    brightness: float  # additive
    blur: float  # extra blur, in image half-widths


def _site_look(spec: SyntheticSiteSpec) -> _SiteLook:
    rng = np.random.default_rng(np.random.SeedSequence([_TAG_SITE, int(spec.seed), _MODALITY_ID[spec.modality]]))
    shift = float(spec.render_shift)
    cast = 1.0 + shift * 0.18 * rng.standard_normal(3)
    brightness = shift * rng.uniform(-0.15, 0.15)
    blur = shift * rng.uniform(0.004, 0.012)
    return _SiteLook(cast=cast.astype(np.float32), brightness=float(brightness), blur=float(blur))


def _render(rng: np.random.Generator, latents: dict[str, float], size: int, look: _Look, site: _SiteLook) -> np.ndarray:
    """Render one image [S, S, 3] uint8 from its latents; ``rng`` supplies every nuisance draw.

    Every step is a whole-array numpy operation on [S, S] maps; colour is only formed at the
    end, as one [3, 4] x [4, S*S] product of a palette with four layer weights (mucosa,
    lesion tint, pits, vessels), because each [S, S, 3] operation costs three [S, S] ones.
    """
    x, y = _grid(size)
    px = 2.0 / size  # one pixel in image half-widths
    f32 = np.float32

    # --- nuisance geometry (class-independent) ---
    radius = 0.3 * math.sqrt(rng.uniform())
    ang = rng.uniform(0.0, 2.0 * math.pi)
    cx, cy = radius * math.cos(ang), radius * math.sin(ang)
    a = rng.uniform(0.38, 0.6)
    b = a * rng.uniform(0.65, 1.0)
    theta = rng.uniform(0.0, math.pi)
    phi = rng.uniform(0.0, math.pi)  # orientation of the pit lattice
    freq = rng.uniform(34.0, 42.0)  # pit lattice angular frequency (period ~0.17 half-widths)
    light_dir = rng.uniform(0.0, 2.0 * math.pi)
    light_amp = rng.uniform(0.0, 0.15)
    colour_jitter = 1.0 + 0.05 * rng.standard_normal(3)

    texture = _smooth_noise(rng, size, 5)
    warp_u = _smooth_noise(rng, size, 14)
    warp_v = _smooth_noise(rng, size, 14)
    pit_size_noise = _smooth_noise(rng, size, 12)
    vessel_tortuous = _smooth_noise(rng, size, 8)
    vessel_dense = _smooth_noise(rng, size, 18)
    breaks = _smooth_noise(rng, size, 10)

    # --- lesion mask: soft ellipse with a slightly irregular border ---
    dx, dy = x - f32(cx), y - f32(cy)
    ct, st = math.cos(theta), math.sin(theta)
    e1 = (dx * f32(ct / a) + dy * f32(st / a)) ** 2
    e2 = (dy * f32(ct / b) - dx * f32(st / b)) ** 2
    lesion = np.clip(f32(2.5) - f32(2.5) * (e1 + e2 + f32(0.15) * texture), 0.0, 1.0)

    def blend(key: str) -> np.ndarray:
        """Parameter map: background value outside the lesion, the latent inside."""
        bg = _BACKGROUND_BIOLOGY[key]
        return f32(bg) + f32(latents[key] - bg) * lesion

    # --- pit pattern: lattice of spots, stretched into tubes, warped into disorder ---
    irreg = blend("pit_irregularity")
    warp = irreg * f32(0.45 * 2.0 * math.pi)  # displacement up to ~half a pit period, in phase units
    cp, sp = math.cos(phi) * freq, math.sin(phi) * freq
    u = dx * f32(cp) + dy * f32(sp) + warp * warp_u
    v = (dy * f32(cp) - dx * f32(sp) + warp * warp_v) / blend("pit_elongation")
    field = np.cos(u) * np.cos(v)
    pits = np.clip((field - f32(0.4) - f32(0.3) * irreg * pit_size_noise) * f32(4.0) + f32(0.5), 0.0, 1.0)

    # --- vessels: zero set of a field; regular mesh between pits -> tortuous random network ---
    tort = blend("vessel_tortuosity")
    nv = field + tort * (f32(0.8) * vessel_tortuous - field) + blend("vessel_density") * f32(0.45) * vessel_dense
    grad2 = _grad_sq(nv)
    lo, hi = _CALIBRE_RANGE
    half_width_px = blend("vessel_calibre") * f32((hi - lo) / px) + f32(lo / px)
    # Gaussian profile of the distance to the zero line (|nv| / |grad nv|, in pixels); the
    # +0.25 px^2 is the pixel footprint (anti-aliasing); the cap keeps exp() off subnormals.
    q = (nv * nv) / ((grad2 + f32(1e-8)) * (half_width_px * half_width_px + f32(0.25)))
    vessels = np.exp(-np.minimum(q, f32(30.0)))
    vessels *= f32(1.0) - blend("vessel_disruption") * np.clip(breaks * f32(2.0) + f32(0.5), 0.0, 1.0)

    # --- layer weights (alpha compositing with constant colours is linear in the colours) ---
    amp_map = f32(_BACKGROUND_AMP) + f32(1.0 - _BACKGROUND_AMP) * lesion
    pit_vis = f32(_BACKGROUND_AMP) + f32(latents["pit_visibility"] - _BACKGROUND_AMP) * lesion
    pit_a = f32(look.pit_amp) * amp_map * pit_vis * pits
    ves_a = f32(look.vessel_amp) * amp_map * vessels
    r2 = x * x + y * y
    shade = (f32(1.0) - f32(0.45) * r2) * (
        f32(1.0) + x * f32(light_amp * math.cos(light_dir)) + y * f32(light_amp * math.sin(light_dir))
    )
    shade *= f32(1.0) + f32(0.08) * lesion  # raised lesion catches more light
    fov = np.clip((f32(0.985) - np.sqrt(r2)) * f32(1.0 / (1.5 * px)), 0.0, 1.0)  # circular field of view
    shade *= fov
    w_vessel = ves_a * shade
    w_pit = pit_a * (shade - w_vessel)  # = pit_a * (1 - ves_a) * shade
    base = (shade - w_vessel - w_pit) * (f32(1.0) + f32(0.10) * texture)  # = (1-pit_a)(1-ves_a) shade tex
    w_lesion = base * (f32(0.7) * lesion)
    w_mucosa = base - w_lesion
    palette = np.array([look.mucosa, look.lesion, look.pit, look.vessel], dtype=np.float64)
    palette[:2] *= colour_jitter
    palette *= site.cast  # per-site white balance
    weights = np.stack([w_mucosa, w_lesion, w_pit, w_vessel]).reshape(4, -1)
    img = (palette.T.astype(f32) @ weights).reshape(3, size, size)  # [3, S, S]

    # --- optics and sensor: blur, specular glare, noise, brightness ---
    blur_px = (look.blur + site.blur) / px
    if blur_px >= 0.3:  # below a third of a pixel a blur changes nothing visible
        img = gaussian_filter(img, sigma=(0.0, blur_px, blur_px), mode="reflect", truncate=3.0)
    lo_n, hi_n = look.glare_count
    n_glare = int(rng.integers(lo_n, hi_n + 1))
    if n_glare:
        on_lesion = rng.uniform(size=n_glare) < look.glare_on_lesion
        gr = np.sqrt(rng.uniform(size=n_glare))
        ga = rng.uniform(0.0, 2.0 * math.pi, size=n_glare)
        gx0 = np.where(on_lesion, cx + 0.6 * a * gr * np.cos(ga), 0.85 * gr * np.cos(ga))
        gy0 = np.where(on_lesion, cy + 0.6 * b * gr * np.sin(ga), 0.85 * gr * np.sin(ga))
        gsize = rng.uniform(*look.glare_size, size=n_glare)
        gstretch = rng.uniform(1.0, 2.5, size=n_glare)
        gangle = rng.uniform(0.0, math.pi, size=n_glare)
        glare_rgb = (f32(0.98) * site.cast).astype(f32)[:, None, None]
        for k in range(n_glare):  # a handful of blobs, each vectorised over its bounding window
            reach = 3.0 * gsize[k] * gstretch[k]
            c0, c1 = _window(gx0[k], reach, size)
            r0, r1 = _window(gy0[k], reach, size)
            if c0 >= c1 or r0 >= r1:
                continue
            wx, wy = x[r0:r1, c0:c1] - f32(gx0[k]), y[r0:r1, c0:c1] - f32(gy0[k])
            c, s = math.cos(gangle[k]), math.sin(gangle[k])
            inv = 1.0 / (math.sqrt(2.0) * gsize[k])
            d2 = (wx * f32(c * inv / gstretch[k]) + wy * f32(s * inv / gstretch[k])) ** 2
            d2 += (wy * f32(c * inv) - wx * f32(s * inv)) ** 2
            alpha = np.clip(np.exp(-d2) * f32(1.8), 0.0, 1.0) * fov[r0:r1, c0:c1]
            patch = img[:, r0:r1, c0:c1]
            patch += alpha * (glare_rgb - patch)
    # Sensor noise (luminance) and brightness offset, inside the field of view only.
    lum = (rng.standard_normal((size, size), dtype=f32) * f32(look.noise) + f32(site.brightness)) * fov
    img += lum
    img *= f32(255.0)
    img += f32(0.5)
    np.clip(img, 0.0, 255.0, out=img)
    return np.ascontiguousarray(img.astype(np.uint8).transpose(1, 2, 0))


def _grad_sq(field: np.ndarray) -> np.ndarray:
    """Squared gradient magnitude [S, S] per pixel (central differences, one-sided at edges)."""
    gx = np.empty_like(field)
    np.subtract(field[:, 2:], field[:, :-2], out=gx[:, 1:-1])
    gx[:, 1:-1] *= 0.5
    gx[:, 0] = field[:, 1] - field[:, 0]
    gx[:, -1] = field[:, -1] - field[:, -2]
    gy = np.empty_like(field)
    np.subtract(field[2:], field[:-2], out=gy[1:-1])
    gy[1:-1] *= 0.5
    gy[0] = field[1] - field[0]
    gy[-1] = field[-1] - field[-2]
    gx *= gx
    gy *= gy
    gx += gy
    return gx


def _window(centre: float, reach: float, size: int) -> tuple[int, int]:
    """Pixel index range [lo, hi) covering ``centre +- reach`` (image half-width units)."""
    lo = int(math.floor((centre - reach + 1.0) * size / 2.0))
    hi = int(math.ceil((centre + reach + 1.0) * size / 2.0))
    return max(lo, 0), min(hi, size)


def _split_labels(spec: SyntheticSiteSpec, split: str) -> np.ndarray:
    """Labels of a split [N] int64, exact class proportions (largest remainder), shuffled."""
    n = spec.split_size(split)
    c = spec.num_classes
    weights = np.ones(c) if spec.class_weights is None else np.asarray(spec.class_weights, dtype=np.float64)
    share = weights / weights.sum() * n
    counts = np.floor(share).astype(np.int64)
    rng = np.random.default_rng(
        np.random.SeedSequence([_TAG_LABELS, int(spec.seed), _SPLIT_ID[split], _MODALITY_ID[spec.modality]])
    )
    remainder = n - int(counts.sum())
    if remainder:
        # Largest remainders first; ties broken at random so no class is always favoured.
        order = np.lexsort((rng.permutation(c), -(share - counts)))
        counts[order[:remainder]] += 1
    labels = np.repeat(np.arange(c, dtype=np.int64), counts)
    return rng.permutation(labels)


class SyntheticEndoscopyDataset(torch.utils.data.Dataset):
    """One split of a synthetic site. Item: (image, label).

    Without ``transform`` the image is a float tensor [3, S, S] in [0, 1]; with it,
    ``transform(PIL.Image)``. Images are rendered on access from the random stream
    ``(seed, split, modality, index)``: same inputs, same pixels; other seeds, splits or
    modalities never share an image. ``labels`` [N] int64 is known without rendering.
    """

    def __init__(self, spec: SyntheticSiteSpec, split: str, transform: Callable | None = None) -> None:
        self.spec = spec
        self.split = _check_split(split)
        self.transform = transform
        self.modality = spec.modality
        self.class_names = spec.class_names
        self.labels = _split_labels(spec, split)
        self._look = _LOOKS[spec.modality]
        self._site = _site_look(spec)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _rng(self, index: int) -> np.random.Generator:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a split of {n} images")
        index = index % n
        key = [_TAG_IMAGE, int(self.spec.seed), _SPLIT_ID[self.split], _MODALITY_ID[self.modality], index]
        return np.random.default_rng(np.random.SeedSequence(key))

    def latents(self, index: int) -> dict[str, float]:
        """The latent biology of image ``index`` (for analysis and tests; cheap, no rendering)."""
        return _draw_latents(self._rng(index), int(self.labels[index]), self.spec.num_classes)

    def render_array(self, index: int) -> np.ndarray:
        """Image ``index`` as a uint8 array [S, S, 3]."""
        rng = self._rng(index)
        latents = _draw_latents(rng, int(self.labels[index]), self.spec.num_classes)
        return _render(rng, latents, self.spec.image_size, self._look, self._site)

    def render(self, index: int) -> Image.Image:
        """Image ``index`` as an RGB PIL image of ``spec.image_size`` pixels."""
        return Image.fromarray(self.render_array(index), mode="RGB")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = int(self.labels[index])
        if self.transform is not None:
            return self.transform(self.render(index)), label
        arr = self.render_array(index)
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0), label


def _write_site_json(folder: Path, modality: str, class_names: Sequence[str], extra: dict | None = None) -> None:
    payload = {"modality": modality, "class_names": list(class_names)}
    if extra:
        payload.update(extra)
    (folder / SITE_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def write_image_folder(
    spec: SyntheticSiteSpec,
    root: str | os.PathLike,
    splits: Sequence[str] = SPLITS,
    *,
    overwrite: bool = False,
) -> Path:
    """Render a synthetic site to disk as ``root/<split>/<class>/<idx:05d>.png`` + ``root/site.json``.

    Written into a temporary folder next to ``root`` and renamed into place, so a reader never
    sees a half-written site. An existing ``root`` is an error unless it is empty, or
    ``overwrite=True`` and it holds a ``site.json`` (i.e. it is a site this function wrote).
    Returns ``root``.
    """
    root = Path(root)
    for split in splits:
        _check_split(split)
    if root.exists():
        if not root.is_dir():
            raise DataError(f"{root} exists and is not a folder; choose another root for write_image_folder")
        if any(root.iterdir()):
            if not overwrite:
                raise DataError(f"{root} already exists and is not empty; delete it or pass overwrite=True")
            if not (root / SITE_FILE).is_file():
                raise DataError(
                    f"{root} has no {SITE_FILE}, so it does not look like a site written by write_image_folder; "
                    "refusing to overwrite it: choose another root"
                )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        class_names = spec.class_names
        for split in splits:
            for name in class_names:
                (tmp / split / name).mkdir(parents=True, exist_ok=True)
            ds = SyntheticEndoscopyDataset(spec, split)
            for idx in range(len(ds)):
                ds.render(idx).save(tmp / split / class_names[int(ds.labels[idx])] / f"{idx:05d}.png")
        spec_dict = asdict(spec)
        spec_dict["class_weights"] = list(spec.class_weights) if spec.class_weights is not None else None
        _write_site_json(tmp, spec.modality, class_names, {"synthetic_spec": spec_dict})
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "site")
            os.replace(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


# --------------------------------------------------------------------------------------------
# Real sites
# --------------------------------------------------------------------------------------------


def load_image(path: Path) -> Image.Image:
    """Decode fully to 8-bit RGB (:func:`to_rgb`), or raise DataError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()  # the full decode: truncation shows here
            return to_rgb(im, path)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(
            f"cannot read image {path}: {err}; replace or delete this file "
            "(FolderSiteDataset.verify() lists the first bad file of a split)"
        ) from err


# PIL modes PIL's own convert("RGB") maps right (8 bits per channel, no alpha, no palette transparency).
_DIRECT_MODES = ("RGB", "L", "1", "CMYK", "YCbCr", "LAB", "HSV", "P", "RGBX")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
# Integer modes wider than 8 bits: scaled from their full 16-bit range (convert() would clip at 255).
_WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_rgb(image: Image.Image, path: str | Path = "image") -> Image.Image:
    """An image of any PIL mode a medical export produces, as 8-bit RGB with the right values.

    * 8-bit modes (RGB, L, 1, CMYK, YCbCr, P...): PIL's conversion (1 -> 0/255, CMYK -> RGB).
    * Alpha (RGBA, LA, a palette with a transparent entry): composited over black, the
      background of an endoscopy frame; ``convert("RGB")`` would show whatever colour the
      transparent pixels happen to hold.
    * 16-bit and 32-bit integer grayscale (I;16*, I): value v -> round(v * 255 / 65535) (the
      16-bit range; ``convert`` clips everything above 255 to white). Values outside
      0..65535 are refused: their range is not known.
    * Float grayscale (F): values in [0, 1] -> round(255 v); any other range is refused.
    Anything else raises :class:`DataError` naming the file and the mode.
    """
    mode = image.mode
    if mode == "P" and "transparency" in image.info:
        mode, image = "RGBA", image.convert("RGBA")
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    if mode in _DIRECT_MODES:
        return image.convert("RGB")
    if mode in _WIDE_INT_MODES or mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            low, high, scale = 0.0, 1.0, 255.0
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


def has_split(root: str | os.PathLike, split: str) -> bool:
    """Whether a real site folder holds images of ``split`` (in its ImageFolder sub-folder, or
    manifest rows with that split); used for the optional val split. Structure errors are left
    to the loader."""
    root = Path(root)
    manifest = root / MANIFEST_FILE
    if not manifest.is_file():
        folder = root / _check_split(split)
        return folder.is_dir() and any(_is_image(p) for p in folder.rglob("*"))
    try:
        with manifest.open(newline="") as fh:
            return any((row.get("split") or "").strip() == split for row in csv.DictReader(fh))
    except (UnicodeDecodeError, csv.Error):
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
        self.split = _check_split(split)
        self.class_names = tuple(class_names)
        self.transform = transform
        self.names_source = names_source  # said in errors: what the user changes to fix a class
        if len(self.class_names) < 2 or len(set(self.class_names)) != len(self.class_names):
            raise DataError(f"class_names={list(self.class_names)}: need at least 2 distinct class names")
        if expected_modality is not None:
            _check_modality(expected_modality, "expected_modality")
        if not self.root.is_dir():
            raise DataError(
                f"site data folder {self.root} does not exist (or is not a folder); point data-path at the "
                f"folder holding {'/'.join(SPLITS)}/<class>/ images or {MANIFEST_FILE}"
            )
        self.modality = self._read_modality(expected_modality)
        manifest = self.root / MANIFEST_FILE
        if manifest.is_file():
            paths, labels = self._scan_manifest(manifest)
        else:
            paths, labels = self._scan_folders()
        self.paths: list[Path] = paths
        self.labels = np.asarray(labels, dtype=np.int64)

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
        modality = _check_modality(str(meta["modality"]).lower(), str(site_file))
        declared = meta.get("class_names")
        # Order may differ (discovered names are sorted, a writer may list them in label order);
        # other names mean the declaration is stale.
        if declared is not None and sorted(map(str, declared)) != sorted(self.class_names):
            log.warning("%s declares class_names %s; using %s from %s", site_file, declared, list(self.class_names), self.names_source)
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
                log.warning("ignoring %s: images belong in %s/<class>/", entry, split_dir)
                continue
            if entry.name not in index:
                raise self._class_error(entry.name, f"class folder {entry}")
            files = sorted(p for p in entry.iterdir() if _is_image(p))
            found[entry.name] = len(files)
            paths.extend(files)
            labels.extend([index[entry.name]] * len(files))
        if not paths:
            raise DataError(
                f"no images in {split_dir}: expected {split_dir}/<class>/*.png|jpg "
                f"with classes {list(self.class_names)}"
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
        """Rows of this split from a manifest as spreadsheet tools save it: a UTF-8 BOM, CRLF
        line ends, ``,`` ``;`` or tab as the delimiter, quoted cells, blank cells and rows
        around the data are all read as meant. An image listed twice (in one split or in two:
        a training image must never be evaluated) is refused with both lines."""
        index = {name: i for i, name in enumerate(self.class_names)}
        paths: list[Path] = []
        labels: list[int] = []
        counts = [0] * len(self.class_names)
        seen: dict[Path, tuple[int, str]] = {}  # every row's image, any split: (line, split)
        try:
            text = manifest.read_text(encoding="utf-8-sig")
            first = next((line for line in text.splitlines() if line.strip()), "")
            delimiter = max((",", ";", "\t"), key=first.count)
            reader = csv.reader(text.splitlines(), delimiter=delimiter)
            rows = [(n, [cell.strip() for cell in row]) for n, row in enumerate(reader, start=1)]
        except UnicodeDecodeError as err:
            raise DataError(f"{manifest} is not a UTF-8 text CSV ({err}); re-save it as CSV (UTF-8)") from err
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
                f"{manifest} line {header_line}: missing column(s) {missing}; found {header} (delimiter {delimiter!r}). "
                f"The header must be {','.join(MANIFEST_COLUMNS)}"
            )
        column = {name: header.index(name) for name in MANIFEST_COLUMNS}
        for line_no, row in rows[1:]:
            where = f"{manifest} line {line_no}"
            cell = {name: row[i] if i < len(row) else "" for name, i in column.items()}
            split = cell["split"].lower()
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
            path = self.root / rel
            key = path.resolve()
            if key in seen:
                other_line, other_split = seen[key]
                what = f"in both '{other_split}' and '{split}'" if other_split != split else f"twice in '{split}'"
                raise DataError(f"{where}: image {path} is listed {what} (line {other_line} too); list each image once"
                                + (": a training image must never be evaluated" if other_split != split else ""))
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


# --------------------------------------------------------------------------------------------
# Transforms and sampling
# --------------------------------------------------------------------------------------------


def build_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> float tensor [3, S, S]: resized and normalised with ImageNet mean/std.

    The same for training and evaluation; training augmentation runs on whole batches,
    on the training device (:class:`BatchAugment`), not per image in the loader.
    """
    from torchvision.transforms import v2  # after `import common` (compat shim)

    if image_size < 1:
        raise DataError(f"image_size={image_size}: must be >= 1")
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize((image_size, image_size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class BatchAugment(torch.nn.Module):
    """Endoscopy augmentation of a normalised batch [B, 3, H, W], as tensor ops on its device.

    Endoscopes have no canonical "up", so orientation is augmented, in one of two ways:

    * ``dihedral`` (default): one of the 8 exact 90-degree rotations / flips per image. Nothing is
      interpolated, so the fine texture that carries the class (pits of a ~5 px period, vessels
      under 1.5 px wide at 64 px) is kept exactly.
    * ``rotate``: any angle within +-``rotation_deg`` and random flips, one ``affine_grid`` +
      bilinear ``grid_sample`` (corners fill black, like the dark rim of the field of view). At
      64 px this removes about 62 % of an image's Laplacian energy; it is the paper's 448-px
      augmentation, kept for ``preset=paper``.

    Then brightness / contrast / saturation jitter by factors in [1 - color_jitter, 1 +
    color_jitter]. Hue is left alone: hue shifts change the tissue colour that carries the
    diagnosis. Per-image randomness comes from the ``generator`` (CPU), so a seeded run is
    reproducible on any device.
    """

    MODES = ("dihedral", "rotate")

    def __init__(self, rotation_deg: float = 180.0, flips: bool = True, color_jitter: float = 0.1, mode: str = "dihedral"):
        super().__init__()
        if mode not in self.MODES:
            raise DataError(f"augmentation mode {mode!r} is not one of {list(self.MODES)}")
        self.rotation_deg, self.flips, self.color_jitter, self.mode = rotation_deg, flips, color_jitter, mode
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def dihedral(pixels: torch.Tensor, turns: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] (H == W), turns [B] in 0..3 quarter turns, flip [B] bool -> [B, 3, H, W]."""
        out = pixels.clone()
        for k in range(1, 4):
            chosen = turns == k
            if chosen.any():
                out[chosen] = torch.rot90(pixels[chosen], k, dims=(2, 3))
        out[flip] = out[flip].flip(3)
        return out

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        batch = images.shape[0]
        mean, std = self.mean.to(images), self.std.to(images)

        def uniform(low: float, high: float) -> torch.Tensor:
            return (torch.rand(batch, generator=generator) * (high - low) + low).to(images)

        pixels = images * std + mean  # [0, 1]: black fill and jitter act on real intensities
        if self.mode == "dihedral":
            turns = torch.randint(0, 4, (batch,), generator=generator).to(images.device)
            flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device) if self.flips else torch.zeros(
                batch, dtype=torch.bool, device=images.device)
            pixels = self.dihedral(pixels, turns, flip)
        else:
            angle = uniform(-1.0, 1.0) * torch.pi * self.rotation_deg / 180.0
            flip_x = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if self.flips else torch.ones_like(angle)
            flip_y = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if self.flips else torch.ones_like(angle)
            cos, sin = torch.cos(angle), torch.sin(angle)
            zero = torch.zeros_like(angle)
            theta = torch.stack(
                [torch.stack([cos * flip_x, -sin * flip_y, zero], 1), torch.stack([sin * flip_x, cos * flip_y, zero], 1)], 1
            )  # [B, 2, 3]
            grid = torch.nn.functional.affine_grid(theta, list(pixels.shape), align_corners=False)
            pixels = torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if self.color_jitter > 0:
            low, high = 1.0 - self.color_jitter, 1.0 + self.color_jitter
            luma = self.luma.to(pixels)
            pixels = pixels * uniform(low, high).view(-1, 1, 1, 1)  # brightness
            mean_gray = (pixels * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
            pixels = (pixels - mean_gray) * uniform(low, high).view(-1, 1, 1, 1) + mean_gray  # contrast
            gray = (pixels * luma).sum(1, keepdim=True)
            pixels = gray + (pixels - gray) * uniform(low, high).view(-1, 1, 1, 1)  # saturation
        return (pixels.clamp(0, 1) - mean) / std


class ClassBalancedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches with ~``batch_size / C`` images of each present class (PaGKD's class groups).

    Each class is drawn from its own reshuffled, cycled permutation: every image is used once
    before any repeats, and small classes repeat (sampling with replacement across passes).
    When ``batch_size`` is not a multiple of C, the extra slots go to random classes. The
    order depends only on ``(seed, epoch)``; call :meth:`set_epoch` each epoch.
    ``num_batches`` defaults to ``ceil(N / batch_size)``.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        batch_size: int,
        seed: int = 0,
        num_batches: int | None = None,
    ) -> None:
        labels_np = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
        if labels_np.size == 0:
            raise DataError("ClassBalancedBatchSampler: labels is empty; the split has no images")
        if batch_size < 1:
            raise DataError(f"ClassBalancedBatchSampler: batch_size={batch_size} must be >= 1")
        if num_batches is not None and num_batches < 0:
            raise DataError(f"ClassBalancedBatchSampler: num_batches={num_batches} must be >= 0")
        self.labels = labels_np
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.epoch = 0
        self.classes = np.unique(labels_np)
        self._members = [np.flatnonzero(labels_np == c) for c in self.classes]
        self.num_batches = int(math.ceil(labels_np.size / batch_size)) if num_batches is None else int(num_batches)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch]))
        k = len(self.classes)
        base, extra = divmod(self.batch_size, k)
        queues = [np.empty(0, dtype=np.int64) for _ in range(k)]
        cursors = [0] * k
        for _ in range(self.num_batches):
            per_class = np.full(k, base)
            if extra:
                per_class[rng.choice(k, size=extra, replace=False)] += 1
            batch = []
            for i in range(k):
                need = int(per_class[i])
                while queues[i].size - cursors[i] < need:  # refill with a fresh permutation
                    queues[i] = np.concatenate([queues[i][cursors[i]:], rng.permutation(self._members[i])])
                    cursors[i] = 0
                batch.append(queues[i][cursors[i]:cursors[i] + need])
                cursors[i] += need
            yield [int(j) for j in rng.permutation(np.concatenate(batch))]
