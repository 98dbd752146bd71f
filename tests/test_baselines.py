"""The federated baselines of the evaluation issue, through the real protocol (in-process):

* FedProto-style (``fed.fedproto_weight``): WLI sites send class sums of their embeddings, the
  server sums them, the next round trains against the global class prototypes;
* the naive cross-modal baseline (``fed.student_sites=all``): one model FedAvg'ed over WLI and
  NBI sites, evaluated on WLI only;
* the NBI:WLI data ratio (``data.nbi_train_scale``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.wire import from_recorddict
from common.config import ConfigError, config_to_flat
from common.data import synthetic_site_specs
from common.losses import prototype_regulariser
from server.workflow import run_federation
from tests.conftest import tiny_config
from tests.fakes import InProcessGrid, synthetic_node_configs

pytestmark = pytest.mark.usefixtures("single_thread", "task_identity")

PLAIN = dict(pagkd__use_pro=False, pagkd__use_den=False)


def test_prototype_regulariser_is_zero_at_the_prototypes_and_grows_with_distance():
    prototypes = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    valid = torch.tensor([True, True, False])
    labels = torch.tensor([0, 1, 2])
    at = prototypes.clone().requires_grad_(True)
    assert prototype_regulariser(at, labels, prototypes, valid).item() == 0.0
    near = prototype_regulariser(at + 0.1, labels, prototypes, valid).item()
    far = prototype_regulariser(at + 1.0, labels, prototypes, valid).item()
    assert 0 < near < far
    # Class 2 has no prototype: moving its image changes nothing.
    moved = at.detach().clone()
    moved[2] += 100
    assert prototype_regulariser(moved, labels, prototypes, valid).item() == 0.0
    # Gradients reach the embeddings, never the prototypes (stop-gradient).
    protos = prototypes.clone().requires_grad_(True)
    emb = torch.randn(3, 2, requires_grad=True)
    prototype_regulariser(emb, labels, protos, valid).backward()
    assert emb.grad is not None and protos.grad is None
    assert prototype_regulariser(emb, labels, prototypes, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def run(tmp_path, name, **overrides):
    cfg = tiny_config(**overrides)
    grid = InProcessGrid(synthetic_node_configs(cfg.data.nbi_sites + cfg.data.wli_sites), config_to_flat(cfg))
    summary = run_federation(grid, cfg, tmp_path / name)
    sent = [(m.metadata.dst_node_id, from_recorddict(m.content)) for m in grid.sent]
    received = [(m.metadata.src_node_id, from_recorddict(m.content)) for m in grid.received]
    return summary, sent, received


def test_fedproto_sends_the_summed_class_prototypes_of_the_previous_round(tmp_path):
    summary, sent, received = run(tmp_path, "proto", fed__fedproto_weight=1.0, fed__student_rounds=2, **PLAIN)
    updates = [p for _, p in received if p.kind == "student.update"]
    trains = [p for _, p in sent if p.kind == "student.train"]
    assert len(updates) == 4 and len(trains) == 4  # 2 WLI sites x 2 rounds
    assert not trains[0].arrays["class_prototype_count"].any()  # round 1: no prototypes yet
    first_round = updates[:2]
    expected_sum = sum(u.arrays["class_prototype_sum"].astype(np.float64) for u in first_round)
    expected_count = sum(u.arrays["class_prototype_count"] for u in first_round)
    assert expected_count.sum() > 0
    for request in trains[2:]:
        assert np.array_equal(request.arrays["class_prototype_count"], expected_count)
        np.testing.assert_allclose(request.arrays["class_prototype_sum"], expected_sum, rtol=1e-6)
    # Round 2 trained against them: the total loss carries the regulariser on top of CE.
    round2 = summary.student[1]
    assert round2["loss"] > round2["ce"]


def test_without_fedproto_no_prototype_is_computed_or_sent(tmp_path):
    _, sent, received = run(tmp_path, "plain", fed__student_rounds=2, **PLAIN)
    students = [p for _, p in sent + received if p.kind in ("student.train", "student.update")]
    assert len(students) == 8  # 2 WLI sites x 2 rounds, request and reply
    for p in students:  # a message carries only what its method uses
        assert "class_prototype_count" not in p.arrays and "class_prototype_sum" not in p.arrays


def test_the_joint_baseline_trains_on_both_modalities_and_evaluates_on_wli(tmp_path):
    summary, sent, received = run(tmp_path, "joint", fed__student_sites="all", fed__student_rounds=2, **PLAIN)
    names = {101: "nbi-0", 102: "nbi-1", 103: "wli-0", 104: "wli-1"}
    trained = sorted({names[n] for n, p in received if p.kind == "student.update"})
    assert trained == ["nbi-0", "nbi-1", "wli-0", "wli-1"]
    assert all(sorted(r["sites"]) == trained for r in summary.student)
    # NBI sites are never asked to score the student, and every student evaluation is WLI's.
    assert all(not p.config["evaluate"] for n, p in sent if p.kind == "student.train" and names[n].startswith("nbi"))
    student_evals = [e for e in summary.evaluation if e["model"] == "student"]
    assert student_evals and all(sorted(e["sites"]) == ["wli-0", "wli-1"] for e in student_evals)
    assert not [p for _, p in sent if p.kind in ("teacher.train", "knowledge.seed")]  # no teacher, no bank


def test_the_joint_baseline_with_distillation_is_a_config_error():
    with pytest.raises(ConfigError, match="fed.student_sites"):
        tiny_config(fed__student_sites="all")
    with pytest.raises(ConfigError, match="fed.student_sites"):
        tiny_config(fed__student_sites="both", **PLAIN)


def test_nbi_train_scale_sets_the_nbi_to_wli_data_ratio():
    sizes = {name: spec.num_train for name, spec in synthetic_site_specs(tiny_config(data__nbi_train_scale=2.5))}
    assert sizes == {"nbi-0": 60, "nbi-1": 60, "wli-0": 24, "wli-1": 24}
    with pytest.raises(ConfigError, match="data.nbi_train_scale"):
        tiny_config(data__nbi_train_scale=0.0)
