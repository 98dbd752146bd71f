"""Class names of real sites (issue 13): discovered from class folders or a manifest, or set with
``data.class_names``; ``data.num_classes`` follows; the server refuses sites that disagree.

Sites are small ImageFolder trees of 32 px PNGs written by :func:`write_tree`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.site import folder_site, resolve_site, run_class_names
from common.config import ConfigError, config_from_flat, config_to_flat
from common.data import DataError, discover_class_names
from server.workflow import FederationError, Protocol
from tests.conftest import TINY, tiny_config
from tests.fakes import InProcessGrid

pytestmark = pytest.mark.usefixtures("single_thread")


def write_tree(
    root: Path, classes: dict[str, int], splits=("train", "test"), size: int = 32, modality: str | None = None
) -> Path:
    """``root/<split>/<class>/<i>.png`` with ``classes[name]`` images per split (distinct pixels)."""
    rng = np.random.default_rng(len(str(root)))
    for split in splits:
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if modality:
        (root / "site.json").write_text(json.dumps({"modality": modality}))
    return root


# ------------------------------------------------------------------------------ config


def test_class_names_set_num_classes():
    cfg = config_from_flat({"data.class_names": "hyperplastic, adenoma"})
    assert cfg.data.num_classes == 2 and cfg.data.class_names == "hyperplastic, adenoma"
    assert run_class_names(cfg) == ("hyperplastic", "adenoma")
    # Flower's run config always carries data.num_classes (pyproject's 3): the names still win.
    assert config_from_flat({"data.num_classes": 3, "data.class_names": "a,b"}).data.num_classes == 2


def test_empty_class_names_keep_the_synthetic_defaults():
    assert run_class_names(config_from_flat({})) == ("hyperplasia", "adenoma", "adenocarcinoma")


@pytest.mark.parametrize(
    "text, says",
    [
        ("adenoma", "at least 2"),
        ("a,,b", "at least 2"),
        ("a,b,a", "repeats ['a']"),
        ("a,x/y", "cannot be class folder names"),
        ("a,.b", "cannot be class folder names"),
    ],
)
def test_bad_class_names_are_refused_naming_the_key(text, says):
    with pytest.raises(ConfigError, match="data.class_names") as err:
        config_from_flat({"data.class_names": text})
    assert says in str(err.value)


# ------------------------------------------------------------------------------ discovery at a site


def test_class_names_are_the_sorted_train_folders(tmp_path):
    root = write_tree(tmp_path / "site", {"hyperplastic": 2, "adenoma": 2})
    (root / "train" / ".cache").mkdir()  # hidden folders are not classes
    assert discover_class_names(root) == ("adenoma", "hyperplastic")
    assert discover_class_names(tmp_path / "nowhere") is None


def test_class_names_from_a_manifest_are_its_sorted_labels(tmp_path):
    root = tmp_path / "site"
    root.mkdir()
    (root / "manifest.csv").write_text("path,label,split\na.png,serrated,train\nb.png,adenoma,test\n")
    assert discover_class_names(root) == ("adenoma", "serrated")
    (root / "manifest.csv").write_text("path,label,split\na.png,0,train\nb.png,1,test\n")
    assert discover_class_names(root) is None  # indices name nothing: the defaults apply


def test_the_new_user_federation_with_its_own_class_folders_works(tmp_path):
    """The issue's case: folders 'hyperplastic' and 'adenoma' were refused at every site."""
    root = write_tree(tmp_path / "site", {"hyperplastic": 3, "adenoma": 2})
    site = folder_site("hospital-a", "NBI", root, config_from_flat(TINY))
    assert site.class_names == ("adenoma", "hyperplastic") and site.modality == "nbi"
    assert np.bincount(site.train.labels).tolist() == [2, 3]


def test_configured_names_refuse_an_unknown_folder_with_a_fix_the_user_can_apply(tmp_path):
    root = write_tree(tmp_path / "site", {"hyperplastic": 1, "adenoma": 1, "serrated": 1})
    cfg = config_from_flat({**TINY, "data.class_names": "hyperplastic,adenoma"})
    with pytest.raises(DataError) as err:
        folder_site("hospital-a", "nbi", root, cfg)
    message = str(err.value)
    assert str(root / "train" / "serrated") in message and "data.class_names" in message


def test_a_test_folder_unknown_to_train_names_the_train_folders_as_the_source(tmp_path):
    root = write_tree(tmp_path / "site", {"hyperplastic": 1, "adenoma": 1})
    write_tree(root, {"serrated": 1}, splits=("test",))
    with pytest.raises(DataError, match="class folders of .*train"):
        folder_site("hospital-a", "wli", root, config_from_flat(TINY))


def test_a_misspelled_modality_is_refused_with_the_accepted_spellings(tmp_path):
    root = write_tree(tmp_path / "site", {"a": 1, "b": 1})
    with pytest.raises(DataError, match="'wli' or 'nbi'"):
        folder_site("hospital-a", "narrow-band", root, config_from_flat(TINY))


# ------------------------------------------------------------------------------ agreement at the server


def federation(tmp_path: Path, nbi_classes: dict[str, int], wli_classes: dict[str, int], **overrides) -> Protocol:
    nodes = {
        1: {"site-name": "nbi-a", "modality": "nbi", "data-path": str(write_tree(tmp_path / "nbi-a", nbi_classes))},
        2: {"site-name": "wli-a", "modality": "wli", "data-path": str(write_tree(tmp_path / "wli-a", wli_classes))},
    }
    cfg = tiny_config(**overrides)
    return Protocol(InProcessGrid(nodes, config_to_flat(cfg)), cfg, tmp_path / "run")


def test_sites_that_disagree_on_class_names_stop_the_run_listing_each_site(tmp_path, task_identity):
    protocol = federation(tmp_path, {"adenoma": 4, "hyperplastic": 4}, {"adenoma": 4, "hyperplasia": 4}, data__num_classes=2)
    with pytest.raises(FederationError) as err:
        protocol.discover()
    message = str(err.value)
    assert "'nbi-a': ['adenoma', 'hyperplastic']" in message and "'wli-a': ['adenoma', 'hyperplasia']" in message
    assert "data.class_names=" in message and "rename" in message


def test_agreed_names_of_another_count_stop_the_run_with_the_class_names_to_set(tmp_path, task_identity):
    classes = {"adenoma": 4, "hyperplastic": 4}
    protocol = federation(tmp_path, classes, classes)  # the run expects 3 classes
    with pytest.raises(FederationError, match=r"data.class_names='adenoma,hyperplastic'"):
        protocol.discover()


def test_agreed_names_become_the_runs_class_names(tmp_path, task_identity):
    classes = {"adenoma": 4, "hyperplastic": 4}
    protocol = federation(tmp_path, classes, classes, data__class_names="adenoma,hyperplastic")
    protocol.discover()
    assert protocol.class_names == ("adenoma", "hyperplastic")
    assert [s.class_names for s in protocol.sites.values()] == [["adenoma", "hyperplastic"]] * 2


def test_discovered_names_of_the_right_count_are_adopted(tmp_path, task_identity):
    classes = {"adenoma": 4, "hyperplastic": 4, "serrated": 4}
    protocol = federation(tmp_path, classes, classes)
    protocol.discover()
    assert protocol.class_names == ("adenoma", "hyperplastic", "serrated")


def test_a_synthetic_site_reports_the_configured_names(task_identity):
    cfg = tiny_config(data__class_names="x,y,z")
    site = resolve_site({"partition-id": 0}, cfg)
    assert site.class_names == ("x", "y", "z")
