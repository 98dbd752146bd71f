"""The yardstick: a deliberately plain CNN trained centrally on the project's own images.

It says whether the project's training works at all. It shares nothing with the project's
training code (no timm, no PaGKD network, no sampler, no augmentation module): a 3-block CNN
(~290 k parameters), AdamW + one-cycle LR, flips and 90-degree rotations, a fixed number of
epochs, the last epoch reported. It reads the very data the project reads
(:func:`client.site.federation_sites`: the embedded default or a ``data.root`` federation),
pools every site of a modality, trains on the train split and reports on the test split.

    python -m benchmarks.reference --seeds 0 1 2 3 4 data.test_per_site=500
    python -m benchmarks.reference --modalities wli data.root=/data/federation

Writes JSON (per seed and mean/std per modality) and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset

import common  # noqa: F401  (torchvision shim)
from client.site import federation_sites
from common.config import config_from_flat, config_to_dict
from common.files import atomic_write_json
from common.metrics import classification_metrics

log = logging.getLogger("fedpagkd.reference")
# The yardstick's recipe (the command line's defaults; benchmarks/suite.py runs it as it is).
RECIPE = {"epochs": 40, "batch_size": 32, "lr": 3e-3, "weight_decay": 5e-4}


class PlainCNN(nn.Module):
    """images [B, 3, H, W] -> logits [B, C]: three (conv-BN-ReLU x 2, max-pool) blocks, GAP, linear."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers, chs = [], 3
        for width in widths:
            for _ in range(2):
                layers += [nn.Conv2d(chs, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
                chs = width
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(chs, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).mean(dim=(2, 3)))


def load_all(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a (small) dataset in memory: images [N, 3, H, W], labels [N]."""
    images, labels = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def dihedral(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random one of the 8 exact rotations/flips per image (no interpolation)."""
    out = images.clone()
    turns = torch.randint(0, 4, (len(images),), generator=generator)
    flips = torch.randint(0, 2, (len(images),), generator=generator).bool()
    for k in range(4):
        chosen = turns == k
        out[chosen] = torch.rot90(images[chosen], k, dims=(2, 3))
    out[flips] = out[flips].flip(3)
    return out


def train_and_test(
    train: ConcatDataset,
    test: ConcatDataset,
    num_classes: int,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
) -> dict:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x_train, y_train = load_all(train)
    x_test, y_test = load_all(test)
    model = PlainCNN(num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = int(np.ceil(len(x_train) / batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    started = time.time()
    losses = []
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        epoch_loss = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(dihedral(x_train[index], generator)), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            epoch_loss += loss.item() * len(index)
        losses.append(epoch_loss / len(x_train))
    train_s = time.time() - started
    model.eval()
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(x_test[i : i + 256]), 1) for i in range(0, len(x_test), 256)]).numpy()
    metrics = classification_metrics(probs, y_test.numpy())
    return {
        **metrics,
        "train_ce_first": losses[0],
        "train_ce_last": losses[-1],
        "train_s": train_s,
        "train_images": len(x_train),
        "test_images": len(x_test),
    }


def pooled(sites, modality: str, split: str) -> ConcatDataset:
    parts = [s.split(split) for s in sites if s.modality == modality]
    if not parts:
        raise SystemExit(f"the federation has no {modality.upper()} site; choose --modalities from those it has")
    return ConcatDataset(parts)


def summarise(per_seed: dict[str, dict[str, dict]]) -> dict[str, dict[str, float]]:
    table = {}
    for modality in sorted({m for runs in per_seed.values() for m in runs}):
        runs = [r[modality] for r in per_seed.values() if modality in r]
        row = {"n": len(runs)}
        for key in ("auc", "accuracy", "train_ce_last", "train_s"):
            values = np.array([r[key] for r in runs])
            row[f"{key}_mean"], row[f"{key}_std"] = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
        row["test_images"] = runs[0]["test_images"]
        row["train_images"] = runs[0]["train_images"]
        table[modality] = row
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    lines = [f"{'reference CNN':<14}{'n':>3}{'train':>7}{'test':>7}{'AUC':>18}{'ACC':>18}{'train CE':>10}{'s':>7}"]
    for modality, r in table.items():
        lines.append(
            f"{modality.upper():<14}{r['n']:>3}{r['train_images']:>7}{r['test_images']:>7}"
            f"{r['auc_mean']:>10.4f} +/-{r['auc_std']:.3f}{r['accuracy_mean']:>10.4f} +/-{r['accuracy_std']:.3f}"
            f"{r['train_ce_last_mean']:>10.3f}{r['train_s_mean']:>7.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (data.*, train.seed ignored)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--modalities", nargs="+", default=["wli", "nbi"], choices=["wli", "nbi"])
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    parser.add_argument("--batch-size", type=int, default=RECIPE["batch_size"])
    parser.add_argument("--lr", type=float, default=RECIPE["lr"])
    parser.add_argument("--weight-decay", type=float, default=RECIPE["weight_decay"])
    parser.add_argument("--out", default="benchmarks/results/reference.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    overrides = dict(item.split("=", 1) for item in args.overrides)
    per_seed: dict[str, dict[str, dict]] = {}
    for seed in args.seeds:
        # The data seed follows the project's: seed s renders the same sites as train.seed=s.
        cfg = config_from_flat({**overrides, "train.seed": seed})
        sites = federation_sites(cfg)
        for modality in args.modalities:
            result = train_and_test(
                pooled(sites, modality, "train"),
                pooled(sites, modality, "test"),
                cfg.data.num_classes,
                seed,
                args.epochs,
                args.batch_size,
                args.lr,
                args.weight_decay,
            )
            per_seed.setdefault(str(seed), {})[modality] = result
            log.info(
                "seed %d %s: AUC %.4f ACC %.4f (train CE %.3f -> %.3f, %.0f s)",
                seed,
                modality,
                result["auc"],
                result["accuracy"],
                result["train_ce_first"],
                result["train_ce_last"],
                result["train_s"],
            )
    table = summarise(per_seed)
    out = {
        "summary": table,
        "per_seed": per_seed,
        "recipe": {k: v for k, v in vars(args).items() if k != "out"},
        "config": config_to_dict(cfg),
        "threads": torch.get_num_threads(),
    }
    atomic_write_json(Path(args.out), out)
    print(format_table(table))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
