"""A site's identity and local data, resolved from its node config and the run config.

Three ways a SuperNode becomes a site, checked in this order:
1. Deployment: node config ``site-name``, ``modality`` (wli|nbi) and ``data-path`` (an
   ImageFolder tree or CSV manifest, see :class:`common.data.FolderSiteDataset`).
2. Simulation on real data: ``partition-id`` picks the i-th ``[[site]]`` of
   ``<data.root>/sites.toml`` (``name``, ``modality``, ``path`` relative to the root).
3. Simulation on the embedded default: ``partition-id`` picks a built-in synthetic site;
   the first ``data.nbi_sites`` partitions are NBI, the next ``data.wli_sites`` are WLI
   (:func:`common.data.synthetic_site_specs`); a simulation with another SuperNode count splits
   its SuperNodes half NBI, half WLI (:func:`embedded_federation`).

Each way gives a :class:`common.data.SiteData` (name, modality, class names, train / val /
test datasets). Also here: ``sites.toml`` (:func:`read_sites_file`) and a real site's class
names (:func:`site_class_names`).
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, Mapping

from common.config import Config, parse_class_names
from common.data import (
    DataError,
    FolderSiteDataset,
    SiteData,
    build_transform,
    check_site_name,
    class_names_source,
    default_class_names,
    discover_class_names,
    has_split,
    normalise_modality,
    synthetic_site,
    synthetic_site_specs,
)

SITES_FILE = "sites.toml"


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
        name = check_site_name(entry["name"], f"{path}: [[site]] number {number}")
        folder = (Path(root) / str(entry["path"])).resolve()
        if name in names:
            raise DataError(
                f"{path}: [[site]] number {number} reuses the name '{name}' of number {names[name]}; give each site a unique name"
            )
        if folder in folders:
            raise DataError(
                f"{path}: [[site]] number {number} ('{name}') has the same folder {folder} as number "
                f"{folders[folder]}; one site per folder (merge the entries or point each at its own data)"
            )
        names[name], folders[folder] = number, number
    return entries


def federation_sites(cfg: Config) -> list[SiteData]:
    """Every site of the run's federation, in partition order: the embedded synthetic one, or
    the ``[[site]]`` entries of ``<data.root>/sites.toml`` (what benchmarks pool centrally)."""
    if cfg.data.root:
        return [
            folder_site(e["name"], e["modality"], Path(cfg.data.root) / e["path"], cfg) for e in read_sites_file(cfg.data.root)
        ]
    return [synthetic_site(name, spec, cfg.data.image_size) for name, spec in synthetic_site_specs(cfg)]


def partition_id(node_config: Mapping[str, Any], sites: int, where: str) -> int:
    """The node config's ``partition-id`` as an index into the ``sites`` sites of ``where``.
    Anything but an integer in 0..sites-1 is refused: -1 would silently be the last site
    (Python indexing) and 'abc' a bare ValueError."""
    raw = node_config["partition-id"]
    text = str(raw).strip() if isinstance(raw, (int, str)) and not isinstance(raw, bool) else ""
    if not text.isdigit() or not text.isascii():
        raise DataError(
            f"node config partition-id={raw!r} is not a partition number: give an integer in 0..{sites - 1}, one per site "
            f"of {where} (e.g. --node-config 'partition-id=0')"
        )
    partition = int(text)
    if partition >= sites:
        raise DataError(
            f"partition {partition} has no site: {where} has {sites}; run with num-supernodes={sites} "
            f"(partition ids 0..{sites - 1})"
        )
    return partition


def embedded_federation(cfg: Config, num_partitions: Any) -> Config:
    """The run config whose embedded federation has one site per SuperNode of the simulation.

    ``data.nbi_sites`` + ``data.wli_sites`` as configured when Flower's ``num-partitions`` is that
    count (what ``server.launch`` starts); otherwise the SuperNodes split half NBI (rounded down),
    half WLI, so ``flwr run .`` runs with Flower's default local federation (2 SuperNodes: 1 + 1)
    or any count of at least 2. Every site derives the same split from the same two numbers."""
    try:
        count = int(num_partitions)
    except (TypeError, ValueError):
        return cfg
    if count < 2 or count == cfg.data.nbi_sites + cfg.data.wli_sites:
        return cfg
    nbi = count // 2
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, nbi_sites=nbi, wli_sites=count - nbi))


def resolve_site(node_config: Mapping[str, Any], cfg: Config) -> SiteData:
    """Resolve this SuperNode's site (see the module docstring for the three ways)."""
    if "data-path" in node_config:
        name = check_site_name(str(node_config.get("site-name", "site")), "node config site-name")
        if "modality" not in node_config:
            raise DataError(f"site '{name}': node config lacks 'modality' (wli or nbi)")
        return folder_site(name, str(node_config["modality"]), str(node_config["data-path"]), cfg)
    if "partition-id" not in node_config:
        raise DataError(
            "node config has neither 'data-path' (deployment) nor 'partition-id' (simulation); "
            "start the SuperNode with --node-config \"site-name='...' modality='nbi' data-path='/data'\""
        )
    if cfg.data.root:
        entries = read_sites_file(cfg.data.root)
        entry = entries[partition_id(node_config, len(entries), str(Path(cfg.data.root) / SITES_FILE))]
        return folder_site(entry["name"], entry["modality"], Path(cfg.data.root) / entry["path"], cfg)
    specs = synthetic_site_specs(embedded_federation(cfg, node_config.get("num-partitions")))
    name, spec = specs[partition_id(node_config, len(specs), "the run config's data.nbi_sites + data.wli_sites")]
    return synthetic_site(name, spec, cfg.data.image_size)
