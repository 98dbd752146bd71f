"""Is federated GKD-Den more than a centre loss? Read finished distilling runs and measure it.

    python -m benchmarks.den_check runs/tune/fedpagkd_teacher_init-*-seed0 runs/study/default/fedpagkd*-seed0

With the federated codebook a WLI token attends only to the ``pagkd.codebook_size`` centroids
of its image's class and its own token label (and the uncertain ones), not to the teacher's
tokens. If its attention is flat, or the centroids of a class and label nearly coincide, every
token of that class and label is pulled to one point: a centre loss. For each run folder this
loads the selected student, its query head and the last bank (``state.safetensors``), runs
every WLI site's training images through the student with the site's own token labels and
reports :func:`common.losses.den_target_spread` (effective keys per token, admissible keys,
cosine of a token's target to the plain centre), plus the run's pagkd.codebook_size and its
selected val / test AUC. Writes benchmarks/results/den_check.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file

import common  # noqa: F401
from client.site import federation_sites
from client.train import eval_loader
from client.wire import load_numpy_state
from common.config import config_from_mapping
from common.files import atomic_write_json
from common.losses import KnowledgeBank, den_target_spread
from common.models import build_student, labelled_forward
from common.results import RunResult
from server.state import unflatten_blocks


@torch.no_grad()
def check_run(run: Path, max_images: int = 512) -> dict[str, Any]:
    """The spread of GKD-Den's targets for the selected student of one finished run folder."""
    cfg = config_from_mapping(json.loads((run / "config.json").read_text()))
    if not cfg.pagkd.use_den:
        raise SystemExit(f"{run}: pagkd.use_den is off in its config.json; GKD-Den was not trained there")
    blocks = unflatten_blocks(load_file(run / "state.safetensors"))
    student = build_student(cfg.model, cfg.data.num_classes, initial=False)
    load_numpy_state(student, blocks.get("best-student-student", blocks["student"]), "student")
    student.eval()
    bank = KnowledgeBank.from_statistics(blocks["bank"])
    parts: list[dict[str, float]] = []
    for site in (s for s in federation_sites(cfg) if s.modality == "wli"):
        seen = 0
        for images, labels in eval_loader(site.train, cfg.train.batch_size):
            out, token_labels = labelled_forward(student, images, labels, cfg.pagkd)
            parts.append(den_target_spread(out.tokens, token_labels, labels, bank, cfg.pagkd.temperature))
            seen += len(labels)
            if seen >= max_images:
                break
    weights = np.array([p["tokens"] for p in parts], dtype=float)
    result = RunResult.read(run)
    return {
        "run": str(run),
        "codebook_size": cfg.pagkd.codebook_size,
        "den_weight": cfg.pagkd.den_weight,
        **{
            k: float(np.average([p[k] for p in parts], weights=weights))
            for k in ("effective_keys", "admissible_keys", "centre_cosine", "target_agreement", "token_agreement")
        },
        "tokens": int(weights.sum()),
        "val_auc": result.selection["student"].val_auc,
        "test_auc": result.final.auc,
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders of distilling runs (pagkd.use_den on)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/den_check.json"))
    args = parser.parse_args(argv)
    rows = [check_run(run) for run in args.runs if (run / "metrics.json").exists()]
    print(
        f"{'run':<46}{'K':>4}{'eff. keys':>10}{'of':>6}{'cos(t, centre)':>15}{'agree':>7}{'tokens':>7}{'val AUC':>9}{'test AUC':>9}"
    )
    for r in rows:
        print(
            f"{Path(r['run']).name:<46}{r['codebook_size']:>4}{r['effective_keys']:>10.2f}{r['admissible_keys']:>6.1f}"
            f"{r['centre_cosine']:>15.4f}{r['target_agreement']:>7.3f}{r['token_agreement']:>7.3f}{r['val_auc']:>9.4f}{r['test_auc']:>9.4f}"
        )
    atomic_write_json(args.out, {"runs": rows})
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
