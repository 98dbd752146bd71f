"""Discovery: what each site declares (:class:`SiteInfo`) and the rules a federation must
meet before anything else is asked of it.

A ``metadata`` reply becomes a :class:`SiteInfo` (modality, class names, class counts per split,
version, its count of statistics releases, the files it did not read) unless its name, protocol or modality is wrong (:func:`refusal`); sites sharing one name are
all dropped (:func:`duplicate_names`); the run needs enough sites per modality
(:func:`missing_sites`) and one list of class names all sites share (:func:`agreed_class_names`).
Every refusal says which sites and what to fix. :func:`declaration_warnings` names each site
that did not read some of its files and each whose declared size is out of line with the
others'. Nothing here talks to the grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

from client.site import run_class_names
from common.config import Config, parse_class_names
from common.data import SITE_NAME_RE
from common.data.base import SITE_NAME_RULE
from common.records import PROTOCOL_VERSION, Payload, metadata_class_names, metadata_skipped

log = logging.getLogger("fedpagkd.server")


class FederationError(RuntimeError):
    """The run cannot go on (too few usable sites); the message says which and why."""


@dataclass
class SiteInfo:
    node_id: int
    name: str
    modality: str
    train_counts: list[int]
    test_counts: list[int]
    version: str
    val_counts: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    releases: int = 0  # statistics releases the site counted for this run (0: it keeps no count)
    skipped_files: dict[str, int] = field(default_factory=dict)  # {reason: files} it did not read

    def declared(self) -> dict[str, list[int]]:
        """[C] class counts per split (``train``, ``test``...), as declared at discovery."""
        return {f.name.removesuffix("_counts"): getattr(self, f.name) for f in fields(self) if f.name.endswith("_counts")}

    @classmethod
    def from_metadata(cls, node_id: int, reply: Payload) -> "SiteInfo":
        return cls(
            node_id=node_id,
            name=reply.config["site-name"],
            modality=reply.config["modality"],
            train_counts=reply.arrays["train_class_counts"].tolist(),
            test_counts=reply.arrays["test_class_counts"].tolist(),
            version=reply.config["version"],
            val_counts=reply.arrays["val_class_counts"].tolist(),
            class_names=list(metadata_class_names(reply)),
            releases=reply.config["releases"],
            skipped_files=metadata_skipped(reply),
        )


def declaration_warnings(sites: dict[int, SiteInfo], max_share: float) -> list[str]:
    """One line per site that did not read some of its files (they change the class counts it
    declares) and per site whose declared training images are over ``max_share`` of its
    modality's: nothing can check a declared size, so its weight in every aggregate is capped
    there (``fed.max_site_share``, :func:`server.aggregation.capped_shares`)."""
    lines = []
    for info in sites.values():
        if info.skipped_files:
            reasons = "; ".join(f"{reason}: {n}" for reason, n in sorted(info.skipped_files.items()))
            lines.append(f"site '{info.name}' did not read {sum(info.skipped_files.values())} file(s): {reasons}")
    for modality in ("nbi", "wli"):
        same = [s for s in sites.values() if s.modality == modality]
        total = sum(sum(s.train_counts) for s in same)
        for info in same:
            share = sum(info.train_counts) / total if total else 0.0
            if len(same) > 1 and share > max_share:
                lines.append(
                    f"site '{info.name}' declares {sum(info.train_counts)} training image(s), {share:.0%} of the "
                    f"{modality.upper()} sites' {total}: its weight in every aggregate is capped at "
                    f"fed.max_site_share = {max_share:.0%} (or 1/sites, whichever is larger)"
                )
    return lines


def refusal(reply: Payload, info: SiteInfo) -> str | None:
    """Why a site's metadata is refused (another protocol version, an unknown modality, a name
    outside the safe set: it would be written into every log line and record about the site), or None."""
    if not SITE_NAME_RE.fullmatch(info.name):
        return f"site name {info.name!r} is not allowed: set a site-name of {SITE_NAME_RULE} in its node config or sites.toml"
    if reply.config["protocol"] != PROTOCOL_VERSION:
        return f"protocol {reply.config['protocol']}, server speaks {PROTOCOL_VERSION}; upgrade the site"
    if info.modality not in ("nbi", "wli"):
        return f"unknown modality '{info.modality}'"
    return None


def duplicate_names(sites: dict[int, SiteInfo]) -> dict[int, str]:
    """The reason for each node whose site name another node also uses: they are all dropped
    (their metrics, egress and DP releases would merge under one name, and none of them can be
    told apart from the others)."""
    by_name: dict[str, list[int]] = {}
    for node_id, info in sites.items():
        by_name.setdefault(info.name, []).append(node_id)
    reasons = {}
    for name, nodes in by_name.items():
        if len(nodes) < 2:
            continue
        for node_id in nodes:
            reasons[node_id] = (
                f"{len(nodes)} SuperNodes (node ids {sorted(nodes)}) call themselves '{name}'; "
                "give each site a unique site-name (node config or sites.toml)"
            )
    return reasons


def missing_sites(sites: dict[int, SiteInfo], cfg: Config, needs_teacher: bool) -> list[str]:
    """``"NBI: 1 of 2 needed"`` for each modality with fewer sites than the run needs (NBI sites
    only when the run trains a teacher)."""
    missing = []
    for modality, minimum in (("nbi", cfg.fed.min_nbi_sites), ("wli", cfg.fed.min_wli_sites)):
        if modality == "nbi" and not needs_teacher:
            continue
        have = sum(s.modality == modality for s in sites.values())
        if have < minimum:
            missing.append(f"{modality.upper()}: {have} of {minimum} needed")
    return missing


def agreed_class_names(sites: dict[int, SiteInfo], cfg: Config) -> tuple[str, ...]:
    """The class names every discovered site reported, checked against the run's.

    With ``data.class_names`` set, sites map their folders to those names (a site with
    other folders refuses with its own error); with it empty, each site discovers its
    names, so they must agree with each other and number ``data.num_classes``. Raises a
    :class:`FederationError` listing every site's names and the fix."""
    found = {s.name: tuple(s.class_names) for s in sites.values()}
    listing = "; ".join(f"'{name}': {list(names)}" for name, names in found.items())
    configured = parse_class_names(cfg.data.class_names)
    distinct = sorted(set(found.values()))
    if len(distinct) > 1:
        raise FederationError(
            f"the sites disagree on the class names ({listing}). Give every site the same class folders "
            "(or manifest labels): rename or remove the odd ones at the sites that differ, or set "
            "data.class_names='name1,name2,...' on the run so every site is checked against one list"
        )
    agreed = distinct[0] if distinct else run_class_names(cfg)
    expected = configured or run_class_names(cfg)
    if configured and agreed != configured:
        raise FederationError(
            f"the sites report class names {list(agreed)} but the run's data.class_names is "
            f"{list(configured)} ({listing}); make them the same (order included)"
        )
    if not configured and len(agreed) != cfg.data.num_classes:
        raise FederationError(
            f"the sites have {len(agreed)} classes {list(agreed)} but the run expects data.num_classes="
            f"{cfg.data.num_classes} ({list(expected)}); run with data.class_names='{','.join(agreed)}' "
            "(data.num_classes then follows)"
        )
    if agreed != expected:
        log.info("[discover] class names from the sites: %s", list(agreed))
    return agreed
