"""The registry of named configurations (common/presets.py): every entry point reads it, Hydra
offers exactly its recipes and experiments and composes them as :func:`common.presets.compose`
does, and each tuned value is spelled once, where the tuning results say it was chosen."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import benchmarks.centralised  # noqa: F401  (registers centralised_schema)
import server.experiment  # noqa: F401  (registers federated_schema and the registry's groups)
from benchmarks import tune
from common import presets
from common.config import Config, config_from_flat, config_from_mapping, config_to_dict, config_keys
from common.presets import (
    DEFAULT_METHOD,
    EXPERIMENTS,
    METHODS,
    PRESETS,
    RECIPES,
    REGISTRY,
    TUNED_FEDPROTO,
    TUNED_GROUP_TERMS,
    named,
)
from server import launch

ROOT = Path(__file__).resolve().parent.parent
CONF = str(ROOT / "conf")
GROUP_WEIGHTS = ("pagkd.den_weight", "pagkd.pro_weight", "pagkd.warmup_epochs")


def hydra_config(name: str, overrides: list[str]) -> Config:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        tree = OmegaConf.to_container(compose(config_name=name, overrides=overrides), resolve=True)
    tree.pop("bench" if name == "centralised" else "sim")
    return config_from_mapping(tree)


def resolved(flat: dict) -> dict:
    return config_to_dict(config_from_flat(flat))


@pytest.mark.parametrize("kind", list(REGISTRY))
def test_every_entry_of_every_kind_is_a_valid_run_config_of_known_keys(kind):
    for name, values in REGISTRY[kind].items():
        assert set(values) <= set(config_keys()), (kind, name)
        config_from_flat(values)  # raises ConfigError naming a bad value
        assert named(kind, name, fed__student_rounds=3) == {**values, "fed.student_rounds": 3}
    with pytest.raises(KeyError, match=f"unknown {kind} 'no-such-name'"):
        named(kind, "no-such-name")


def test_hydra_offers_exactly_the_registry_recipes_and_experiments():
    with initialize_config_dir(config_dir=CONF, version_base=None):
        loader = GlobalHydra.instance().config_loader()
        offered = {group: sorted(loader.get_group_options(group)) for group in ("preset", "experiment")}
    assert offered == {"preset": sorted(RECIPES), "experiment": sorted(EXPERIMENTS)}


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_hydra_composition_equals_the_registry(recipe):
    """Hydra's defaults list (conf/federated.yaml) composes a recipe and an experiment in the
    order of :func:`common.presets.compose`; the centralised config takes the recipe alone."""
    for experiment in EXPERIMENTS:
        by_hydra = hydra_config("federated", [f"preset={recipe}", f"experiment={experiment}"])
        assert config_to_dict(by_hydra) == resolved(presets.compose(recipe, experiment)), (recipe, experiment)
    assert config_to_dict(hydra_config("centralised", [f"preset={recipe}"])) == resolved(PRESETS[recipe])


def test_no_hydra_yaml_spells_a_config_value():
    """The yaml files of conf/ hold the defaults lists and the entry points' own sections only:
    every value of a named configuration comes from the registry, so no yaml can disagree with it."""
    sections = set(config_to_dict(Config()))
    files = sorted(Path(CONF).rglob("*.yaml"))
    assert [f.name for f in files] == ["centralised.yaml", "federated.yaml"]
    for path in files:
        assert not sections & set(yaml.safe_load(path.read_text())), path


def test_a_recipe_keeps_the_group_weights_it_was_tuned_with_under_every_experiment():
    """preset=paper experiment=pagkd is the paper's method at the paper's weights (it once took the
    CPU-tuned ones); under the CPU recipe, which spells nothing, the experiments' tuned weights apply."""
    paper = hydra_config("federated", ["preset=paper", "experiment=pagkd"])
    assert (paper.pagkd.den_weight, paper.pagkd.pro_weight, paper.pagkd.warmup_epochs) == (1.0, 0.001, 5)
    assert paper.pagkd.use_pro and paper.pagkd.use_den and paper.fed.student_init == "scratch"
    cpu = hydra_config("federated", ["experiment=pagkd"])
    assert {key: getattr(cpu.pagkd, key.split(".")[1]) for key in GROUP_WEIGHTS} == TUNED_GROUP_TERMS
    # The only keys a recipe and an experiment both set are those weights: nothing else is decided by the order.
    for recipe in RECIPES:
        for experiment, values in EXPERIMENTS.items():
            assert set(PRESETS[recipe]) & set(values) <= set(GROUP_WEIGHTS), (recipe, experiment)


def test_the_default_run_is_the_config_defaults_the_cpu_recipe_and_the_default_method():
    default = config_to_dict(Config())
    assert resolved(EXPERIMENTS["default"]) == resolved(PRESETS["cpu"]) == resolved(METHODS[DEFAULT_METHOD]) == default
    assert config_to_dict(hydra_config("federated", [])) == default


@pytest.mark.parametrize("results", ["tune.json", "tune_fedproto.json"])
def test_each_tuned_method_is_what_its_tuning_chose(results):
    """The registry's methods are what the candidate benchmarks/tune.py chose on val makes them (the
    results file's choice, with the overrides its runs recorded, meaning the same as tune.py's
    candidate of that name); tune.py's chosen candidates are the registry's values."""
    tuned = json.loads((ROOT / "benchmarks" / "results" / results).read_text())
    for arm, entry in tuned["arms"].items():
        chosen = entry["chosen"]
        recorded = [run["overrides"] for run in tuned["runs"][arm][chosen].values()]
        candidate = resolved({**METHODS[arm], **tune.CANDIDATES[arm][chosen]})
        assert recorded and all(resolved({**METHODS[arm], **r}) == candidate for r in recorded), (arm, chosen)
        assert candidate == resolved(METHODS[arm]), (arm, chosen)
    assert tune.CANDIDATES["fedpagkd_teacher_init"]["light"] == TUNED_GROUP_TERMS
    assert tune.CANDIDATES["fedproto_wli"]["w0.1"] == TUNED_FEDPROTO


def test_no_tuned_value_is_spelled_twice():
    """Each tuned value appears as ``key: value`` (python, yaml) or ``key = value`` (toml) in the
    registry only. benchmarks/tune.py is left out: its candidates are the grid the values were
    chosen from (the chosen one reads the registry: the test above)."""
    spelled = {**TUNED_GROUP_TERMS, "fed.fedproto_weight": TUNED_FEDPROTO["fed.fedproto_weight"]}
    sources = [
        path
        for folder in ("common", "client", "server", "benchmarks", "conf")
        for path in (ROOT / folder).rglob("*")
        if path.suffix in (".py", ".yaml", ".toml") and path != ROOT / "benchmarks" / "tune.py"
    ] + [ROOT / "pyproject.toml"]
    for key, value in spelled.items():
        pattern = re.compile(rf"\b{re.escape(key.split('.')[1])}[\"']?\s*[:=]\s*{re.escape(repr(value))}(?![\d.])")
        found = [str(p.relative_to(ROOT)) for p in sources if pattern.search(p.read_text())]
        assert found == ["common/presets.py"], (key, found)


def test_the_launcher_runs_a_named_experiment_under_a_recipe(monkeypatch):
    """`fedpagkd simulate --experiment pagkd --preset paper k=v` submits compose(paper, pagkd, k=v)."""
    submitted = []

    def simulate(overrides, *args, **kwargs):
        submitted.append(overrides)
        raise launch.SimulationError("not started in this test")

    monkeypatch.setattr(launch, "simulate", simulate)
    assert launch.main(["--experiment", "pagkd", "--preset", "paper", "fed.student_rounds=1", "--quiet"]) == 1
    assert submitted == [presets.compose("paper", "pagkd", {"fed.student_rounds": "1"})]
    assert launch.main(["--quiet"]) == 1 and submitted[-1] == {}  # the default run: nothing named, nothing added
    with pytest.raises(SystemExit):
        launch.main(["--experiment", "no-such-experiment"])
    with pytest.raises(SystemExit):
        launch.main(["--preset", "tiny"])  # a small-run preset is not a recipe
    with pytest.raises(KeyError, match="unknown recipe preset 'tiny'"):
        presets.compose("tiny")  # its method switches would override the experiment's
