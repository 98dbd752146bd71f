"""predict writes a CSV of probabilities for a folder; export round-trips TorchScript and ONNX."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

import common  # noqa: F401
from client.predict import export_model, main, predict_folder
from client.wire import state_to_numpy
from common.config import Config, config_from_flat
from common.data import DataError, SyntheticSiteSpec, default_class_names, write_image_folder
from common.checkpoint import load_checkpoint, save_checkpoint
from common.models import build_student


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg: Config = config_from_flat(
        {
            "data.image_size": 32,
            "model.student": "resnet10t",
            "model.embed_dim": 32,
            "model.num_heads": 4,
            "fed.student_init": "scratch",
        }
    )
    torch.manual_seed(0)
    net = build_student(cfg.model, cfg.data.num_classes)
    path = tmp_path_factory.mktemp("ckpt") / "student.safetensors"
    save_checkpoint(path, state_to_numpy(net), cfg, default_class_names(cfg.data.num_classes))
    return path


def test_checkpoint_round_trip_keeps_weights_and_metadata(checkpoint):
    net, meta = load_checkpoint(checkpoint)
    assert meta["class_names"] == ("hyperplasia", "adenoma", "adenocarcinoma")
    assert meta["image_size"] == 32 and meta["backbone"] == "resnet10t"
    again, _ = load_checkpoint(checkpoint)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x).logits, again(x).logits)


def test_predict_folder_writes_one_row_per_image(tmp_path, checkpoint):
    root = write_image_folder(
        SyntheticSiteSpec("wli", num_train=0, num_val=0, num_test=6, image_size=32), tmp_path / "site", splits=("test",)
    )
    out = tmp_path / "preds.csv"
    assert predict_folder(checkpoint, root / "test", out) == 6
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6
    probs = np.array([[float(r[f"p_{n}"]) for n in default_class_names(3)] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert all(r["predicted"] == default_class_names(3)[int(p.argmax())] for r, p in zip(rows, probs))


def test_predict_refuses_missing_or_empty_folders(tmp_path, checkpoint):
    with pytest.raises(DataError, match="does not exist"):
        predict_folder(checkpoint, tmp_path / "nope", tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no"):
        predict_folder(checkpoint, tmp_path / "empty", tmp_path / "x.csv")
    assert (
        main(
            [
                "predict",
                "--checkpoint",
                str(tmp_path / "missing.safetensors"),
                "--images",
                str(tmp_path),
                "--out",
                str(tmp_path / "o.csv"),
            ]
        )
        == 2
    )


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_reloads_and_matches_pytorch(tmp_path, checkpoint, fmt):
    out = tmp_path / f"student.{fmt}"
    error = export_model(checkpoint, fmt, out)
    assert out.exists() and out.stat().st_size > 1000
    assert error < 1e-4
