"""The typed configuration (common/config.py): keys, ranges, coercion, round trips."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from common.config import (
    Config,
    ConfigError,
    config_from_flat,
    config_from_mapping,
    config_keys,
    config_to_dict,
    config_to_flat,
)


def test_defaults_validate():
    cfg = Config()
    assert cfg.validate() is cfg
    assert config_from_flat({}) == Config()


def test_config_keys_cover_every_field():
    keys = config_keys()
    assert "train.lr" in keys and "fed.student_rounds" in keys and "pagkd.use_den" in keys
    assert len(keys) == len(set(keys)) == len(config_to_flat(Config()))


@pytest.mark.parametrize(
    "key",
    ["fed.student-rounds", "fed.student_rounds", " fed.student-rounds "],
)
def test_kebab_and_snake_case_mean_the_same_key(key):
    cfg = config_from_flat({key: 7})
    assert cfg.fed.student_rounds == 7


def test_kebab_section_and_field_together():
    cfg = config_from_flat({"pagkd.min-group-size": 3, "pagkd.group-size": 5, "train.weight-decay": 0.5})
    assert cfg.pagkd.min_group_size == 3
    assert cfg.pagkd.group_size == 5
    assert cfg.train.weight_decay == 0.5


def test_unknown_key_names_it_and_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        config_from_flat({"train.learning_rate": 0.1})
    message = str(info.value)
    assert "train.learning_rate" in message
    for valid in ("lr", "batch_size", "weight_decay"):
        assert valid in message


def test_unknown_section_names_it_and_lists_sections():
    with pytest.raises(ConfigError) as info:
        config_from_flat({"optim.lr": 0.1})
    message = str(info.value)
    assert "optim.lr" in message
    for section in ("data", "model", "pagkd", "train", "fed"):
        assert section in message


@pytest.mark.parametrize("key", ["lr", "a.b.c", ""])
def test_key_without_exactly_one_section_is_refused(key):
    with pytest.raises(ConfigError, match="unknown config key"):
        config_from_flat({key: 1})


@pytest.mark.parametrize(
    "overrides, bad_key",
    [
        ({"data.num_classes": 1}, "data.num_classes"),
        ({"data.image_size": 16}, "data.image_size"),
        ({"data.render_shift": 1.5}, "data.render_shift"),
        ({"model.embed_dim": 100, "model.num_heads": 8}, "model.embed_dim"),
        ({"model.num_queries": 0}, "model.num_queries"),
        ({"pagkd.temperature": 0.0}, "pagkd.temperature"),
        ({"pagkd.den_weight": -1.0}, "pagkd.den_weight"),
        ({"pagkd.bg_threshold": 0.7, "pagkd.fg_threshold": 0.6}, "pagkd.bg_threshold"),
        ({"pagkd.grouping": "kmeans"}, "pagkd.grouping"),
        ({"pagkd.min_group_size": 1}, "pagkd.min_group_size"),
        ({"pagkd.group_size": 3, "pagkd.min_group_size": 4}, "pagkd.group_size"),
        ({"train.lr": 0.0}, "train.lr"),
        ({"train.batch_size": 2}, "train.batch_size"),
        ({"train.device": "tpu"}, "train.device"),
        ({"fed.fraction_train": 0.0}, "fed.fraction_train"),
        ({"fed.fraction_train": 1.5}, "fed.fraction_train"),
        ({"fed.min_wli_sites": 0}, "fed.min_wli_sites"),
        ({"fed.num_bins": 5}, "fed.num_bins"),
    ],
)
def test_out_of_range_values_name_the_key(overrides, bad_key):
    with pytest.raises(ConfigError) as info:
        config_from_flat(overrides)
    message = str(info.value)
    assert f"'{bad_key}'" in message
    assert "out of range" in message


def test_in_range_edge_values_are_accepted():
    cfg = config_from_flat(
        {"data.render_shift": 1.0, "fed.fraction_train": 1.0, "pagkd.bg_threshold": 0.6, "train.device": "cuda:1"}
    )
    assert cfg.data.render_shift == 1.0 and cfg.pagkd.bg_threshold == 0.6 and cfg.train.device == "cuda:1"


def test_type_coercion():
    cfg = config_from_flat(
        {
            "fed.student_rounds": "3",  # int from str
            "train.epochs": 4.0,  # int from an integral float
            "train.lr": 1,  # float from int
            "pagkd.temperature": "0.5",  # float from str
            "train.amp": "false",  # bool from str
            "pagkd.use_den": "True",
        }
    )
    assert cfg.fed.student_rounds == 3 and type(cfg.fed.student_rounds) is int
    assert cfg.train.epochs == 4 and type(cfg.train.epochs) is int
    assert cfg.train.lr == 1.0 and type(cfg.train.lr) is float
    assert cfg.pagkd.temperature == 0.5
    assert cfg.train.amp is False
    assert cfg.pagkd.use_den is True


@pytest.mark.parametrize(
    "key, value",
    [
        ("fed.student_rounds", "abc"),
        ("fed.student_rounds", 1.5),
        ("fed.student_rounds", True),  # a bool is not a count
        ("train.lr", "fast"),
        ("train.lr", True),
        ("train.amp", "yes"),
        ("train.amp", 1),
        ("model.teacher", 18),
        ("data.root", None),
    ],
)
def test_lossy_or_wrong_type_is_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError) as info:
        config_from_flat({key: value})
    assert f"'{key}'" in str(info.value)
    assert "expected a value of type" in str(info.value)


def test_config_to_flat_round_trip():
    cfg = config_from_flat(
        {
            "model.student": "efficientnet_b0",
            "fed.student_init": "scratch",
            "pagkd.grouping": "adaptive",
            "train.lr": 3e-4,
            "fed.num_bins": 50,
        }
    )
    flat = config_to_flat(cfg)
    assert set(flat) == set(config_keys())
    assert flat["model.student"] == "efficientnet_b0" and flat["fed.num_bins"] == 50
    assert config_from_flat(flat) == cfg
    # and through kebab-case keys, as Flower's run_config spells them
    kebab = {k.replace("_", "-"): v for k, v in flat.items()}
    assert config_from_flat(kebab) == cfg


def test_config_from_mapping_nested():
    cfg = config_from_mapping({"train": {"lr": 0.01, "batch-size": 12}, "pagkd": {"use_pro": False}})
    assert cfg.train.lr == 0.01 and cfg.train.batch_size == 12 and cfg.pagkd.use_pro is False
    assert cfg.model == Config().model
    # the nested dict of a config rebuilds it
    assert config_from_mapping(config_to_dict(cfg)) == cfg


def test_config_from_mapping_refuses_non_table_and_unknown_keys():
    with pytest.raises(ConfigError, match="'train'"):
        config_from_mapping({"train": 0.1})
    with pytest.raises(ConfigError, match="train.nope"):
        config_from_mapping({"train": {"nope": 1}})


def test_base_config_is_not_mutated():
    base = config_from_flat({"train.lr": 0.05, "pagkd.subtypes": 2})
    snapshot = copy.deepcopy(base)
    sections_before = {f.name: id(getattr(base, f.name)) for f in dataclasses.fields(base)}
    derived = config_from_flat({"train.lr": 0.2, "pagkd.subtypes": 4, "model.embed_dim": 64}, base=base)
    assert base == snapshot
    assert {f.name: id(getattr(base, f.name)) for f in dataclasses.fields(base)} == sections_before
    assert derived.train.lr == 0.2 and derived.pagkd.subtypes == 4 and derived.model.embed_dim == 64
    # untouched values come from the base, not the defaults
    assert derived.train.lr != Config().train.lr
    derived2 = config_from_flat({"model.embed_dim": 64}, base=base)
    assert derived2.train.lr == 0.05 and derived2.pagkd.subtypes == 2


def test_failed_override_leaves_base_untouched():
    base = Config()
    snapshot = copy.deepcopy(base)
    with pytest.raises(ConfigError):
        config_from_flat({"train.lr": 0.5, "train.epochs": "many"}, base=base)
    assert base == snapshot


# --------------------------------------------------------------------------- gaps found in config.validate


def test_zero_heads_is_a_config_error():
    with pytest.raises(ConfigError, match="model.num_heads|model.embed_dim"):
        config_from_flat({"model.num_heads": 0})


def test_negative_heads_is_a_config_error():
    with pytest.raises(ConfigError, match="model.num_heads|model.embed_dim"):
        config_from_flat({"model.num_heads": -8})


def test_infinite_learning_rate_is_a_config_error():
    with pytest.raises(ConfigError, match="train.lr"):
        config_from_flat({"train.lr": "inf"})


def test_nan_weight_decay_is_a_config_error():
    with pytest.raises(ConfigError, match="train.weight_decay"):
        config_from_flat({"train.weight_decay": "nan"})


def test_non_positive_max_norm_ratio_is_a_config_error():
    with pytest.raises(ConfigError, match="fed.max_norm_ratio"):
        config_from_flat({"fed.max_norm_ratio": -1.0})


def test_pyproject_run_config_covers_every_key_and_validates():
    """Flower rejects a --run-config key absent from [tool.flwr.app.config], so every Config
    key must be there; and the embedded default must itself be a valid Config."""
    import tomllib
    from pathlib import Path

    from flwr.common.config import flatten_dict

    from common.config import config_keys

    app = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    flat = flatten_dict(app["config"])
    assert sorted(flat) == sorted(config_keys())
    config_from_flat(flat)  # raises ConfigError on a bad default


def test_pyproject_defaults_equal_the_dataclass_defaults():
    """One source of truth: `flwr run .` and every Python entry point start from the same values.
    Every key of the run config equals its Config default as written, type included (no coercion
    between them: ``1`` for ``1.0`` or ``"true"`` for ``true`` would fail here)."""
    import tomllib
    from pathlib import Path

    from flwr.common.config import flatten_dict

    from common.config import Config, config_to_flat

    app = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    written, defaults = flatten_dict(app["config"]), config_to_flat(Config())
    assert written == defaults
    assert {key: type(value) for key, value in written.items()} == {key: type(value) for key, value in defaults.items()}


def test_a_renamed_key_is_still_read_under_its_old_name():
    """``fed.proto_weight`` (the FedProto baseline's weight, easily confused with
    ``pagkd.pro_weight``) became ``fed.fedproto_weight``; run configs that use the old key keep working."""
    from common.config import RENAMED_KEYS, config_from_flat, config_to_flat

    assert RENAMED_KEYS["fed.proto_weight"] == "fed.fedproto_weight"
    cfg = config_from_flat({"fed.proto_weight": 0.5})
    assert cfg.fed.fedproto_weight == 0.5
    assert "fed.proto_weight" not in config_to_flat(cfg)


# ---------------------------------------------------------------- choices, derived rules, presets (issue 16)


def test_every_enumerated_key_lists_its_choices_once_and_validation_reads_them():
    from common.config import AGGREGATIONS, choices, enumerated_keys
    from server.aggregation import ROBUST

    assert set(enumerated_keys()) == {
        "pagkd.grouping",
        "train.schedule",
        "train.augment",
        "train.sampler",
        "fed.student_init",
        "fed.student_sites",
        "fed.aggregation",
    }
    assert ROBUST == AGGREGATIONS == choices("fed.aggregation") == ("mean", "median", "trimmed_mean")
    for key in enumerated_keys():
        for value in choices(key):  # every choice is accepted (with what it needs beside it)
            extra = {"model.student": "resnet18"} if (key, value) == ("fed.student_init", "scratch") else {}
            assert getattr(getattr(config_from_flat({key: value, **extra}), key.split(".")[0]), key.split(".")[1]) == value
        with pytest.raises(ConfigError) as info:
            config_from_flat({key: "no-such-choice"})
        assert f"'{key}'" in str(info.value) and all(repr(v) in str(info.value) for v in choices(key))


@pytest.mark.parametrize(
    "overrides, distils, needs_nbi",
    [
        ({}, False, True),  # the default run: the student starts from the NBI teacher
        ({"fed.student_init": "scratch"}, False, False),  # WLI-only FedAvg
        ({"fed.student_init": "scratch", "pagkd.use_pro": True}, True, True),
        ({"fed.student_init": "scratch", "pagkd.use_den": True}, True, True),
    ],
)
def test_derived_rules_are_config_properties(overrides, distils, needs_nbi):
    cfg = config_from_flat(overrides)
    assert cfg.distils is distils and cfg.needs_nbi_sites is needs_nbi


def test_every_named_preset_is_a_valid_run_config():
    from common.presets import PRESETS, preset

    for name, values in PRESETS.items():
        config_from_flat(values)
        assert preset(name, fed__student_rounds=3) == {**values, "fed.student_rounds": 3}
    with pytest.raises(KeyError, match="tiny"):
        preset("no-such-preset")
