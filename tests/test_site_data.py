"""A site's data check (``fedpagkd check-site``), the launcher's real-data preflight, and the
synthetic federation written as ImageFolder trees (``fedpagkd write-synthetic``), issue 13."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.site import folder_site, read_sites_file
from client.sitecheck import check_federation, check_main, check_site, format_reports, write_synthetic_main
from common.config import config_from_flat
from server.launch import SimulationError, preflight
from tests.test_class_names import write_tree

CFG = config_from_flat({"data.image_size": 32})
CLASSES = {"adenoma": 2, "hyperplastic": 2}


def sites_toml(root: Path, sites: list[tuple[str, str, str]]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "sites.toml").write_text("\n".join(f'[[site]]\nname = "{n}"\nmodality = "{m}"\npath = "{p}"\n' for n, m, p in sites))


def test_a_good_site_passes_and_the_table_shows_counts_sizes_and_modality(tmp_path, capsys):
    root = write_tree(tmp_path / "hospital-a", {"adenoma": 3, "hyperplastic": 2}, splits=("train", "val", "test"), modality="nbi")
    report = check_site(root, "NBI", CFG, decode=True)
    assert not report.problems and not report.warnings
    assert report.counts == {"train": [3, 2], "val": [3, 2], "test": [3, 2]}
    assert report.sizes == {(32, 32): 15} and report.modes == {"RGB": 15}
    assert check_main([str(root), "--modality", "nbi"]) == 0
    out = capsys.readouterr().out
    assert "hospital-a" in out and "adenoma,hyperplastic" in out and "5 (3/2)" in out and "32x32: 15" in out
    assert "no problems found" in out and "nbi" in out


def test_every_problem_is_listed_with_its_path_and_the_exit_status_is_1(tmp_path, capsys):
    root = write_tree(tmp_path / "hospital-b", CLASSES, modality="wli")
    bad = root / "train" / "adenoma" / "broken.png"
    bad.write_bytes(b"not a png")
    truncated = root / "test" / "hyperplastic" / "0.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    Image.fromarray(np.zeros((8, 8), np.uint8), mode="L").save(root / "train" / "hyperplastic" / "tiny.png")
    Image.fromarray(np.zeros((40, 40), np.uint16)).save(root / "test" / "adenoma" / "wide.png")  # 16-bit grey
    report = check_site(root, "nbi", CFG, decode=True)
    text = "\n".join(report.problems)
    assert (
        "site.json declares modality 'wli'" in text and "declared 'nbi'" in text
    )  # the declaration and the node config disagree
    assert str(bad) in text and str(truncated) in text and "replace or delete" in text
    assert str(root / "train" / "hyperplastic" / "tiny.png") in text and "below 16 px" in text
    assert "mode I;16" in text and "8-bit RGB" in text
    assert any("mode L" in w for w in report.warnings)
    assert check_main([str(root), "--modality", "nbi"]) == 1
    out = capsys.readouterr().out
    assert "problem(s):" in out and str(bad) in out


def test_missing_splits_and_an_empty_test_class_are_reported(tmp_path):
    root = write_tree(tmp_path / "hospital-c", CLASSES, splits=("train",))
    report = check_site(root, "wli", CFG)
    assert any(f"split folder {root / 'test'} is missing" in p for p in report.problems)
    (root / "test" / "adenoma").mkdir(parents=True)
    write_tree(root, {"hyperplastic": 1}, splits=("test",))
    report = check_site(root, "wli", CFG)
    assert not report.problems and report.counts["test"] == [0, 1]
    assert any("no 'adenoma' images" in w for w in report.warnings)
    assert check_main([str(root), "--modality", "wli", "--strict", "--no-decode"]) == 1


def test_a_missing_folder_and_a_bad_modality_are_both_reported(tmp_path):
    report = check_site(tmp_path / "nowhere", "white-light", CFG)
    assert len(report.problems) == 2
    assert "'wli' or 'nbi'" in report.problems[0] and str(tmp_path / "nowhere") in report.problems[1]


def test_the_federation_check_lists_disagreeing_class_names(tmp_path):
    root = tmp_path / "fed"
    write_tree(root / "a", {"adenoma": 2, "hyperplastic": 2})
    write_tree(root / "b", {"adenoma": 2, "hyperplasia": 2})
    sites_toml(root, [("a", "nbi", "a"), ("b", "WLI", "b")])
    reports, problems = check_federation(root, CFG)
    assert [r.modality for r in reports] == ["nbi", "wli"]
    assert len(problems) == 1 and "'a'" in problems[0] and "['adenoma', 'hyperplasia']" in problems[0]
    assert "data.class_names=" in problems[0]
    table = format_reports(reports, problems)
    assert table.splitlines()[0].split() == ["site", "modality", "site.json", "path", "classes", "train", "val", "test"]


def test_preflight_refuses_a_bad_federation_before_ray_with_every_problem(tmp_path):
    root = tmp_path / "fed"
    write_tree(root / "a", CLASSES)
    write_tree(root / "b", {"adenoma": 2, "serrated": 2})
    sites_toml(root, [("a", "nbi", "a"), ("b", "wli", "b"), ("c", "nbi", "missing")])
    printed = []
    with pytest.raises(SimulationError) as err:
        preflight({"data.root": str(root)}, 3, report=printed.append)
    message = str(err.value)
    assert "disagree on the class names" in message and str(root / "missing") in message
    assert printed and "site" in printed[0].splitlines()[0]  # the summary table came first


def test_preflight_settles_the_discovered_class_names(tmp_path):
    root = tmp_path / "fed"
    for name in ("a", "b"):
        write_tree(root / name, {"hyperplastic": 2, "adenoma": 2})
    sites_toml(root, [("a", "nbi", "a"), ("b", "wli", "b")])
    settled = preflight({"data.root": str(root)}, 2, report=lambda _: None)
    assert settled == {"data.class_names": "adenoma,hyperplastic", "data.num_classes": 2}
    assert preflight({"data.root": str(root), "data.class_names": "adenoma,hyperplastic"}, 2, report=lambda _: None) == {}
    with pytest.raises(SimulationError, match="unknown class 'hyperplastic'"):  # explicit names are checked at every site
        preflight({"data.root": str(root), "data.class_names": "adenoma,serrated"}, 2, report=lambda _: None)


# ------------------------------------------------------------------------------ write-synthetic


SMALL = [
    "data.nbi_sites=1",
    "data.wli_sites=1",
    "data.train_per_site=6",
    "data.val_per_site=0",
    "data.test_per_site=3",
    "data.image_size=32",
]


def test_write_synthetic_writes_a_federation_a_run_can_read(tmp_path, capsys):
    out = tmp_path / "rehearsal"
    assert write_synthetic_main([str(out), *SMALL, "--site-names", "nbi-1,wli-1"]) == 0
    assert "data.root=" in capsys.readouterr().out
    entries = read_sites_file(out)
    assert [(e["name"], e["modality"]) for e in entries] == [("nbi-1", "nbi"), ("wli-1", "wli")]
    reports, problems = check_federation(out, CFG, decode=True)
    assert not problems and not any(r.problems for r in reports)
    assert reports[0].counts["train"] == [2, 2, 2]
    site = folder_site("wli-1", "wli", out / "wli-1", CFG)
    assert len(site.train) == 6 and json.loads((out / "wli-1" / "site.json").read_text())["modality"] == "wli"


def test_write_synthetic_never_overwrites(tmp_path, capsys):
    out = tmp_path / "rehearsal"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert write_synthetic_main([str(out), *SMALL]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "sites.toml").write_text("")
    assert write_synthetic_main([str(out), *SMALL, "--if-missing"]) == 0  # a one-shot container run again
    assert "kept" in capsys.readouterr().out


def test_write_synthetic_refuses_bad_arguments(tmp_path, capsys):
    assert write_synthetic_main([str(tmp_path / "a"), "data.nbi_sites"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert write_synthetic_main([str(tmp_path / "b"), *SMALL, "--site-names", "x"]) == 2
    assert "one distinct name per site" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_write_synthetic_uses_the_configured_class_names(tmp_path):
    out = tmp_path / "rehearsal"
    assert write_synthetic_main([str(out), *SMALL, "data.class_names=hyperplastic,adenoma"]) == 0
    assert sorted(p.name for p in (out / "nbi-0" / "train").iterdir()) == ["adenoma", "hyperplastic"]
    assert json.loads((out / "nbi-0" / "site.json").read_text())["class_names"] == ["hyperplastic", "adenoma"]


@pytest.mark.parametrize(
    "supernodes, expected", [(2, ["nbi", "wli"]), (4, ["nbi", "nbi", "wli", "wli"]), (5, ["nbi"] * 2 + ["wli"] * 3)]
)
def test_the_embedded_federation_follows_the_simulations_supernode_count(supernodes, expected):
    """`flwr run .` uses Flower's default local federation (2 SuperNodes) while the run config
    declares 2 NBI + 2 WLI sites: every SuperNode count of at least 2 still gets both modalities."""
    from client.site import resolve_site
    from common.config import config_from_flat

    cfg = config_from_flat({"data.train_per_site": 6, "data.val_per_site": 3, "data.test_per_site": 3})
    sites = [resolve_site({"partition-id": p, "num-partitions": supernodes}, cfg) for p in range(supernodes)]
    assert [s.modality for s in sites] == expected
    assert len({s.name for s in sites}) == supernodes
