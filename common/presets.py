"""The registry of named configurations: every preset, method, experiment and data regime, once.

An entry is a flat run config, ``{dotted key: value}``, over the :class:`common.config.Config`
defaults, fit for :func:`common.config.config_from_flat`, ``flwr run --run-config``
(:func:`server.processes.run_config_arg`) and :func:`server.launch.simulate`. Every entry point
reads its named configurations from here, never spells them again:

========== ================================================== ============================================
kind       names                                              read by
========== ================================================== ============================================
preset     recipes: ``cpu`` (the Config defaults), ``paper``  Hydra's ``preset`` group (conf/),
                                                              ``fedpagkd simulate --preset``
           small runs: ``tiny``, ``loopback``, ``scale``,     tests, tests/harness/loopback.py,
           ``fast``, ``robustness``                           benchmarks (scale, federated --fast, sweep,
                                                              robustness)
method     the benchmark arms: ``fedavg_wli_only``,           benchmarks.federated / study / tune / sweep /
           ``fedpagkd``, ``fedavg_teacher_init``, ...         suite
experiment the methods under Hydra's short names (+ private)  Hydra's ``experiment`` group,
                                                              ``fedpagkd simulate --experiment``
regime     ``scarce``, ``default``, ``plentiful``, ``nbi_x4`` benchmarks.study ``--regime``
========== ================================================== ============================================

:func:`compose` is the one rule that puts a recipe and an experiment together, and Hydra's
defaults list (conf/federated.yaml) follows it: the experiment, then the recipe, then the caller's
overrides. A recipe fixes how training runs, and with it the weights of the group terms it was
tuned with: ``preset=paper`` keeps the paper's weights under any experiment, and the experiments'
weights (:data:`TUNED_GROUP_TERMS`, tuned on the CPU recipe, which spells none) apply under ``cpu``.

Small runs are built from three shared pieces, so a change to "the small model" is one edit:

* :data:`SMALL_HEAD`: D = 32, 4 heads, 4 queries, codebooks of 4, groups of 4 (K_min 2);
* :data:`TEST_RESNET`: timm's ``test_resnet`` (0.37 M parameters) as teacher and student;
* :data:`EVERY_PHASE`: GKD-Pro + GKD-Den on and the student from scratch, so a run goes through
  every phase of the protocol (teacher, knowledge refresh, distilling student) whatever the
  shipped default run is.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal

from common.config import Config, _field_types

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

# ---------------------------------------------------------------- presets: recipes

# The CPU recipe is the Config defaults (common/config_schema.py): it trains in minutes on a
# 2-core machine. Nothing to spell, so nothing that can disagree with them.
CPU: dict[str, Any] = {}

# The paper's setting (Hu et al. 2026, PaGKD), every value of it spelled (the paper's, whatever
# the Config defaults become): ResNet-50, 448 px, 12 queries of 128, batch 24,
# L = CE + L_Den + 0.001 (L_con + L_groupCE), Adam 1e-4, wd 1e-8, group losses after 5 epochs.
# Needs a GPU. ImageNet-initialised like the paper (timm's resnet50 weights from the local
# timm/Hugging Face cache or the hub); offline: `fedpagkd fetch-weights resnet50 --out
# resnet50.safetensors` on a connected machine, then model.teacher_weights / model.student_weights.
PAPER: dict[str, Any] = {
    "data.image_size": 448,
    "data.train_per_site": 600,
    "data.test_per_site": 150,
    "model.teacher": "resnet50",
    "model.student": "resnet50",
    "model.pretrained": True,
    "model.embed_dim": 128,
    "model.num_queries": 12,
    "model.num_heads": 16,
    "pagkd.group_size": 8,
    "pagkd.min_group_size": 4,
    "pagkd.pro_weight": 0.001,
    "pagkd.den_weight": 1.0,
    "pagkd.warmup_epochs": 5,
    "train.lr": 0.0001,
    "train.weight_decay": 1.0e-08,
    "train.schedule": "constant",  # the paper's Adam at a fixed rate (AdamW with wd 1e-8 is Adam)
    "train.augment": "rotate",  # rotation +-180 deg at 448 px, as the paper
    "train.rotation_deg": 180.0,
    "train.batch_size": 24,
    "train.epochs": 200,
    "train.teacher_epochs": 200,
    "train.amp": True,
}
RECIPES = ("cpu", "paper")  # the presets Hydra's preset group and `fedpagkd simulate --preset` offer

# ---------------------------------------------------------------- presets: small runs

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

# Tiny heterogeneous sites for the scale benchmark (1 teacher + 2 student rounds, N = 4 .. 64 sites).
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
# teacher learns and a WLI student started from it learns too (tests/test_simulation.py's run):
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

# FAST with the WLI student started from the NBI teacher and both group terms on (their Config
# weights): the poisoning and privacy benchmarks' base.
ROBUSTNESS: dict[str, Any] = {**FAST, "pagkd.use_pro": True, "pagkd.use_den": True, "fed.student_init": "teacher"}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": TINY,
    "loopback": LOOPBACK,
    "scale": SCALE,
    "fast": FAST,
    "robustness": ROBUSTNESS,
    "cpu": CPU,
    "paper": PAPER,
}

# ---------------------------------------------------------------- methods

# The tuned values, each chosen on the validation split by benchmarks/tune.py (the same budget of
# candidates for a method and its baseline) and spelled only here: tune.py's candidates read them,
# and tests/test_presets.py checks that results/tune*.json still choose them.
# GKD-Den / GKD-Pro weights and the CE-only warm-up of the group terms (candidate "light").
TUNED_GROUP_TERMS: dict[str, Any] = {"pagkd.den_weight": 0.3, "pagkd.pro_weight": 0.01, "pagkd.warmup_epochs": 8}
# The FedProto-style regulariser's weight, with the AdamW state kept across rounds (candidate "w0.1").
TUNED_FEDPROTO: dict[str, Any] = {"fed.fedproto_weight": 0.1, "train.keep_optimizer_state": True}

# Every method spelled out in full: none depends on the shipped default run.
_PLAIN = {"pagkd.use_pro": False, "pagkd.use_den": False, "fed.student_init": "scratch"}
_PAGKD = {**EVERY_PHASE, **TUNED_GROUP_TERMS}
METHODS: dict[str, dict[str, Any]] = {
    # (a) WLI-only FedAvg student (CE), with its best measured setting: each site keeps its AdamW
    # state across rounds (docs/results.md (b')).
    "fedavg_wli_only": {**_PLAIN, "train.keep_optimizer_state": True},
    # (b) FedProto-style: WLI sites only, CE + MSE to the global class prototypes (no NBI).
    "fedproto_wli": {**_PLAIN, **TUNED_FEDPROTO},
    # (c) the naive cross-modal baseline: one model FedAvg'ed over WLI and NBI sites (CE).
    # Untuned; run with a fresh AdamW per round (the Config default of the time), spelled so.
    "fedavg_joint": {**_PLAIN, "fed.student_sites": "all", "train.keep_optimizer_state": False},
    # (d) federated PaGKD and its ablations.
    "fedpagkd": dict(_PAGKD),
    "fedpagkd_pro_only": {**_PAGKD, "pagkd.use_den": False},
    "fedpagkd_den_only": {**_PAGKD, "pagkd.use_pro": False},
    "fedpagkd_adaptive": {**_PAGKD, "pagkd.grouping": "adaptive", "pagkd.subtypes": 2},
    # The WLI student starts from the federated NBI teacher (sequential cross-modal transfer),
    # the AdamW state kept across rounds (chosen on val: benchmarks/tune.py, "kept_optimizer").
    "fedavg_teacher_init": {**_PLAIN, "fed.student_init": "teacher", "train.keep_optimizer_state": True},
    # The same run with the group terms on top (their tuned weights): what they add to it.
    "fedpagkd_teacher_init": {**_PAGKD, "fed.student_init": "teacher", "train.keep_optimizer_state": True},
}
# The method the shipped default run is (pyproject.toml's run config = the Config defaults).
DEFAULT_METHOD = "fedavg_teacher_init"

# ---------------------------------------------------------------- experiments (Hydra's names)

EXPERIMENTS: dict[str, dict[str, Any]] = {
    "default": {},  # the shipped default run: DEFAULT_METHOD
    "wli_only": METHODS["fedavg_wli_only"],
    "pagkd": METHODS["fedpagkd"],  # the paper's method: both group terms, student from scratch
    "adaptive": METHODS["fedpagkd_adaptive"],  # k-means sub-types within a class, 2 prototype sets per class
    "teacher_init": METHODS["fedpagkd_teacher_init"],
    "fedproto": METHODS["fedproto_wli"],
    "joint": METHODS["fedavg_joint"],
    # FedPaGKD with the NBI statistics masked (secure aggregation) and differentially private.
    "private": {**EVERY_PHASE, "privacy.secure_aggregation": True, "privacy.noise_multiplier": 1.0},
}

# ---------------------------------------------------------------- data regimes (benchmarks.study)

# Overrides on top of the default federation (WLI training size, NBI:WLI ratio), in the plot's
# order: WLI training size ascending (48 / 96 / 384 per site), then NBI:WLI 4:1.
REGIMES: dict[str, dict[str, Any]] = {
    "scarce": {"data.train_per_site": 48},
    "default": {},
    "plentiful": {"data.train_per_site": 384, "fed.student_rounds": 5, "fed.teacher_rounds": 5},
    "nbi_x4": {"data.nbi_train_scale": 4.0},
}

Kind = Literal["preset", "method", "experiment", "regime"]
REGISTRY: dict[str, dict[str, dict[str, Any]]] = {
    "preset": PRESETS,
    "method": METHODS,
    "experiment": EXPERIMENTS,
    "regime": REGIMES,
}
assert tuple(REGISTRY) == typing.get_args(Kind)


def named(kind: Kind, name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of the ``kind`` entry ``name`` with ``overrides`` (``__`` for the dot:
    ``fed__student_rounds=3``); an unknown name is a ``KeyError`` listing the names of that kind."""
    entries = REGISTRY[kind]
    if name not in entries:
        raise KeyError(f"unknown {kind} {name!r}: choose one of {sorted(entries)}")
    return {**entries[name], **{key.replace("__", "."): value for key, value in overrides.items()}}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of preset ``name`` with ``overrides`` (:func:`named`)."""
    return named("preset", name, **overrides)


def compose(recipe: str = "cpu", experiment: str = "default", overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run config of ``experiment`` under the preset ``recipe``, then ``overrides`` on top:
    the order of Hydra's defaults list (conf/federated.yaml). A recipe's keys win over an
    experiment's: its group weights are the ones tuned for it (module docstring)."""
    if recipe not in RECIPES:
        raise KeyError(f"unknown recipe preset {recipe!r}: choose one of {list(RECIPES)}")
    return {**named("experiment", experiment), **named("preset", recipe), **dict(overrides or {})}


# ---------------------------------------------------------------- publication to Hydra


def register_hydra_schema(name: str, extra: dict[str, Any]) -> None:
    """Register ``Config`` plus entry-point sections (``extra``: name -> dataclass instance) as
    the Hydra structured config ``<name>_schema``, so CLI overrides are type-checked against the
    schema Flower's run config uses; and the recipes and experiments as Hydra's ``preset`` and
    ``experiment`` groups, read from this registry (conf/ spells none of them)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    sections = [(section, mirror, dataclasses.field(default_factory=mirror)) for section, mirror in _mirrors(Config).items()]
    fields = [(key, type(v), dataclasses.field(default_factory=lambda v=v: dataclasses.replace(v))) for key, v in extra.items()]
    store.store(name=f"{name}_schema", node=dataclasses.make_dataclass(f"{name}_schema", sections + fields))
    for recipe in RECIPES:
        store.store(group="preset", name=recipe, node=nested(PRESETS[recipe]), package="_global_")
    for experiment, values in EXPERIMENTS.items():
        store.store(group="experiment", name=experiment, node=nested(values), package="_global_")


def nested(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"pagkd.use_pro": True}`` -> ``{"pagkd": {"use_pro": True}}`` (a Hydra/OmegaConf tree)."""
    tree: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        section, field_name = key.split(".")
        tree.setdefault(section, {})[field_name] = value
    return tree


def _mirrors(config: type) -> dict[str, type]:
    """Each section of ``config`` with its ``Literal`` fields typed by their choices' type:
    OmegaConf has no ``Literal``; the choices are still checked, by :meth:`Config.validate`."""
    mirrors = {}
    for section, cls in _field_types(config).items():
        fields = []
        for f in dataclasses.fields(cls):
            kind = _field_types(cls)[f.name]
            if typing.get_origin(kind) is Literal:
                kind = type(typing.get_args(kind)[0])
            fields.append((f.name, kind, dataclasses.field(default=f.default)))
        mirrors[section] = dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)
    return mirrors
