"""Use a trained WLI student: class probabilities for a folder of images, or an exported model.

    python -m client.predict predict --checkpoint runs/<run>/student.safetensors --images DIR --out preds.csv
    python -m client.predict export --checkpoint runs/<run>/student.safetensors --format onnx --out student.onnx

``predict`` writes one CSV row per image (path, predicted class, one probability per class),
atomically. ``export`` writes TorchScript or ONNX of a probability-returning model and checks
the exported file against PyTorch on a random batch before it reports success.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

import common  # noqa: F401  (torchvision shim before timm)
from common.data import IMAGE_SUFFIXES, DataError, build_transform, load_image
from common.files import atomic_write_bytes
from common.checkpoint import load_checkpoint
from common.models import PaGKDNet


class ProbabilityModel(nn.Module):
    """images [B, 3, S, S] (normalised) -> class probabilities [B, C]."""

    def __init__(self, net: PaGKDNet):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(images).logits, dim=1)


def list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"image folder '{folder}' does not exist or is not a folder")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"image folder '{folder}' holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return paths


@torch.no_grad()
def predict_folder(checkpoint: Path, folder: Path, out: Path, batch_size: int = 32) -> int:
    """Write ``out`` (CSV: path, predicted, p_<class>...) for every image under ``folder``."""
    net, meta = load_checkpoint(checkpoint)
    model = ProbabilityModel(net).eval()
    transform = build_transform(meta["image_size"])
    paths = list_images(folder)
    rows = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        batch = torch.stack([transform(load_image(p)) for p in chunk])
        for path, probs in zip(chunk, model(batch).numpy()):
            rows.append([str(path.relative_to(folder)), meta["class_names"][int(probs.argmax())], *(f"{p:.6f}" for p in probs)])
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "predicted", *(f"p_{name}" for name in meta["class_names"])])
    writer.writerows(rows)
    atomic_write_bytes(out, buffer.getvalue().encode())
    return len(rows)


def export_model(checkpoint: Path, fmt: str, out: Path, atol: float = 1e-4) -> float:
    """Export and verify: returns the max |exported - PyTorch| probability difference."""
    net, meta = load_checkpoint(checkpoint)
    model = ProbabilityModel(net).eval()
    size = meta["image_size"]
    example = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(example).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "torchscript":
        traced = torch.jit.trace(model, example)
        traced.save(str(out))
        got = torch.jit.load(str(out))(example).detach().numpy()
    elif fmt == "onnx":
        torch.onnx.export(
            model,
            (example,),
            str(out),
            input_names=["images"],
            output_names=["probabilities"],
            dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}},
            dynamo=False,
        )
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = session.run(None, {"images": example.numpy()})[0]
    else:
        raise ValueError(f"export format '{fmt}' is not 'onnx' or 'torchscript'")
    error = float(np.abs(got - expected).max())
    if error > atol:
        raise RuntimeError(f"exported {fmt} model differs from PyTorch by {error:.2e} (> {atol}); not trusted")
    return error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpagkd", description="Use a trained FedPaGKD WLI student")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="CSV of class probabilities for a folder of WLI images")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    e = sub.add_parser("export", help="TorchScript or ONNX, verified against PyTorch")
    e.add_argument("--checkpoint", type=Path, required=True)
    e.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    e.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "predict":
            count = predict_folder(args.checkpoint, args.images, args.out)
            print(f"wrote {count} predictions to {args.out}")
        else:
            error = export_model(args.checkpoint, args.format, args.out)
            print(f"wrote {args.out} ({args.format}); max difference to PyTorch {error:.2e}")
    except (DataError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
