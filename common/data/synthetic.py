"""The embedded synthetic federation: endoscopy-like NBI/WLI images rendered on demand.

* :class:`SyntheticSiteSpec`: one site (modality, split sizes, class balance, rendering shift,
  seed, image size S, class names).
* :class:`SyntheticEndoscopyDataset`: one split of a site; item ``(image, label)``, the image a
  float tensor [3, S, S] in [0, 1] (or ``transform(PIL.Image)``). Each image draws a latent
  lesion "biology" (pit and vessel pattern parameters, :data:`LATENT_NAMES`) from
  class-conditional distributions that overlap, then renders it as NBI (high contrast, crisp)
  or WLI (faint, blurred, noisy, partly hidden by glare). Nothing is paired: every image has
  its own random stream ``(seed, split, modality, index)``.
* :func:`severity_posterior`: the Bayes posterior p(class | severity) [N, C], the task's ceiling.
* :func:`write_image_folder`: a site rendered to disk as an ImageFolder tree + ``site.json``.
* :func:`synthetic_site_specs` / :func:`synthetic_site`: the federation a run config describes
  (``data.nbi_sites`` NBI sites, then ``data.wli_sites`` WLI sites) and one site's
  :class:`~common.data.base.SiteData`.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from common.config import Config, parse_class_names
from common.data.base import MODALITIES, SITE_FILE, SPLITS, DataError, SiteData, check_modality, check_split, default_class_names
from common.data.batching import build_transform
from common.data.folders import write_site_json

_SPLIT_ID = {name: i for i, name in enumerate(SPLITS)}
_MODALITY_ID = {name: i for i, name in enumerate(MODALITIES)}
# Domain tags keep the random streams of images, label lists and site looks disjoint even
# when the other seed words coincide.
_TAG_IMAGE, _TAG_LABELS, _TAG_SITE = 0x1A6E, 0x1AB1, 0x517E


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
        check_modality(self.modality, "SyntheticSiteSpec.modality")
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
                raise DataError(f"SyntheticSiteSpec.class_weights={weights}: weights must be finite, >= 0 and not all 0")
            object.__setattr__(self, "class_weights", weights)
        if not 0.0 <= float(self.render_shift) <= 1.0:
            raise DataError(f"SyntheticSiteSpec.render_shift={self.render_shift!r}: must lie in [0, 1]")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise DataError(f"SyntheticSiteSpec.seed={self.seed!r}: must be an int >= 0")
        if not isinstance(self.image_size, (int, np.integer)) or self.image_size < 16:
            raise DataError(f"SyntheticSiteSpec.image_size={self.image_size!r}: must be an int >= 16")

    def split_size(self, split: str) -> int:
        return int(getattr(self, f"num_{check_split(split)}"))

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
    # WLI images stayed at chance (docs/results.md), i.e. WLI showed nothing rather than "faint".
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
        self.split = check_split(split)
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
        check_split(split)
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
        write_site_json(tmp, spec.modality, class_names, {"synthetic_spec": spec_dict})
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
# The federation of a run config
# --------------------------------------------------------------------------------------------


def synthetic_site_specs(cfg: Config) -> list[tuple[str, SyntheticSiteSpec]]:
    """The embedded federation: (site name, spec) per partition, NBI sites first.

    Sizes follow a Pareto tail (``data.size_tail``), class balance a Dirichlet
    (``data.class_alpha``) and rendering a per-site shift, all drawn from ``train.seed``.
    """
    d = cfg.data
    rng = np.random.default_rng([cfg.train.seed, 104729])
    sites = []
    for index in range(d.nbi_sites + d.wli_sites):
        modality = "nbi" if index < d.nbi_sites else "wli"
        number = index if modality == "nbi" else index - d.nbi_sites
        scale = 1.0 + (rng.pareto(d.size_tail) if d.size_tail > 0 else 0.0)
        weights = tuple(rng.dirichlet([d.class_alpha] * d.num_classes)) if d.class_alpha > 0 else None
        spec = SyntheticSiteSpec(
            modality=modality,
            num_train=max(
                d.num_classes * 2,
                int(round(d.train_per_site * min(scale, 20.0) * (d.nbi_train_scale if modality == "nbi" else 1.0))),
            ),
            num_val=d.val_per_site,
            num_test=d.test_per_site,
            num_classes=d.num_classes,
            class_weights=weights,
            render_shift=float(rng.uniform(0, d.render_shift)) if d.render_shift > 0 else 0.0,
            seed=cfg.train.seed * 1000 + index,
            image_size=d.image_size,
            names=parse_class_names(d.class_names) or None,
        )
        sites.append((f"{modality}-{number}", spec))
    return sites


def synthetic_site(name: str, spec: SyntheticSiteSpec, image_size: int) -> SiteData:
    """One synthetic site's train / val / test splits, each resized and normalised for ``image_size``."""
    return SiteData(
        name=name,
        modality=spec.modality,
        train=SyntheticEndoscopyDataset(spec, "train", build_transform(image_size)),
        test=SyntheticEndoscopyDataset(spec, "test", build_transform(image_size)),
        class_names=spec.class_names,
        val=SyntheticEndoscopyDataset(spec, "val", build_transform(image_size)),
    )
