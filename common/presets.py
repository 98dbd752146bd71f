"""Named small-run presets: the quick settings tests, the loopback harness and benchmarks share.

Each preset is a flat run config, ``{dotted key: value}``, fit for :func:`common.config.config_from_flat`,
``flwr run --run-config`` (:func:`server.processes.run_config_arg`) and :func:`server.launch.simulate`;
callers put their own overrides on top (``{**TINY, "fed.student_rounds": 3}``). They are built
from three shared pieces, so a change to "the small model" is one edit:

* :data:`SMALL_HEAD`: D = 32, 4 heads, 4 queries, codebooks of 4, groups of 4 (K_min 2);
* :data:`TEST_RESNET`: timm's ``test_resnet`` (0.37 M parameters) as teacher and student;
* :data:`EVERY_PHASE`: GKD-Pro + GKD-Den on and the student from scratch, so a run goes through
  every phase of the protocol (teacher, knowledge refresh, distilling student) whatever the
  shipped default run is.

=========== ============================================================ ==========================
name        what                                                         read by
=========== ============================================================ ==========================
tiny        smallest protocol run: 32 px, 24 train / 6 val / 15 test      tests (conftest TINY)
            images per site, one round of each phase
loopback    the deployment harness's run: 32 px, resnet10t, one Lloyd    tests/harness/loopback.py
            step, 300 s round timeout, the synthetic label order
scale       tiny heterogeneous sites (Pareto sizes, Dirichlet classes,   benchmarks/scale.py
            render shift) for N = 4 .. 64 sites
fast        ~20-40 s per federated run on 2 cores: 64 px, 192 train /    benchmarks/federated.py
            150 test images, 2 teacher + 6 student rounds                (--fast), sweep.py
robustness  ``fast`` with both group terms, student from the teacher     benchmarks/robustness.py
=========== ============================================================ ==========================

The full-size settings (the CPU recipe and the paper's) are Hydra presets in ``conf/preset/``.
"""

from __future__ import annotations

from typing import Any

SMALL_HEAD: dict[str, Any] = {
    "model.embed_dim": 32,
    "model.num_heads": 4,
    "model.num_queries": 4,
    "pagkd.codebook_size": 4,
    "pagkd.group_size": 4,
    "pagkd.min_group_size": 2,
}
TEST_RESNET: dict[str, Any] = {"model.student": "test_resnet", "model.teacher": "test_resnet"}
EVERY_PHASE: dict[str, Any] = {"pagkd.use_pro": True, "pagkd.use_den": True, "fed.student_init": "scratch"}

# The smallest configuration the protocol runs with (tests: conftest.tiny_config puts overrides on top).
TINY: dict[str, Any] = {
    "data.image_size": 32,
    "data.train_per_site": 24,
    "data.test_per_site": 15,  # 5 per class: no site size equals a declared dim (privacy audit)
    "data.val_per_site": 6,  # model selection reads it every round
    "train.batch_size": 12,
    "train.local_epochs": 1,
    "train.device": "cpu",
    **TEST_RESNET,  # 1x1 last-stage map at 32 px
    **SMALL_HEAD,
    "fed.teacher_rounds": 1,
    "fed.student_rounds": 1,
    "fed.num_bins": 20,
    **EVERY_PHASE,
}

# The loopback deployment's base run config (TINY's shape on real processes, where every message
# is a process of its own).
LOOPBACK: dict[str, Any] = {
    "data.image_size": 32,
    "data.num_classes": 3,  # must match the class folders the harness writes
    # The synthetic generator's label order: the sites' ImageFolders would otherwise be read in
    # sorted folder order (adenocarcinoma, adenoma, hyperplasia), a permutation of the labels
    # that makes a deployment run differ from the simulation it is compared with.
    "data.class_names": "hyperplasia,adenoma,adenocarcinoma",
    "data.nbi_sites": 2,
    "data.wli_sites": 2,
    "data.train_per_site": 24,
    "data.val_per_site": 0,
    "data.test_per_site": 12,
    "model.student": "resnet10t",
    "model.teacher": "resnet10t",
    **SMALL_HEAD,
    "pagkd.kmeans_iters": 1,  # each Lloyd step is one more message per NBI site (a process each)
    "train.batch_size": 12,
    "train.device": "cpu",
    "fed.teacher_rounds": 1,
    "fed.student_rounds": 1,
    "fed.round_timeout": 300.0,
    **EVERY_PHASE,
}

# Tiny heterogeneous sites for the scale benchmark (1 teacher + 2 student rounds).
SCALE: dict[str, Any] = {
    "data.image_size": 32,
    "data.train_per_site": 24,
    "data.test_per_site": 12,
    "data.val_per_site": 0,
    "data.size_tail": 1.5,
    "data.class_alpha": 2.0,
    "data.render_shift": 0.3,
    **TEST_RESNET,
    **SMALL_HEAD,
    "pagkd.kmeans_iters": 1,
    **EVERY_PHASE,
    "train.batch_size": 12,
    "train.local_epochs": 1,
    "train.device": "cpu",
    "fed.teacher_rounds": 1,
    "fed.student_rounds": 2,
    "fed.num_bins": 20,
}

# A small setting a 2-core CPU runs in well under a minute per federated run, in which the NBI
# teacher and a WLI student started from it both learn (tests/test_simulation.py's run):
# timm test_resnet at 64 px, 192 train / 150 test images per site, 2 teacher + 6 student rounds.
# No EVERY_PHASE: each benchmark method spells out its own switches.
FAST: dict[str, Any] = {
    "data.image_size": 64,
    "data.train_per_site": 192,
    "data.test_per_site": 150,
    "data.val_per_site": 0,
    "train.batch_size": 24,
    "train.lr": 0.003,
    "train.local_epochs": 2,
    "train.device": "cpu",
    **TEST_RESNET,
    **SMALL_HEAD,
    "fed.teacher_rounds": 2,
    "fed.student_rounds": 6,
    "fed.num_bins": 200,
}

# FAST with the WLI student started from the NBI teacher (so that it learns) and both
# group terms on: the poisoning and privacy benchmarks' base.
ROBUSTNESS: dict[str, Any] = {**FAST, "pagkd.use_pro": True, "pagkd.use_den": True, "fed.student_init": "teacher"}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": TINY,
    "loopback": LOOPBACK,
    "scale": SCALE,
    "fast": FAST,
    "robustness": ROBUSTNESS,
}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of preset ``name`` with ``overrides`` (``__`` for the dot: ``fed__student_rounds=3``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
    return {**PRESETS[name], **{key.replace("__", "."): value for key, value in overrides.items()}}
