"""The plain reference learner reads what the project reads and reports per modality."""

from __future__ import annotations

import json

import common  # noqa: F401
from benchmarks import reference
from client.sitecheck import write_synthetic_federation
from common.config import config_from_flat

SMALL = ["data.train_per_site=12", "data.val_per_site=3", "data.test_per_site=6", "data.image_size=32"]


def test_the_reference_trains_on_an_image_folder_federation_and_writes_a_table(tmp_path, capsys):
    root = tmp_path / "federation"
    write_synthetic_federation(config_from_flat(dict(item.split("=") for item in SMALL)), root)
    out = tmp_path / "reference.json"
    result = reference.main([*SMALL, f"data.root={root}", "--seeds", "0", "--epochs", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["summary"]) == {"wli", "nbi"} == set(result["per_seed"]["0"])
    for modality, row in saved["summary"].items():
        assert row["test_images"] == 2 * 6 and row["train_images"] == 2 * 12, modality  # both sites of the modality pooled
        assert 0.0 <= row["auc_mean"] <= 1.0
    assert "reference CNN" in capsys.readouterr().out


def test_dihedral_moves_pixels_without_changing_them():
    import torch

    images = torch.rand(16, 3, 8, 8)
    out = reference.dihedral(images, torch.Generator().manual_seed(0))
    assert torch.equal(out.flatten(1).sort(dim=1).values, images.flatten(1).sort(dim=1).values)
