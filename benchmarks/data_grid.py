"""Draw docs/synthetic_grid.png: synthetic NBI rows then WLI rows, one column block per class.

    python -m benchmarks.data_grid [--out docs/synthetic_grid.png] [--per-class 3] [--size 128]

Also prints the render time per image at 64 and 128 px.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import common  # noqa: F401  (compat shim before torchvision)
import numpy as np
from PIL import Image, ImageDraw

from common.data import SyntheticEndoscopyDataset, SyntheticSiteSpec


def render_ms(size: int, modality: str, n: int = 200, repeats: int = 5) -> tuple[float, float]:
    """(wall, CPU) milliseconds to render one image (uint8 array) of ``size`` px, best of ``repeats``.

    CPU time (this process) is reported too because wall time on a shared machine mostly
    measures the neighbours.
    """
    ds = SyntheticEndoscopyDataset(SyntheticSiteSpec(modality, num_train=n, image_size=size), "train")
    ds.render_array(0)  # warm caches
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            ds.render_array(i)
        wall.append((time.perf_counter() - w0) / n * 1e3)
        cpu.append((time.process_time() - c0) / n * 1e3)
    return min(wall), min(cpu)


def draw_grid(out: Path, per_class: int = 3, size: int = 128, num_classes: int = 3, seed: int = 0) -> Path:
    pad, label_h = 4, 16
    rows = []
    names = None
    for modality in ("nbi", "wli"):
        n = 60 * num_classes
        spec = SyntheticSiteSpec(modality, num_train=n, num_classes=num_classes, image_size=size, seed=seed)
        ds = SyntheticEndoscopyDataset(spec, "train")
        names = ds.class_names
        picks = [np.flatnonzero(ds.labels == c)[:per_class] for c in range(num_classes)]
        rows.append((modality, [[ds.render(int(i)) for i in p] for p in picks]))
    cols = num_classes * per_class
    width = pad + cols * (size + pad) + pad * (num_classes - 1)
    height = label_h + len(rows) * (size + pad + label_h) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(names):
        draw.text((pad + c * (per_class * (size + pad) + pad), 2), name, fill=(0, 0, 0))
    y = label_h
    for modality, per_cls in rows:
        draw.text((pad, y + 1), modality.upper(), fill=(0, 0, 0))
        y += label_h
        for c, images in enumerate(per_cls):
            x0 = pad + c * (per_class * (size + pad) + pad)
            for k, im in enumerate(images):
                canvas.paste(im, (x0 + k * (size + pad), y))
        y += size + pad
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/synthetic_grid.png"))
    parser.add_argument("--per-class", type=int, default=3)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    print(f"wrote {draw_grid(args.out, args.per_class, args.size)}")
    for size in (64, 128):
        for modality in ("nbi", "wli"):
            wall, cpu = render_ms(size, modality)
            print(f"render {modality} {size}px: {wall:.2f} ms/image wall, {cpu:.2f} ms/image CPU")


if __name__ == "__main__":
    main()
