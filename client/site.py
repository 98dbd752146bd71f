"""A site's identity and local data, resolved from its node config and the run config.

Three ways a SuperNode becomes a site, checked in this order:
1. Deployment: node config ``site-name``, ``modality`` (wli|nbi) and ``data-path`` (an
   ImageFolder tree or CSV manifest, see :class:`common.data.FolderSiteDataset`).
2. Simulation on real data: ``partition-id`` picks the i-th ``[[site]]`` of
   ``<data.root>/sites.toml`` (``name``, ``modality``, ``path`` relative to the root).
3. Simulation on the embedded default: ``partition-id`` picks a built-in synthetic site;
   the first ``data.nbi_sites`` partitions are NBI, the next ``data.wli_sites`` are WLI.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torch.utils.data import Dataset

from common.config import Config, parse_class_names
from common.data import (
    DataError,
    FolderSiteDataset,
    SyntheticEndoscopyDataset,
    SyntheticSiteSpec,
    build_transform,
    class_names_source,
    default_class_names,
    has_split,
    discover_class_names,
    normalise_modality,
)

SITES_FILE = "sites.toml"


@dataclass
class SiteData:
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
            num_train=max(d.num_classes * 2, int(round(d.train_per_site * min(scale, 20.0) * (d.nbi_train_scale if modality == "nbi" else 1.0)))),
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


def _synthetic_site(name: str, spec: SyntheticSiteSpec, image_size: int) -> SiteData:
    return SiteData(
        name=name,
        modality=spec.modality,
        train=SyntheticEndoscopyDataset(spec, "train", build_transform(image_size)),
        test=SyntheticEndoscopyDataset(spec, "test", build_transform(image_size)),
        class_names=spec.class_names,
        val=SyntheticEndoscopyDataset(spec, "val", build_transform(image_size)),
    )


def run_class_names(cfg: Config) -> tuple[str, ...]:
    """The run's class names: ``data.class_names`` when set, else the synthetic defaults for
    ``data.num_classes`` (what a real site's discovered names are compared against)."""
    return parse_class_names(cfg.data.class_names) or default_class_names(cfg.data.num_classes)


def site_class_names(root: str | Path, cfg: Config) -> tuple[tuple[str, ...], str]:
    """(class names, where they came from) of a real site: ``data.class_names`` when set, else
    discovered from its folders or manifest (:func:`common.data.discover_class_names`), else
    (a manifest of class indices) the defaults for ``data.num_classes``."""
    configured = parse_class_names(cfg.data.class_names)
    if configured:
        return configured, class_names_source(configured)
    found = discover_class_names(root)
    if found is None:
        return default_class_names(cfg.data.num_classes), f"the default names for data.num_classes={cfg.data.num_classes}"
    return found, class_names_source((), root)


def folder_site(name: str, modality: str, data_path: str | Path, cfg: Config) -> SiteData:
    """A real site's data; structure errors raise :class:`DataError` naming the path."""
    modality = normalise_modality(modality, f"site '{name}' (its node config or {SITES_FILE} entry)")
    root = Path(data_path)
    names, source = site_class_names(root, cfg)
    size = cfg.data.image_size

    def split(split_name: str) -> FolderSiteDataset:
        return FolderSiteDataset(root, split_name, names, build_transform(size), expected_modality=modality, names_source=source)

    val = split("val") if has_split(root, "val") else None
    return SiteData(name, modality, split("train"), split("test"), names, val)


def read_sites_file(root: str | Path) -> list[dict[str, str]]:
    """``<root>/sites.toml``: ``[[site]]`` tables with ``name``, ``modality`` and ``path``."""
    path = Path(root) / SITES_FILE
    if not path.is_file():
        raise DataError(f"data.root '{root}' has no {SITES_FILE}; create one with a [[site]] table per site")
    try:
        entries = tomllib.loads(path.read_text()).get("site", [])
    except tomllib.TOMLDecodeError as err:
        raise DataError(f"{path}: not valid TOML ({err})") from err
    names: dict[str, int] = {}
    folders: dict[Path, int] = {}
    for number, entry in enumerate(entries, start=1):
        missing = {"name", "modality", "path"} - set(entry)
        if missing:
            raise DataError(f"{path}: [[site]] number {number} lacks {sorted(missing)}")
        # One name per site (metrics, egress and DP releases are kept per name) and one site
        # per folder (two entries for one folder would count the same images twice).
        name, folder = str(entry["name"]), (Path(root) / str(entry["path"])).resolve()
        if name in names:
            raise DataError(f"{path}: [[site]] number {number} reuses the name '{name}' of number {names[name]}; give each site a unique name")
        if folder in folders:
            raise DataError(f"{path}: [[site]] number {number} ('{name}') has the same folder {folder} as number "
                            f"{folders[folder]}; one site per folder (merge the entries or point each at its own data)")
        names[name], folders[folder] = number, number
    return entries


def federation_sites(cfg: Config) -> list[SiteData]:
    """Every site of the run's federation, in partition order: the embedded synthetic one, or
    the ``[[site]]`` entries of ``<data.root>/sites.toml`` (what benchmarks pool centrally)."""
    if cfg.data.root:
        return [folder_site(e["name"], e["modality"], Path(cfg.data.root) / e["path"], cfg) for e in read_sites_file(cfg.data.root)]
    return [_synthetic_site(name, spec, cfg.data.image_size) for name, spec in synthetic_site_specs(cfg)]


def resolve_site(node_config: Mapping[str, Any], cfg: Config) -> SiteData:
    """Resolve this SuperNode's site (see the module docstring for the three ways)."""
    if "data-path" in node_config:
        name = str(node_config.get("site-name", "site"))
        if "modality" not in node_config:
            raise DataError(f"site '{name}': node config lacks 'modality' (wli or nbi)")
        return folder_site(name, str(node_config["modality"]), str(node_config["data-path"]), cfg)
    if "partition-id" not in node_config:
        raise DataError(
            "node config has neither 'data-path' (deployment) nor 'partition-id' (simulation); "
            "start the SuperNode with --node-config \"site-name='...' modality='nbi' data-path='/data'\""
        )
    partition = int(node_config["partition-id"])
    if cfg.data.root:
        entries = read_sites_file(cfg.data.root)
        if partition >= len(entries):
            raise DataError(
                f"partition {partition} has no site: {Path(cfg.data.root) / SITES_FILE} lists {len(entries)}; "
                f"run with num-supernodes={len(entries)}"
            )
        entry = entries[partition]
        return folder_site(entry["name"], entry["modality"], Path(cfg.data.root) / entry["path"], cfg)
    specs = synthetic_site_specs(cfg)
    if partition >= len(specs):
        raise DataError(
            f"partition {partition} has no site: the run config defines data.nbi_sites + data.wli_sites = {len(specs)} "
            f"sites; set num-supernodes={len(specs)} or raise those counts"
        )
    name, spec = specs[partition]
    return _synthetic_site(name, spec, cfg.data.image_size)
