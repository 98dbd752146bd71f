"""One typed configuration for every entry point.

Flower's ``run_config`` (flattened dotted keys, e.g. ``train.lr`` or ``fed.student-rounds``),
Hydra (``conf/``) and the centralised CLI all fill the same :class:`Config`. Unknown keys and
out-of-range values raise :class:`ConfigError` naming the key, the value and what is allowed.

Key spelling: sections and fields use ``snake_case`` here; ``kebab-case`` (Flower's habit) is
accepted and means the same key.

The sections, their keys and defaults are in :mod:`common.config_schema`. A field with a fixed
set of choices is typed ``Literal[...]`` (:data:`Grouping`, :data:`Schedule`, :data:`Augment`,
:data:`StudentInit`, :data:`StudentSites`, :data:`Aggregation`): that type is the one list of its
choices, read by validation (and by the code that dispatches on them, e.g.
``server.aggregation.ROBUST``). Rules derived from several keys are :class:`Config` properties
(:attr:`Config.distils`, :attr:`Config.needs_nbi_sites`). Named configurations (presets, methods,
experiments, regimes) are in the registry, :mod:`common.presets`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from common.config_schema import (
    AGGREGATIONS,
    Aggregation,
    Augment,
    DataConfig,
    FederationConfig,
    LIMITS,
    MIN_SITE_LOST_S,
    Grouping,
    ModelConfig,
    PaGKDConfig,
    PrivacyConfig,
    Sampler,
    Schedule,
    StudentInit,
    StudentSites,
    TrainConfig,
)


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message says which and what is allowed."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pagkd: PaGKDConfig = field(default_factory=PaGKDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fed: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    @property
    def distils(self) -> bool:
        """Group-level distillation is on (GKD-Pro or GKD-Den): the run has knowledge rounds."""
        return self.pagkd.use_pro or self.pagkd.use_den

    @property
    def needs_nbi_sites(self) -> bool:
        """The run has teacher rounds, so it needs NBI sites: distillation reads their bank, and
        ``fed.student_init=teacher`` starts the student from their teacher. Otherwise (a WLI-only
        student from scratch) NBI sites are not asked for."""
        return self.distils or self.fed.student_init == "teacher"

    def validate(self) -> "Config":
        """Check ranges; raise :class:`ConfigError` naming the first bad key.

        Every size, count and iteration has an upper bound too (:data:`LIMITS`): a value
        that would exhaust memory or run for days is refused here, before any process starts."""
        bounded = [(key, _lookup(self, key) <= limit, f"<= {limit:,} ({why})") for key, (limit, why) in LIMITS.items()]
        checks: list[tuple[str, bool, str]] = bounded + [
            ("data.num_classes", self.data.num_classes >= 2, ">= 2"),
            ("data.image_size", self.data.image_size >= 32, ">= 32"),
            ("data.nbi_sites", self.data.nbi_sites >= 0, ">= 0"),
            ("data.wli_sites", self.data.wli_sites >= 0, ">= 0"),
            ("data.train_per_site", self.data.train_per_site >= self.data.num_classes, ">= data.num_classes"),
            ("data.val_per_site", self.data.val_per_site >= 0, ">= 0"),
            ("data.test_per_site", self.data.test_per_site >= 0, ">= 0"),
            ("data.num_workers", self.data.num_workers >= 0, ">= 0 (0 = load in the training process)"),
            ("data.root", "\0" not in self.data.root, "a path without NUL characters"),
            ("data.size_tail", self.data.size_tail >= 0, ">= 0"),
            ("data.class_alpha", self.data.class_alpha >= 0, ">= 0"),
            ("data.render_shift", 0 <= self.data.render_shift <= 1, "in [0, 1]"),
            ("data.nbi_train_scale", 0 < self.data.nbi_train_scale <= 20, "in (0, 20]"),
            ("model.num_heads", self.model.num_heads >= 1, ">= 1"),
            (
                "model.embed_dim",
                self.model.embed_dim > 0 and self.model.num_heads >= 1 and self.model.embed_dim % self.model.num_heads == 0,
                "> 0 and divisible by model.num_heads",
            ),
            ("model.num_queries", self.model.num_queries >= 1, ">= 1"),
            ("model.teacher", timm_model_known(self.model.teacher), KNOWN_MODEL),
            ("model.student", timm_model_known(self.model.student), KNOWN_MODEL),
            ("model.output_stride", self.model.output_stride in (8, 16, 32), "8, 16 or 32"),
            ("pagkd.den_weight", self.pagkd.den_weight >= 0, ">= 0"),
            ("pagkd.pro_weight", self.pagkd.pro_weight >= 0, ">= 0"),
            ("pagkd.temperature", self.pagkd.temperature > 0, "> 0"),
            ("pagkd.fg_threshold", 0 <= self.pagkd.fg_threshold <= 1, "in [0, 1]"),
            ("pagkd.bg_threshold", 0 <= self.pagkd.bg_threshold <= 1, "in [0, 1]"),
            ("pagkd.warmup_epochs", self.pagkd.warmup_epochs >= 0, ">= 0 (0 = the group terms from the first epoch)"),
            (
                "pagkd.bg_threshold",
                0 <= self.pagkd.bg_threshold <= self.pagkd.fg_threshold <= 1,
                "0 <= bg_threshold <= fg_threshold <= 1",
            ),
            _choice(self, "pagkd.grouping"),
            ("pagkd.min_group_size", self.pagkd.min_group_size >= 2, ">= 2 (a group of one is a per-image statistic)"),
            ("pagkd.group_size", self.pagkd.group_size >= self.pagkd.min_group_size, ">= pagkd.min_group_size"),
            ("pagkd.subtypes", self.pagkd.subtypes >= 1, ">= 1"),
            ("pagkd.codebook_size", self.pagkd.codebook_size >= 1, ">= 1"),
            ("pagkd.kmeans_iters", self.pagkd.kmeans_iters >= 1, ">= 1"),
            ("train.lr", self.train.lr > 0, "> 0"),
            ("train.weight_decay", self.train.weight_decay >= 0, ">= 0"),
            ("train.batch_size", self.train.batch_size >= self.data.num_classes, ">= data.num_classes"),
            (
                "pagkd.min_group_size",
                not self.distils or self.pagkd.min_group_size <= self.train.batch_size // self.data.num_classes,
                "<= train.batch_size // data.num_classes (a class's share of a class-balanced batch; larger groups "
                "never form and the group losses would be off): lower it or raise train.batch_size",
            ),
            ("train.epochs", self.train.epochs >= 0, ">= 0"),
            ("train.teacher_epochs", self.train.teacher_epochs >= 0, ">= 0"),
            ("train.seed", self.train.seed >= 0, ">= 0"),
            ("train.local_epochs", self.train.local_epochs >= 1, ">= 1"),
            ("train.rotation_deg", 0 <= self.train.rotation_deg <= 180, "in [0, 180]"),
            _choice(self, "train.schedule"),
            ("train.warmup_fraction", 0 <= self.train.warmup_fraction < 1, "in [0, 1)"),
            _choice(self, "train.augment"),
            _choice(self, "train.sampler"),
            (
                "train.sampler",
                self.train.sampler == "balanced" or not self.pagkd.use_pro,
                "'balanced' with pagkd.use_pro=true (GKD-Pro's groups are the classes of a batch)",
            ),
            ("train.color_jitter", 0 <= self.train.color_jitter < 1, "in [0, 1)"),
            (
                "train.device",
                self.train.device == "auto" or self.train.device.split(":")[0] in ("cpu", "cuda", "mps"),
                "auto, cpu, cuda or cuda:N",
            ),
            ("fed.teacher_rounds", self.fed.teacher_rounds >= 0, ">= 0"),
            ("fed.student_rounds", self.fed.student_rounds >= 0, ">= 0"),
            ("fed.bank_refresh_every", self.fed.bank_refresh_every >= 0, ">= 0"),
            ("fed.min_nbi_sites", self.fed.min_nbi_sites >= 1, ">= 1"),
            ("fed.min_wli_sites", self.fed.min_wli_sites >= 1, ">= 1"),
            ("fed.fraction_train", 0 < self.fed.fraction_train <= 1, "in (0, 1]"),
            ("fed.round_timeout", self.fed.round_timeout > 0, "> 0"),
            ("fed.resend_crashed", self.fed.resend_crashed >= 0, ">= 0"),
            (
                "fed.site_lost_s",
                self.fed.site_lost_s >= MIN_SITE_LOST_S,
                f">= {MIN_SITE_LOST_S:.0f} (a SuperNode's heartbeats come ~24 s apart)",
            ),
            (
                "fed.min_site_share",
                0 <= self.fed.min_site_share <= 1,
                "in [0, 1] (1 = every discovered site must take part throughout)",
            ),
            (
                "fed.max_site_share",
                0 < self.fed.max_site_share <= 1,
                "in (0, 1] (1 = no cap; 0.5: no site outweighs all the others together)",
            ),
            (
                "fed.run_name",
                run_name_ok(self.fed.run_name),
                "one folder name inside fed.run_dir: letters, digits, '.', '_', '-', not starting with '.' (no '/', no '..')",
            ),
            ("fed.run_dir", bool(self.fed.run_dir) and "\0" not in self.fed.run_dir, "a non-empty path"),
            _choice(self, "fed.student_init"),
            (
                "fed.student_init",
                self.fed.student_init != "teacher" or self.model.student == self.model.teacher,
                "'teacher' only when model.student == model.teacher (the student starts from the teacher's weights); "
                "set fed.student_init=scratch for a student backbone of its own",
            ),
            ("fed.num_bins", self.fed.num_bins >= 10, ">= 10"),
            ("fed.max_norm_ratio", self.fed.max_norm_ratio > 1, "> 1 (a multiple of the median update norm)"),
            _choice(self, "fed.student_sites"),
            (
                "fed.student_sites",
                self.fed.student_sites == "wli" or not self.distils,
                "'all' (the joint cross-modal baseline) only with pagkd.use_pro=false pagkd.use_den=false",
            ),
            ("fed.fedproto_weight", self.fed.fedproto_weight >= 0, ">= 0 (0 = off)"),
            _choice(self, "fed.aggregation"),
            ("fed.trim_fraction", 0 <= self.fed.trim_fraction < 0.5, "in [0, 0.5)"),
            ("fed.clip_ratio", self.fed.clip_ratio >= 0, ">= 0 (0 = off; a multiple of the median update norm)"),
            ("privacy.noise_multiplier", self.privacy.noise_multiplier >= 0, ">= 0 (0 = no DP noise)"),
            ("privacy.clip", self.privacy.clip > 0, "> 0"),
            ("privacy.delta", 0 < self.privacy.delta < 1, "in (0, 1)"),
            (
                "privacy.secure_aggregation",
                not self.privacy.secure_aggregation or (self.fed.aggregation == "mean" and self.fed.clip_ratio == 0),
                "false with fed.aggregation != mean or fed.clip_ratio > 0 (under secure aggregation the server sees only sums)",
            ),
        ]
        for key, ok, allowed in checks:
            if not ok:
                value = _lookup(self, key)
                raise ConfigError(f"config key '{key}' = {value!r} is out of range: expected {allowed}")
        return self


def parse_class_names(text: str, key: str = "data.class_names") -> tuple[str, ...]:
    """``"hyperplastic, adenoma"`` -> ``("hyperplastic", "adenoma")``; ``""`` -> ``()`` (discover).

    Refuses (naming ``key``) fewer than 2 names, an empty or repeated name, and a name that
    cannot be a class folder (a path separator or a leading dot)."""
    if not text.strip():
        return ()
    names = tuple(part.strip() for part in text.split(","))
    fix = f"give at least 2 distinct comma-separated names, e.g. {key}='hyperplastic,adenoma'"
    if len(names) < 2 or any(not n for n in names):
        raise ConfigError(f"config key '{key}' = {text!r}: {fix}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"config key '{key}' = {text!r} repeats {repeated}: {fix}")
    bad = [n for n in names if "/" in n or "\\" in n or n.startswith(".")]
    if bad:
        raise ConfigError(f"config key '{key}' = {text!r}: {bad} cannot be class folder names (no '/', '\\' or leading '.')")
    return names


def _lookup(cfg: "Config", key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def choices(key: str) -> tuple[Any, ...]:
    """The allowed values of an enumerated key (its ``Literal`` type), e.g. ``choices("fed.aggregation")``;
    ``()`` for a key without a fixed set."""
    section, name = key.split(".")
    kind = _field_types(_field_types(Config)[section])[name]
    return typing.get_args(kind) if typing.get_origin(kind) is Literal else ()


def _choice(cfg: "Config", key: str) -> tuple[str, bool, str]:
    """A validation check of an enumerated key against its ``Literal`` choices:
    (key, ok, "'a', 'b' or 'c'")."""
    allowed = [repr(value) for value in choices(key)]
    spelled = allowed[0] if len(allowed) == 1 else f"{', '.join(allowed[:-1])} or {allowed[-1]}"
    return key, _lookup(cfg, key) in choices(key), spelled


def enumerated_keys() -> list[str]:
    """Every key whose values are a fixed set (a ``Literal`` field)."""
    return [key for key in config_keys() if choices(key)]


KNOWN_MODEL = (
    "a model name timm knows (timm.list_models(), e.g. 'resnet50' or 'resnet50.a1_in1k'), or this project's "
    "'pagkd_cnn_s' / 'pagkd_cnn_m' (common/backbones.py); check the spelling"
)


@functools.lru_cache(maxsize=64)
def timm_model_known(name: str) -> bool:
    """Whether ``timm.create_model(name)`` can find ``name``: in timm's registry (a pretrained
    tag such as ``.a1_in1k`` included, this project's backbones registered), or with a source
    prefix (``hf-hub:``, ``local-dir:``) that only building the model can resolve. Without this
    a misspelt name passed the config check and preflight and failed later without the key."""
    import common.backbones  # noqa: F401  (the torchvision shim, then registers our backbones in timm)
    from timm.models import is_model, parse_model_name

    try:
        source, _ = parse_model_name(name)
    except ValueError:
        return False
    return source is not None or is_model(name)


def run_name_ok(name: str) -> bool:
    """A run name is one plain folder name (empty: a timestamp), so a run folder can never
    land outside ``fed.run_dir`` ('../x', '/abs', 'a/b' are refused)."""
    return name == "" or (name[0] != "." and len(name) <= 200 and all(ch.isalnum() or ch in "._-" for ch in name))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Coerce a TOML/CLI value to the declared field type, refusing lossy conversions.

    A ``Literal`` field takes its choices' type (str); whether the value is one of them is
    :meth:`Config.validate`'s check, which names the choices."""
    if typing.get_origin(kind) is Literal:
        kind = type(typing.get_args(kind)[0])
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"config key '{key}' = {value!r}: must be a finite number")
            return number
    elif kind is str:
        if isinstance(value, str):
            return value
    name = getattr(kind, "__name__", str(kind))
    raise ConfigError(f"config key '{key}' = {value!r}: expected a value of type {name}")


# Keys renamed since they were published: the old name is read as the new one (run configs,
# CLI overrides, resumed run folders).
RENAMED_KEYS = {"fed.proto_weight": "fed.fedproto_weight"}


def _normalise(key: str) -> str:
    key = key.strip().replace("-", "_")
    return RENAMED_KEYS.get(key, key)


def config_keys() -> list[str]:
    """Every valid dotted key, e.g. ``train.lr``."""
    return [f"{section}.{name}" for section, cls in _field_types(Config).items() for name in _field_types(cls)]


def config_from_flat(values: Mapping[str, Any], base: Config | None = None) -> Config:
    """Build a validated :class:`Config` from dotted keys (Flower run_config, CLI overrides).

    Keys outside the schema raise :class:`ConfigError` listing the valid keys of that section.
    Keys without a section prefix are refused too: every key belongs to one section.
    """
    cfg = dataclasses.replace(base) if base is not None else Config()
    # Copy the sections so the base config is never mutated.
    for section in _field_types(Config):
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section)))
    sections = _field_types(Config)
    for raw_key, value in values.items():
        parts = _normalise(raw_key).split(".")
        if len(parts) != 2 or parts[0] not in sections:
            raise ConfigError(
                f"unknown config key '{raw_key}': keys look like '<section>.<name>' with section one of {sorted(sections)}"
            )
        section, name = parts
        fields = _field_types(sections[section])
        if name not in fields:
            raise ConfigError(f"unknown config key '{raw_key}': section '{section}' has {sorted(fields)}")
        setattr(getattr(cfg, section), name, _coerce(raw_key, value, fields[name]))
    names = parse_class_names(cfg.data.class_names)
    if names:  # the names define the classes; Flower's run config always carries a num_classes too
        cfg.data.num_classes = len(names)
    return cfg.validate()


def config_to_flat(cfg: Config) -> dict[str, Any]:
    """Inverse of :func:`config_from_flat`: dotted snake_case keys to plain values."""
    return {
        f"{section}.{name}": getattr(getattr(cfg, section), name)
        for section in _field_types(Config)
        for name in _field_types(type(getattr(cfg, section)))
    }


def config_from_mapping(tree: Mapping[str, Any]) -> Config:
    """Build from a nested mapping (a Hydra/OmegaConf container or JSON)."""
    flat: dict[str, Any] = {}
    for section, body in tree.items():
        if not isinstance(body, Mapping):
            raise ConfigError(f"config section '{section}' must be a table of keys, got {body!r}")
        for name, value in body.items():
            flat[f"{section}.{name}"] = value
    return config_from_flat(flat)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "FederationConfig",
    "ModelConfig",
    "PaGKDConfig",
    "PrivacyConfig",
    "TrainConfig",
    "AGGREGATIONS",
    "LIMITS",
    "Aggregation",
    "Augment",
    "Grouping",
    "Sampler",
    "Schedule",
    "StudentInit",
    "StudentSites",
    "choices",
    "config_from_flat",
    "config_from_mapping",
    "config_keys",
    "config_to_dict",
    "config_to_flat",
    "enumerated_keys",
    "parse_class_names",
]
