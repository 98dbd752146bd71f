"""The pieces the protocol is made of (issue 24): the one model-selection rule, the typed run
results, the typed modalities, the baselines' plug-ins and the arrays only a plug-in's messages
carry. No federation runs here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from client.baselines import FedProtoTerm, loss_terms, student_modalities
from common.baselines import enabled_baselines
from common.losses import prototype_regulariser
from common.modality import Modality, Model, Phase
from common.records import CLASS_PROTOTYPES, EVALUATION_FIELDS, PayloadError, dims_of, empty_statistics, make
from common.results import Figure, RunResult
from common.selection import Choice, prefer
from server.baselines import FedProto, JointSites, student_plugins
from tests.conftest import tiny_config

PLAIN = dict(pagkd__use_pro=False, pagkd__use_den=False)


def _evaluation(auc: float, confusion: list[list[int]]) -> dict:
    return {"pooled": {"auc": auc}, "histogram": {"confusion": confusion}}


LEARNED = [[8, 2], [3, 7]]
COLLAPSED = [[10, 0], [10, 0]]  # every image predicted as class 0


def test_one_selection_rule_learned_first_then_auc_ties_to_the_later_step():
    chosen = None
    for step, evaluation in enumerate([_evaluation(0.95, COLLAPSED), _evaluation(0.7, LEARNED), _evaluation(0.7, LEARNED)]):
        candidate = Choice.of(step, evaluation)
        if prefer(candidate, chosen):
            chosen = candidate
    assert chosen.step == 2 and chosen.problems == []  # learned beats a higher AUC; the tie goes to the later step
    assert not prefer(Choice.of(3, _evaluation(0.69, LEARNED)), chosen)
    nan = Choice.of(4, _evaluation(float("nan"), LEARNED))
    assert nan.val_auc == -math.inf and not prefer(nan, chosen)
    collapsed = Choice.of(0, _evaluation(0.95, COLLAPSED))
    assert collapsed.problems and Choice.from_json(json.loads(json.dumps(collapsed.to_json()))) == collapsed


def _figure_json(auc: float) -> dict:
    return {"auc": auc, "auc_per_class": [auc, auc], "accuracy": 0.8, "sensitivity": 0.7, "specificity": 0.9,
            "round": 3, "confusion": LEARNED, "selected_round": 2}  # fmt: skip


def test_a_run_result_reads_metrics_json_back_to_the_same_json_in_the_same_order():
    record = {
        "teacher": [{"round": 1, "loss": 0.5, "sites": ["nbi-0"]}],
        "knowledge": [],
        "student": [{"round": 1, "loss": 0.4, "ce": 0.4, "den": 0.0, "pro": 0.0, "sites": ["wli-0"]}],
        "evaluation": [{"model": "student", "round": 1, "split": "val", "pooled": {"auc": 0.6}}],
        "selection": {"student": {"round": 1, "val_auc": 0.6, "problems": []}},
        "site_status": {"wli-0": {"student": "took part"}},
        "wall_time_s": 12.5,
        "from_a_later_version": {"kept": True},
        "bytes": {"student": {"sent": 10, "received": 20, "messages": 2}},
        "final": _figure_json(0.75),
        "final_teacher": None,
        "status": "degraded",
        "accepted": True,
    }
    result = RunResult.from_json(record)
    assert result.final.auc == 0.75 and result.final.selected_round == 2 and result.final_teacher is None
    assert result.final.subset(("auc", "accuracy")) == {"auc": 0.75, "accuracy": 0.8}
    assert result.selection["student"] == Choice(1, 0.6, []) and result.val_aucs() == [0.6]
    assert result.extra == {"from_a_later_version": {"kept": True}}
    written = result.to_json()
    assert {k: written[k] for k in record} == record
    assert [k for k in written if k in record] == list(record)  # the file's key order
    assert Figure.from_json(_figure_json(0.75)).to_json() == _figure_json(0.75)


def test_modalities_phases_and_models_are_their_wire_strings():
    assert Modality.NBI == "nbi" and json.dumps({Modality.WLI: [Phase.STUDENT]}) == '{"wli": ["student"]}'
    assert f"{Modality.NBI}" == "nbi" and Modality.NBI.label == "NBI" and type(str(Phase.TEACHER)) is str
    assert Model.TEACHER.modality is Modality.NBI and Model.STUDENT.modality is Modality.WLI


@pytest.mark.parametrize(
    "overrides, names, modalities",
    [
        ({}, [], ("wli",)),
        (dict(fed__student_sites="all", **PLAIN), ["joint"], ("wli", "nbi")),
        (dict(fed__fedproto_weight=0.5, **PLAIN), ["fedproto"], ("wli",)),
    ],
)
def test_a_config_turns_on_the_same_plugins_on_the_server_and_the_site(overrides, names, modalities):
    cfg = tiny_config(**overrides)
    assert enabled_baselines(cfg) == names
    assert student_modalities(cfg) == modalities
    server = {type(p) for p in student_plugins(cfg)}
    assert server == {p for name, p in (("joint", JointSites), ("fedproto", FedProto)) if name in names}
    zeros = {"class_prototype_sum": np.zeros((3, 4), np.float32), "class_prototype_count": np.zeros(3, np.int64)}
    assert [type(t) for t in loss_terms(cfg, zeros)] == ([FedProtoTerm] if "fedproto" in names else [])


def test_the_fedproto_term_is_its_weighted_regulariser_and_sums_the_last_epoch():
    C, D = 3, 4  # distinct sizes: a transpose fails
    counts = np.array([2, 0, 1], np.int64)
    sums = np.arange(C * D, dtype=np.float32).reshape(C, D)
    term = FedProtoTerm(0.25, {"class_prototype_sum": sums, "class_prototype_count": counts})
    tokens, labels = torch.randn(5, 6, D), torch.tensor([0, 1, 2, 0, 1])
    value, parts = term(tokens, labels, last_epoch=False)
    means = torch.from_numpy(sums) / torch.from_numpy(counts).clamp_min(1)[:, None]
    expected = prototype_regulariser(tokens.mean(dim=1), labels, means, torch.from_numpy(counts) > 0)
    assert value.item() == pytest.approx(0.25 * expected.item()) and parts == {"proto_reg": expected.item()}
    assert not term.reply_arrays()["class_prototype_count"].any()  # only the last epoch is summed
    term(tokens, labels, last_epoch=True)
    sent = term.reply_arrays()
    assert sent["class_prototype_count"].tolist() == [2, 2, 1] and sent["class_prototype_sum"].dtype == np.float32
    np.testing.assert_allclose(sent["class_prototype_sum"][2], tokens[2].mean(dim=0).numpy(), rtol=1e-6)
    first = FedProtoTerm(0.25, {"class_prototype_sum": sums * 0, "class_prototype_count": counts * 0})
    assert first(tokens, labels, last_epoch=False) == (None, {})  # no global prototypes yet: no term


def test_a_student_reply_carries_the_fedproto_arrays_all_or_none():
    dims = dims_of(tiny_config())
    config = {"num-examples": 4, "loss": 0.1, "ce": 0.1, "den": 0.0, "pro": 0.0, "eval-examples": 0, "eval-loss": 0.0}
    weights = {"student": {"w": np.zeros(2, np.float32)}, "head": {"h": np.zeros(2, np.float32)}}
    scores, prototypes = empty_statistics(EVALUATION_FIELDS, dims), empty_statistics(CLASS_PROTOTYPES, dims)
    assert "class_prototype_sum" not in make("student.update", dims, arrays=scores, config=config, weights=weights).arrays
    both = make("student.update", dims, arrays={**scores, **prototypes}, config=config, weights=weights)
    assert set(prototypes) <= set(both.arrays)
    with pytest.raises(PayloadError, match="class_prototype_count.*all or none"):
        make("student.update", dims, arrays={**scores, "class_prototype_count": prototypes["class_prototype_count"]},
             config=config, weights=weights)  # fmt: skip
    bad = {**prototypes, "class_prototype_sum": np.zeros((dims.C, dims.D + 1), np.float32)}
    with pytest.raises(PayloadError, match="class_prototype_sum"):  # a carried optional array is checked as any other
        make("student.update", dims, arrays={**scores, **bad}, config=config, weights=weights)
