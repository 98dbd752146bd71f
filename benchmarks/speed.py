"""Speed and memory of the PaGKD pieces, on CUDA when present (bf16 autocast) else CPU.

Reports (JSON + table):
* student forward throughput (images/s) without and with the lesion-aware query head
  (target: the head costs <= 10 % of the backbone's throughput);
* one training step: plain CE vs CE + GKD-Den + GKD-Pro against a bank (target: <= 15 % overhead);
* knowledge extraction (teacher forward + CAM labels + group prototypes) vs plain inference
  (target: >= 90 % of plain inference throughput);
* peak memory (process RSS on CPU, allocator peak on CUDA).

    python -m benchmarks.speed [--backbone resnet18] [--image-size 64] [--batch 24] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import common  # noqa: F401  (torchvision shim before timm)
from benchmarks.centralised import environment
from common.config import Config, ModelConfig
from common.grouping import random_groups
from common.losses import (
    PaGKDTerms,
    bank_from_teacher_batch,
    cam_token_labels,
    pagkd_loss,
)
from common.device import autocast, pick_device
from common.models import build_query_head, build_student, group_prototypes


def timed_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, float]:
    """Median seconds per call of two functions, calls interleaved A, B, A, B... so that load
    drift on a shared machine hits both alike (the differences measured are a few percent)."""

    def once(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(2):
        fn_a(), fn_b()
    a_times, b_times = [], []
    for _ in range(repeats):
        a_times.append(once(fn_a))
        b_times.append(once(fn_b))
    return float(np.median(a_times)), float(np.median(b_times))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(backbone: str, image_size: int, batch: int, repeats: int, classes: int = 3) -> dict:
    device = pick_device("auto")
    cfg = Config()
    cfg.model = ModelConfig(teacher=backbone, student=backbone)
    cfg.pagkd.pro_weight = 0.1
    torch.manual_seed(0)
    student = build_student(cfg.model, classes).to(device)
    teacher = build_student(cfg.model, classes).to(device).eval()
    head = build_query_head(cfg.model, classes).to(device)
    images = torch.randn(batch, 3, image_size, image_size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
        student, teacher = student.to(memory_format=torch.channels_last), teacher.to(memory_format=torch.channels_last)
    labels = torch.arange(batch, device=device) % classes
    generator = torch.Generator().manual_seed(0)
    groups = random_groups(labels.cpu(), cfg.pagkd.group_size, cfg.pagkd.min_group_size, generator)

    @torch.no_grad()
    def forward_plain():
        with autocast(device, True):
            return student(images)

    @torch.no_grad()
    def forward_with_head():
        with autocast(device, True):
            out = student(images)
            return group_prototypes(head, out.tokens, groups)

    @torch.no_grad()
    def make_bank():
        with autocast(device, True):
            out = teacher(images)
            token_labels = cam_token_labels(out.feature_map, teacher.classifier.weight, labels, 0.6, 0.3)
            prototypes, group_labels, _ = group_prototypes(head, out.tokens, groups)
        return bank_from_teacher_batch(prototypes.float(), group_labels, out.tokens.float(), token_labels, labels, classes)

    bank = make_bank()
    optimizer = torch.optim.Adam(list(student.parameters()) + list(head.parameters()), lr=1e-4)

    def step(distil: bool):
        with autocast(device, True):
            out = student(images)
            if distil:
                token_labels = cam_token_labels(out.feature_map, student.classifier.weight, labels, 0.6, 0.3)
                prototypes, group_labels, _ = group_prototypes(head, out.tokens, groups)
                terms = PaGKDTerms(
                    out.logits, labels, out.tokens, token_labels, prototypes, group_labels, head.classify(prototypes)
                )
                loss, _ = pagkd_loss(terms, bank, cfg.pagkd, True)
            else:
                loss = torch.nn.functional.cross_entropy(out.logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # Inference and extraction compare eval-mode networks; the training steps train mode.
    student.eval()
    plain_s, head_s = timed_pair(forward_plain, forward_with_head, repeats, device)
    plain_again_s, extract_s = timed_pair(forward_plain, make_bank, repeats, device)
    student.train()
    ce_step_s, pagkd_step_s = timed_pair(lambda: step(False), lambda: step(True), repeats, device)
    result = {
        "backbone": backbone,
        "image_size": image_size,
        "batch": batch,
        "device": str(device),
        "forward_images_per_s": batch / plain_s,
        "forward_with_head_images_per_s": batch / head_s,
        "head_cost_pct": 100 * (head_s - plain_s) / plain_s,
        "ce_step_s": ce_step_s,
        "pagkd_step_s": pagkd_step_s,
        "gkd_step_overhead_pct": 100 * (pagkd_step_s - ce_step_s) / ce_step_s,
        "extraction_images_per_s": batch / extract_s,
        "extraction_vs_inference_pct": 100 * plain_again_s / extract_s,
        "peak_memory_mb": peak_memory_mb(device),
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="PaGKD speed benchmark")
    parser.add_argument("--backbone", nargs="+", default=["resnet18", "efficientnet_b0"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/speed.json"))
    args = parser.parse_args(argv)
    rows = [run(b, args.image_size, args.batch, args.repeats) for b in args.backbone]
    print(
        f"{'backbone':<16}{'device':>7}{'fwd img/s':>11}{'+head img/s':>13}{'head %':>8}{'CE step s':>11}"
        f"{'PaGKD step s':>14}{'GKD %':>8}{'extract %':>11}{'peak MB':>9}"
    )
    for r in rows:
        print(
            f"{r['backbone']:<16}{r['device']:>7}{r['forward_images_per_s']:>11.1f}{r['forward_with_head_images_per_s']:>13.1f}"
            f"{r['head_cost_pct']:>8.1f}{r['ce_step_s']:>11.3f}{r['pagkd_step_s']:>14.3f}{r['gkd_step_overhead_pct']:>8.1f}"
            f"{r['extraction_vs_inference_pct']:>11.1f}{r['peak_memory_mb']:>9.0f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"results": rows, "environment": environment(), "args": vars(args) | {"out": str(args.out)}}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
