"""Centralised PaGKD reference: the upper bound the federated system must approach.

All NBI sites' training images pooled train the teacher; all WLI sites' images pooled train
the student, distilling from the frozen teacher's live NBI batches (unpaired groups, re-drawn
every batch). Variants: ``wli_only`` (CE only), ``pagkd`` (CE + GKD-Den + GKD-Pro),
``pro_only``, ``den_only``, ``pagkd_adaptive`` (adaptive groups). Every variant of a seed
starts from the same student initialisation. Reports AUC, ACC, sensitivity, specificity on the
pooled WLI test split (and the teacher's on NBI), mean and std over seeds; writes JSON.

    python -m benchmarks.centralised                      # cpu preset, 3 seeds, all variants
    python -m benchmarks.centralised preset=paper bench.seeds=[0]
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import platform
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import ConcatDataset

import common  # noqa: F401  (torchvision shim before timm)
from client.site import federation_sites
from client.train import (
    ValidationSelector,
    balanced_loader,
    eval_loader,
    live_teacher_bank,
    predict,
    train_student,
    train_teacher,
)
from common.config import Config, config_from_mapping, config_to_dict
from common.files import atomic_write_json
from common.metrics import classification_metrics, confusion_matrix
from common.device import pick_device
from common.models import build_query_head, build_student, build_teacher
from common.presets import register_hydra_schema

log = logging.getLogger("fedpagkd.centralised")

INIT = "init"  # a variant key that is not a PaGKD setting: where the student's weights start

VARIANTS: dict[str, dict[str, Any]] = {
    "wli_only": {"use_pro": False, "use_den": False},
    "pagkd": {"use_pro": True, "use_den": True},
    "pro_only": {"use_pro": True, "use_den": False},
    "den_only": {"use_pro": False, "use_den": True},
    "pagkd_adaptive": {"use_pro": True, "use_den": True, "grouping": "adaptive", "subtypes": 2},
    # The paper's schedule: CE alone for 5 epochs, then both GKD modules.
    "pagkd_warmup": {"use_pro": True, "use_den": True, "warmup_epochs": 5},
    "pagkd_warmup_light": {"use_pro": True, "use_den": True, "warmup_epochs": 5, "den_weight": 0.1},
    # Student initialised from the trained NBI teacher (same backbone): does the transfer need a
    # shared feature space, as the paper's two ImageNet-initialised ResNet-50s have?
    "wli_only_teacher_init": {"use_pro": False, "use_den": False, INIT: "teacher"},
    "pagkd_teacher_init": {"use_pro": True, "use_den": True, INIT: "teacher"},
}
REPORTED = ("auc", "accuracy", "sensitivity", "specificity")
# Authors' README, PICCOLO (3 classes), AUC.
PAPER_PICCOLO_AUC = {"pagkd": 0.901, "wli_only": 0.712, "pro_only": 0.850, "den_only": 0.835}


def pooled_data(cfg: Config) -> dict[tuple[str, str], ConcatDataset | None]:
    """{(modality, split): every site's split of that modality pooled}, for the federation's
    sites (embedded default or ``data.root``). A val split no site of a modality holds is None:
    as in a federated run, nothing is then selected and the last epoch is kept."""
    sites = federation_sites(cfg)

    def pool(modality: str, split: str) -> ConcatDataset | None:
        parts = [s.split(split) for s in sites if s.modality == modality and (split != "val" or s.val is not None)]
        if not parts:
            if split == "val":
                log.warning("no %s site holds a val split: the last epoch is kept (no model selection)", modality.upper())
                return None
            raise ValueError(f"the federation has no {modality.upper()} site with a {split} split")
        data = ConcatDataset(parts)
        data.labels = np.concatenate([p.labels for p in parts])  # for the balanced sampler
        return data

    return {(m, split): pool(m, split) for m in ("nbi", "wli") for split in ("train", "val", "test")}


def selector(net, val: ConcatDataset | None, cfg: Config, device) -> ValidationSelector:
    """Model selection on a pooled val split; without one nothing is scored (the last epoch stays)."""
    loader = eval_loader(val, cfg.train.batch_size, cfg.data.num_workers) if val is not None else []
    return ValidationSelector(net, loader, device, cfg.train.amp)


def with_variant(cfg: Config, variant: str) -> Config:
    settings = {k: v for k, v in VARIANTS[variant].items() if k != INIT}
    return dataclasses.replace(cfg, pagkd=dataclasses.replace(cfg.pagkd, **settings)).validate()


def needs_teacher(variant: str) -> bool:
    settings = VARIANTS[variant]
    return settings["use_pro"] or settings["use_den"] or settings.get(INIT) == "teacher"


def run_seed(cfg: Config, seed: int, variants: list[str], done: dict[str, Any], record, teacher_wanted: bool = True) -> None:
    """Teacher once, then each student variant from the same initialisation. ``done`` holds
    this seed's finished results (skipped); ``record(name, metrics)`` saves each new one.
    Without ``teacher_wanted`` and no variant that needs one, no teacher is trained (a WLI-only
    learning curve)."""
    device = pick_device(cfg.train.device)
    data = pooled_data(cfg)
    c = cfg.data.num_classes
    bs, workers = cfg.train.batch_size, cfg.data.num_workers
    train_a_teacher = teacher_wanted or any(needs_teacher(v) for v in variants)
    if all(v in done for v in (["nbi_teacher"] if train_a_teacher else []) + variants):
        return
    torch.manual_seed(seed)
    if not train_a_teacher:
        teacher = teacher_head = None
    else:
        teacher, teacher_head = _trained_teacher(cfg, seed, data, done, record, device)
    torch.manual_seed(seed + 1)
    student_init = build_student(cfg.model, c).state_dict()
    for variant in variants:
        if variant in done:
            continue
        vcfg = with_variant(cfg, variant)
        student = build_student(cfg.model, c)
        if VARIANTS[variant].get(INIT) == "teacher":
            if cfg.model.student != cfg.model.teacher:
                raise ValueError(
                    f"variant '{variant}' needs model.student == model.teacher, got {cfg.model.student} / {cfg.model.teacher}"
                )
            student.load_state_dict(teacher.state_dict())
        else:
            student.load_state_dict(student_init)
        # The shared head starts where the teacher left it (a fresh one without a teacher).
        head = copy.deepcopy(teacher_head).requires_grad_(True) if teacher_head is not None else build_query_head(cfg.model, c)
        if vcfg.distils:
            bank_source = live_teacher_bank(
                teacher, head, balanced_loader(data["nbi", "train"], bs, seed + 2, workers), vcfg, device, seed
            )
        else:
            bank_source = lambda: None  # noqa: E731
        started = time.time()
        chooser = selector(student, data["wli", "val"], cfg, device)
        result = train_student(
            student,
            head,
            balanced_loader(data["wli", "train"], bs, seed + 3, workers, cfg.train.sampler == "balanced"),
            bank_source,
            vcfg,
            device,
            vcfg.train.epochs,
            seed,
            on_epoch_end=chooser,
        )
        chooser.restore()
        probs, labels, _ = predict(student, eval_loader(data["wli", "test"], bs, workers), device, cfg.train.amp)
        record(
            variant,
            {
                **classification_metrics(probs, labels),
                "train_s": time.time() - started,
                "best_epoch": chooser.best_epoch,
                "val_auc": chooser.best_auc,
                "train_losses": result.losses,
            },
        )


def _trained_teacher(cfg: Config, seed: int, data, done: dict[str, Any], record, device):
    """The NBI teacher of a seed, selected on NBI val; its test figures recorded once (it is
    retrained on resume: deterministic by seed)."""
    c, bs, workers = cfg.data.num_classes, cfg.train.batch_size, cfg.data.num_workers
    teacher, teacher_head = build_teacher(cfg.model, c), build_query_head(cfg.model, c)
    started = time.time()
    # Model selection on the validation split (best epoch by pooled val AUC); test read once.
    chooser = selector(teacher, data["nbi", "val"], cfg, device)
    train_teacher(
        teacher,
        teacher_head,
        balanced_loader(data["nbi", "train"], bs, seed, workers),
        cfg,
        device,
        cfg.train.teacher_epochs,
        seed,
        on_epoch_end=chooser,
    )
    chooser.restore()
    if "nbi_teacher" not in done:
        probs, labels, _ = predict(teacher, eval_loader(data["nbi", "test"], bs, workers), device, cfg.train.amp)
        record(
            "nbi_teacher",
            {
                **classification_metrics(probs, labels),
                "train_s": time.time() - started,
                "best_epoch": chooser.best_epoch,
                "val_auc": chooser.best_auc,
                "confusion": confusion_matrix(labels, probs.argmax(1), c).tolist(),
            },
        )
    teacher.eval().requires_grad_(False)
    return teacher, teacher_head


def summarise(per_seed: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Mean and std over the seeds that finished each variant (n says how many)."""
    names = list(dict.fromkeys(name for results in per_seed.values() for name in results))
    table: dict[str, dict[str, float]] = {}
    for name in names:
        runs = [results[name] for results in per_seed.values() if name in results]
        row: dict[str, float] = {"n": len(runs)}
        for key in REPORTED + ("train_s",):
            values = np.array([r[key] for r in runs], dtype=np.float64)
            row[f"{key}_mean"], row[f"{key}_std"] = float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0.0)
        table[name] = row
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    head = f"{'variant':<16}{'n':>3}" + "".join(f"{k.upper()[:4]:>16}" for k in REPORTED) + f"{'paper AUC':>11}"
    lines = ["centralised reference, mean +/- std over n seeds", head, "-" * len(head)]
    for name, row in table.items():
        cells = "".join(f"{row[f'{k}_mean']:>9.4f} +/-{row[f'{k}_std']:.3f}" for k in REPORTED)
        paper = PAPER_PICCOLO_AUC.get(name)
        lines.append(f"{name:<16}{int(row['n']):>3}{cells}{'' if paper is None else f'{paper:>11.3f}'}")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpus": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


@dataclasses.dataclass
class BenchSection:
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    variants: list[str] = dataclasses.field(default_factory=lambda: list(VARIANTS))
    out: str = "benchmarks/results/centralised.json"
    teacher: bool = True  # train (and report) the NBI teacher even when no variant needs it


register_hydra_schema("centralised", {"bench": BenchSection()})


@hydra.main(version_base=None, config_path="../conf", config_name="centralised")
def main(conf: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    tree = OmegaConf.to_container(conf, resolve=True)
    bench = tree.pop("bench")
    cfg = config_from_mapping(tree)  # one typed schema: unknown keys and bad values fail here
    unknown = set(bench["variants"]) - set(VARIANTS)
    if unknown:
        raise ValueError(f"bench.variants has unknown {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    out = Path(hydra.utils.to_absolute_path(bench["out"]))
    per_seed: dict[str, dict[str, dict[str, Any]]] = {}
    if out.exists():  # resume: keep what finished under the same config
        previous = json.loads(out.read_text())
        if previous.get("config") == config_to_dict(cfg):
            per_seed = previous["per_seed"]
            log.info("resuming %s: %s", out, {k: sorted(v) for k, v in per_seed.items()})

    def write() -> None:
        atomic_write_json(
            out,
            {
                "config": config_to_dict(cfg),
                "bench": bench,
                "summary": summarise(per_seed) if per_seed else {},
                "per_seed": per_seed,
                "paper_piccolo_auc": PAPER_PICCOLO_AUC,
                "environment": environment(),
            },
        )

    for seed in bench["seeds"]:
        results = per_seed.setdefault(str(seed), {})

        def record(name: str, metrics: dict[str, Any], results=results, seed=seed) -> None:
            results[name] = metrics
            write()
            log.info("seed %d %s AUC %.4f (%.0f s)", seed, name, metrics["auc"], metrics["train_s"])

        seed_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=int(seed)))
        run_seed(seed_cfg, int(seed), list(bench["variants"]), results, record, bench["teacher"])
    print(format_table(summarise(per_seed)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
