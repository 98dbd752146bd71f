"""A hospital's data check before joining, the launcher's real-data preflight, and the
synthetic federation written as ImageFolder trees for rehearsals.

    fedpagkd check-site /data/hospital-a --modality nbi [--class-names a,b] [--strict]
    fedpagkd check-site --root /data/federation          # every site of <root>/sites.toml
    fedpagkd write-synthetic /data/rehearsal [data.nbi_sites=2 data.wli_sites=2 ...]

:func:`check_site` collects every problem of a site (structure: folders, splits, class names,
modality declarations; with ``decode``: each unreadable image, odd modes and sizes) instead of
stopping at the first, each with its path and its fix. Problems stop a run (exit 1); warnings
(an odd image mode, a test split without a class) are printed and only stop with ``--strict``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

import common  # noqa: F401  (torchvision shim)
from client.site import SITES_FILE, read_sites_file, site_class_names
from common.config import Config, ConfigError, config_from_flat
from common.files import atomic_write_bytes
from common.data import (
    MANIFEST_FILE,
    SITE_FILE,
    SPLITS,
    DataError,
    FolderSiteDataset,
    load_image,
    normalise_modality,
    synthetic_site_specs,
    write_image_folder,
)
from common.progress import progress

REQUIRED_SPLITS = ("train", "test")  # val is optional: sites train on train and are scored on test
# Modes that hold more than 8 bits per channel: PIL's convert("RGB") clips them.
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
MIN_SIDE = 16


@dataclass
class SiteReport:
    """What a check found at one site; ``counts`` maps split -> images per class [C]."""

    name: str
    path: Path
    modality: str | None  # as declared in the node config / sites.toml (normalised)
    class_names: tuple[str, ...] = ()
    names_source: str = ""
    counts: dict[str, list[int]] = field(default_factory=dict)
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    modes: Counter = field(default_factory=Counter)  # PIL mode -> images
    decoded: int = 0
    skipped: Counter = field(default_factory=Counter)  # files of the site's folders not read, by reason
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if text not in self.problems:  # one structural fault can surface in every split
            self.problems.append(text)


def _declared_modality(root: Path) -> str:
    """The modality ``site.json`` declares ('-' without one), for the table."""
    try:
        return str(json.loads((root / SITE_FILE).read_text()).get("modality", "-")).lower()
    except (OSError, ValueError, AttributeError):
        return "-"


def check_site(path: str | Path, modality: str | None, cfg: Config, name: str | None = None, decode: bool = False) -> SiteReport:
    """Check one site's folder (ImageFolder tree or manifest) without raising; see the report."""
    root = Path(path)
    report = SiteReport(name or root.name, root, None)
    if modality is not None:
        try:
            report.modality = normalise_modality(modality, f"site '{report.name}' modality")
        except DataError as err:
            report.problem(f"{err} (in its node config or {SITES_FILE} entry)")
    if not root.is_dir():
        report.problem(
            f"{root} does not exist or is not a folder: point the site's path at the folder holding "
            f"{'/'.join(SPLITS)}/<class>/ images or a {MANIFEST_FILE}"
        )
        return report
    declared = _declared_modality(root)
    if report.modality and declared not in ("-", report.modality):
        # Checked here, not by the datasets below: they would refuse every split, and the
        # images would go unchecked.
        report.problem(
            f"{root / SITE_FILE} declares modality '{declared}' but the site is declared '{report.modality}' "
            f"(node config / {SITES_FILE}): correct whichever is wrong"
        )
    report.class_names, report.names_source = site_class_names(root, cfg)
    for split in SPLITS:
        optional = split not in REQUIRED_SPLITS
        if optional and not (root / split).is_dir() and not (root / MANIFEST_FILE).is_file():
            continue
        try:
            dataset = FolderSiteDataset(root, split, report.class_names, names_source=report.names_source)
        except DataError as err:
            empty = "lists no images for split" in str(err) or str(err).startswith("no images in")
            if not (optional and empty):  # an empty val split is no split
                report.problem(str(err))
            continue
        report.counts[split] = dataset.class_counts().tolist()
        for reason, files in dataset.skipped.items():
            report.skipped[reason] += len(files)
            report.warnings.append(f"{len(files)} file(s) in {root / split} not read: {reason} (e.g. {files[0]})")
        if decode:
            _decode_all(dataset, report, cfg.data.image_size)
    for c, count in enumerate(report.counts.get("test", [])):
        if count == 0:
            report.warnings.append(
                f"{root}: the test split has no '{report.class_names[c]}' images, so this site cannot "
                "score that class (AUC); add some if the site has them"
            )
    return report


def _decode_all(dataset: FolderSiteDataset, report: SiteReport, image_size: int) -> None:
    """Decode every image of a split: unreadable files and wide modes are problems, other
    modes and small or elongated images warnings (each kind once, with a count and an example)."""
    odd: dict[tuple[str, bool], list[Path]] = {}  # (what, is a problem) -> images
    for path in progress(dataset.paths, f"{report.name}/{dataset.split}", len(dataset.paths)):
        try:
            with Image.open(path) as image:
                mode, size = image.mode, image.size
            load_image(path)  # the loader's own full decode: truncation, value ranges, sBIT refusals show here
        except DataError as err:
            report.problem(str(err))
            continue
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            report.problem(f"cannot read image {path} ({err}): replace or delete this file")
            continue
        report.decoded += 1
        report.modes[mode] += 1
        report.sizes[size] += 1
        width, height = size
        if mode in WIDE_MODES:
            odd.setdefault(
                (
                    f"mode {mode} (more than 8 bits per channel): converting it to RGB clips values; "
                    "export these images as 8-bit RGB PNG/JPEG",
                    True,
                ),
                [],
            ).append(path)
        elif mode != "RGB":
            odd.setdefault((f"mode {mode}, converted to RGB when read; check these are the images you meant", False), []).append(
                path
            )
        if min(size) < MIN_SIDE:
            report.problem(f"image {path} is {width}x{height} px, below {MIN_SIDE} px: replace or delete it")
        elif min(size) < image_size:
            odd.setdefault((f"smaller than data.image_size={image_size} px: upscaled when read", False), []).append(path)
        if max(size) > 2 * min(size):
            odd.setdefault(
                (
                    "more than twice as wide as high (or the reverse): squashed to a square when read; "
                    "crop them to the field of view",
                    False,
                ),
                [],
            ).append(path)
    for (what, is_problem), paths in odd.items():
        (report.problems if is_problem else report.warnings).append(
            f"{len(paths)} image(s) in {report.path / dataset.split} {what} (e.g. {paths[0]})"
        )


def check_federation(root: str | Path, cfg: Config, decode: bool = False) -> tuple[list[SiteReport], list[str]]:
    """Every site of ``<root>/sites.toml`` -> (reports, federation-level problems: unreadable
    sites.toml, repeated site names, sites whose class names disagree)."""
    try:
        entries = read_sites_file(root)
    except DataError as err:
        return [], [str(err)]
    reports = [check_site(Path(root) / e["path"], e["modality"], cfg, e["name"], decode) for e in entries]
    problems = []
    repeated = sorted(n for n, k in Counter(r.name for r in reports).items() if k > 1)
    if repeated:
        problems.append(
            f"{Path(root) / SITES_FILE}: site names {repeated} appear more than once; give each [[site]] its own name"
        )
    named = [r for r in reports if r.class_names]
    if len({r.class_names for r in named}) > 1:
        listing = "; ".join(f"'{r.name}' ({r.path}): {list(r.class_names)}" for r in named)
        problems.append(
            f"the sites disagree on the class names ({listing}): give every site the same class folders "
            "(rename or remove the odd ones), or set data.class_names='name1,name2,...' to check each site against one list"
        )
    return reports, problems


def _cell(counts: list[int] | None) -> str:
    return "-" if counts is None else f"{sum(counts)} (" + "/".join(map(str, counts)) + ")"


def format_reports(reports: list[SiteReport], problems: list[str] = ()) -> str:
    """One summary table (a row per site; counts per class in the order of the class names),
    then every problem and warning, each with its path and fix."""
    header = ("site", "modality", "site.json", "path", "classes", "train", "val", "test")
    rows = [header]
    for r in reports:
        rows.append(
            (
                r.name,
                r.modality or "-",
                _declared_modality(r.path),
                str(r.path),
                ",".join(r.class_names) or "-",
                _cell(r.counts.get("train")),
                _cell(r.counts.get("val")),
                _cell(r.counts.get("test")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in reports:
        if r.decoded:
            sizes = ", ".join(f"{w}x{h}: {n}" for (w, h), n in r.sizes.most_common(5))
            modes = ", ".join(f"{m}: {n}" for m, n in r.modes.most_common())
            lines.append(
                f"{r.name}: decoded {r.decoded} image(s); sizes {sizes}{' ...' if len(r.sizes) > 5 else ''}; modes {modes}"
            )
        if r.skipped:
            reasons = "; ".join(f"{reason}: {n}" for reason, n in r.skipped.most_common())
            lines.append(f"{r.name}: {sum(r.skipped.values())} file(s) not read, by reason: {reasons}")
    all_problems = list(problems) + [f"[{r.name}] {p}" for r in reports for p in r.problems]
    warnings = [f"[{r.name}] {w}" for r in reports for w in r.warnings]
    if all_problems:
        lines.append(f"{len(all_problems)} problem(s):")
        lines += [f"  - {p}" for p in all_problems]
    if warnings:
        lines.append(f"{len(warnings)} warning(s):")
        lines += [f"  - {w}" for w in warnings]
    if not all_problems:
        lines.append("no problems found")
    return "\n".join(lines)


def write_synthetic_federation(cfg: Config, out: str | Path, site_names: list[str] | None = None) -> list[Path]:
    """The built-in synthetic federation (:func:`common.data.synthetic_site_specs` of ``cfg``)
    as ImageFolder trees ``<out>/<site>/{train,val,test}/<class>/*.png`` + ``site.json`` each,
    and ``<out>/sites.toml``; a run with ``data.root=<out>`` then trains on it. ``site_names``
    rename the sites in order (NBI first). An existing non-empty ``out`` is refused (nothing
    is overwritten); on a failure what this call wrote is removed."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists and is not an empty folder; choose a new folder (or delete this one first)")
    specs = synthetic_site_specs(cfg)
    names = [name for name, _ in specs]
    if site_names is not None:
        if len(site_names) != len(specs) or len(set(site_names)) != len(site_names):
            raise DataError(
                f"--site-names gives {len(site_names)} name(s) {site_names} for {len(specs)} sites ({names}); "
                "give one distinct name per site, NBI sites first"
            )
        names = list(site_names)
    # Into ``out`` itself (it may be a mounted volume, which cannot be renamed): each site is
    # renamed into place whole by write_image_folder, and sites.toml, written last and
    # atomically, is what makes the folder a federation.
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        lines = []
        for name, (_, spec) in zip(names, progress(specs, "sites", len(specs))):
            written.append(write_image_folder(spec, out / name, [split for split in SPLITS if spec.split_size(split) > 0]))
            lines.append(
                f"[[site]]\nname = {json.dumps(name)}\nmodality = {json.dumps(spec.modality)}\npath = {json.dumps(name)}\n"
            )
        atomic_write_bytes(out / SITES_FILE, "\n".join(lines).encode())
    except BaseException:
        for path in written:  # only what this call wrote
            shutil.rmtree(path, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return [out / name for name in names]


def check_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedpagkd check-site",
        description="Check a site's data before it joins: decodes every image, prints per-split per-class counts, "
        "image sizes and modes and the declared modality; exits 1 on problems.",
    )
    parser.add_argument("path", nargs="?", type=Path, help="the site's data folder (ImageFolder tree or manifest.csv)")
    parser.add_argument("--root", type=Path, help="check every site of ROOT/sites.toml instead of one PATH")
    parser.add_argument("--modality", help="the site's modality, wli or nbi (what its SuperNode's node config will say)")
    parser.add_argument("--name", help="the site's name (default: the folder's name)")
    parser.add_argument("--class-names", default="", help="comma-separated class names the run will use (default: discover)")
    parser.add_argument("--image-size", type=int, default=None, help="the run's data.image_size (smaller images are reported)")
    parser.add_argument("--no-decode", action="store_true", help="structure only (what the launcher's preflight checks)")
    parser.add_argument("--strict", action="store_true", help="warnings count as problems")
    args = parser.parse_args(argv)
    if (args.path is None) == (args.root is None):
        parser.error("give a site folder PATH or --root ROOT (a folder with sites.toml), not both")
    if args.path is not None and not args.modality:
        parser.error("--modality wli|nbi is required with PATH (it is what the site's node config declares)")
    try:
        overrides = {"data.class_names": args.class_names}
        if args.image_size is not None:
            overrides["data.image_size"] = args.image_size
        cfg = config_from_flat(overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.root is not None:
        reports, problems = check_federation(args.root, cfg, decode=not args.no_decode)
    else:
        reports, problems = [check_site(args.path, args.modality, cfg, args.name, decode=not args.no_decode)], []
    print(format_reports(reports, problems))
    bad = problems or any(r.problems or (args.strict and r.warnings) for r in reports)
    return 1 if bad else 0


def write_synthetic_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedpagkd write-synthetic",
        description="Write the synthetic federation as ImageFolder trees + sites.toml for rehearsals "
        "(then: fedpagkd simulate data.root=OUT, or one SuperNode per site folder).",
    )
    parser.add_argument("out", type=Path, help="a new (or empty) folder")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="run-config keys that shape the sites, e.g. data.nbi_sites=2 data.render_shift=0.3 data.image_size=64 train.seed=1",
    )
    parser.add_argument(
        "--site-names", default="", help="comma-separated names, one per site, NBI first (default nbi-0,..,wli-0,..)"
    )
    parser.add_argument(
        "--if-missing",
        action="store_true",
        help="exit 0 without writing when OUT already holds a sites.toml (a one-shot container that may run again)",
    )
    # Intermixed: options may come between the overrides (`OUT --site-names a,b data.nbi_sites=1`);
    # plain parse_args stops taking overrides at the first option and refuses the ones after it.
    args = parser.parse_intermixed_args(argv)
    if args.if_missing and (args.out / SITES_FILE).is_file():
        print(f"{args.out / SITES_FILE} exists: kept as it is")
        return 0
    try:
        pairs = [item.split("=", 1) for item in args.overrides]
        bad = [item for item, pair in zip(args.overrides, pairs) if len(pair) != 2]
        if bad:
            raise ConfigError(f"{bad} are not key=value run-config overrides (e.g. data.nbi_sites=2)")
        cfg = config_from_flat(dict(pairs))
        names = [n.strip() for n in args.site_names.split(",")] if args.site_names else None
        written = write_synthetic_federation(cfg, args.out, names)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(f"wrote {path}")
    print(f"wrote {args.out / SITES_FILE}; train on it with: fedpagkd simulate data.root={args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(check_main())
