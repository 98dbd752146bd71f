"""Hydra configs compose onto the typed Config: presets apply, unknown keys and bad values fail
before any training or Ray start."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import benchmarks.centralised  # noqa: F401  (registers centralised_schema)
import server.experiment  # noqa: F401  (registers federated_schema)
from common.config import ConfigError, config_from_mapping
from server.launch import toml_value

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        tree = OmegaConf.to_container(compose(config_name=name, overrides=overrides), resolve=True)
    extra = tree.pop("bench" if name == "centralised" else "sim")
    return config_from_mapping(tree), extra


def test_presets_and_experiments_compose_to_valid_configs():
    cpu, bench = _compose("centralised", [])
    assert cpu.model.student == "pagkd_cnn_s" and cpu.data.image_size == 64 and bench["seeds"] == [0, 1, 2]
    paper, _ = _compose("centralised", ["preset=paper"])
    assert (paper.model.student, paper.data.image_size, paper.pagkd.pro_weight, paper.train.lr) == ("resnet50", 448, 0.001, 1e-4)
    assert paper.model.pretrained  # ImageNet-initialised ResNet-50, as the paper
    wli_only, sim = _compose("federated", ["experiment=wli_only", "sim.cpus_per_client=2"])
    assert not wli_only.pagkd.use_pro and not wli_only.pagkd.use_den and sim["cpus_per_client"] == 2
    adaptive, _ = _compose("federated", ["experiment=adaptive", "model.output_stride=16"])
    assert adaptive.pagkd.grouping == "adaptive" and adaptive.model.output_stride == 16
    fedproto, _ = _compose("federated", ["experiment=fedproto"])
    assert fedproto.fed.fedproto_weight == 0.1 and not fedproto.pagkd.use_pro and not fedproto.pagkd.use_den
    joint, _ = _compose("federated", ["experiment=joint"])
    assert joint.fed.student_sites == "all" and not joint.pagkd.use_den
    assert _compose("federated", ["experiment=teacher_init"])[0].fed.student_init == "teacher"
    private, _ = _compose("federated", ["experiment=private"])
    assert private.privacy.secure_aggregation and private.privacy.noise_multiplier == 1.0


def test_unknown_keys_and_wrong_types_fail_at_composition():
    with pytest.raises(ConfigCompositionException):
        _compose("federated", ["model.bogus=1"])
    with pytest.raises(ConfigCompositionException):
        _compose("federated", ["train.lr=fast"])


def test_out_of_range_values_fail_in_the_typed_schema():
    with pytest.raises(ConfigError, match="train.lr"):
        _compose("federated", ["train.lr=-1"])


@pytest.mark.parametrize("value, literal", [(True, "true"), (3, "3"), (0.5, "0.5"), ("a b", '"a b"'), ("", '""')])
def test_run_config_values_become_toml_literals(value, literal):
    assert toml_value(value) == literal
