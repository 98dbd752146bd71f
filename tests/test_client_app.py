"""ClientApp handlers, called the way Flower calls them: a hand-built request ``Message`` and a
``Context`` (node config, run config, state), and the reply parsed back from its RecordDict.

Sites: the built-in synthetic federation (partitions 0-1 NBI, 2-3 WLI) and a deployment-style
folder site written by :func:`common.data.write_image_folder`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, RecordDict

from client.app import app as client_app
from client.app import dims_of
from client.site import resolve_site
from client.wire import MESSAGE_TYPE, from_recorddict, state_to_numpy, to_recorddict
from common.config import config_to_flat
from common.data import SyntheticSiteSpec, write_image_folder
from common.models import build_query_head, build_student, build_teacher
from common.records import (
    BANK_STATISTICS,
    CLASS_PROTOTYPES,
    PROTOCOL_VERSION,
    REPLY_KIND,
    Payload,
    empty_statistics,
    make,
    validate,
    weight_shapes,
)
from server.aggregation import empty_bank, initial_centroids
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread", "task_identity")

CFG = tiny_config()
DIMS = dims_of(CFG)
NBI, WLI = 0, 2  # partition ids of nbi-0 and wli-0
NODE_ID = 7


def node(partition: int) -> dict:
    return {"partition-id": partition, "num-partitions": 4}


def new_context(node_config: dict, cfg=CFG) -> Context:
    return Context(run_id=1, node_id=NODE_ID, node_config=dict(node_config), state=RecordDict(), run_config=config_to_flat(cfg))


def send(payload: Payload, context: Context, message_type: str | None = None) -> Payload:
    """One request through the real ClientApp; the reply must be content (never a Flower error)."""
    message = Message(to_recorddict(payload), dst_node_id=NODE_ID, message_type=message_type or MESSAGE_TYPE[payload.kind])
    reply = client_app(message, context)
    assert reply.has_content() and not reply.has_error()
    assert reply.metadata.message_type == message.metadata.message_type
    assert reply.metadata.src_node_id == NODE_ID
    return from_recorddict(reply.content, "site")


def send_raw(content: RecordDict, context: Context, message_type: str) -> Payload:
    reply = client_app(Message(content, dst_node_id=NODE_ID, message_type=message_type), context)
    assert reply.has_content()
    return from_recorddict(reply.content, "site")


def assert_error(reply: Payload, site: str | tuple[str, ...], *needles: str) -> str:
    assert reply.kind == "error", f"expected an error reply, got {reply.kind}"
    validate(reply, DIMS)
    assert reply.config["site-name"] in ((site,) if isinstance(site, str) else site)
    reason = reply.config["reason"]
    for needle in needles:
        assert needle in reason, f"{needle!r} not in {reason!r}"
    return reason


def train_count(site) -> np.ndarray:
    return np.bincount(np.asarray(site.train.labels), minlength=DIMS.C)


@pytest.fixture(scope="module")
def globals_():
    """The server's initial global models, as numpy state dicts (what travels)."""
    import torch

    torch.manual_seed(0)
    return {
        "teacher": state_to_numpy(build_teacher(CFG.model, DIMS.C)),
        "student": state_to_numpy(build_student(CFG.model, DIMS.C)),
        "head": state_to_numpy(build_query_head(CFG.model, DIMS.C)),
    }


def teacher_request(globals_, round_=1, **config) -> Payload:
    values = {"round": round_, "seed": 11, "local-epochs": 1, **SPAN, "evaluate": "", **config}
    return make("teacher.train", DIMS, config=values, weights={"teacher": globals_["teacher"], "head": globals_["head"]})


SPAN = {"schedule-start": 0.0, "schedule-end": 1.0}  # a request's share of the learning-rate schedule


def seed_request(globals_, round_=1, evaluate=False) -> Payload:
    config = {"round": round_, "seed": 5, "evaluate": "test" if evaluate else ""}
    return make("knowledge.seed", DIMS, config=config, weights={"teacher": globals_["teacher"], "head": globals_["head"]})


def stats_request(centroids, round_=1) -> Payload:
    return make(
        "knowledge.stats", DIMS, arrays=centroids, config={"round": round_, "seed": 5, "iteration": 1, "peers": "", "attempt": 0}
    )


@pytest.fixture(scope="module")
def knowledge(single_thread, globals_):
    """knowledge.seed then knowledge.stats on nbi-0, within one node context (one refresh)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0
    context = new_context(node(NBI))
    seeds = send(seed_request(globals_), context)
    centroids = initial_centroids([seeds.arrays], DIMS, seed=5)
    sums = send(stats_request(centroids), context)
    return {"context": context, "seeds": seeds, "centroids": centroids, "sums": sums}


# ---------------------------------------------------------------------------------- discover


@pytest.mark.parametrize(
    "partition, name, modality", [(0, "nbi-0", "nbi"), (1, "nbi-1", "nbi"), (2, "wli-0", "wli"), (3, "wli-1", "wli")]
)
def test_discover_returns_metadata_with_the_site_class_counts(partition, name, modality):
    reply = send(make("discover", DIMS, config={"protocol": PROTOCOL_VERSION}), new_context(node(partition)))
    assert reply.kind == REPLY_KIND["discover"] == "metadata"
    validate(reply, DIMS)
    assert reply.config["site-name"] == name
    assert reply.config["modality"] == modality
    assert reply.config["protocol"] == PROTOCOL_VERSION
    site = resolve_site(node(partition), CFG)
    np.testing.assert_array_equal(reply.arrays["train_class_counts"], train_count(site))
    np.testing.assert_array_equal(reply.arrays["test_class_counts"], np.bincount(np.asarray(site.test.labels), minlength=DIMS.C))
    assert reply.arrays["train_class_counts"].sum() == CFG.data.train_per_site
    assert reply.arrays["test_class_counts"].sum() == CFG.data.test_per_site
    assert (reply.arrays["train_class_counts"] > 0).all()
    assert not reply.weights  # metadata only


def test_discover_with_a_partition_outside_the_federation_is_an_error():
    reply = send(make("discover", DIMS, config={"protocol": PROTOCOL_VERSION}), new_context(node(9)))
    assert_error(reply, "partition-9", "partition 9", "num-supernodes")


# ---------------------------------------------------------------------------------- teacher


def test_teacher_train_on_nbi_returns_finite_weights_of_the_right_shapes(globals_):
    reply = send(teacher_request(globals_), new_context(node(NBI)))
    assert reply.kind == "teacher.update"
    reference = {"teacher": weight_shapes(globals_["teacher"]), "head": weight_shapes(globals_["head"])}
    validate(reply, DIMS, reference)  # same keys, shapes, dtypes; finite
    for block in ("teacher", "head"):
        for name, array in reply.weights[block].items():
            assert array.shape == globals_[block][name].shape and array.dtype == globals_[block][name].dtype
            assert np.isfinite(array).all()
    changed = [
        n for n, a in reply.weights["teacher"].items() if a.dtype.kind == "f" and not np.array_equal(a, globals_["teacher"][n])
    ]
    assert changed, "local training changed no teacher tensor"
    assert reply.config["num-examples"] == CFG.data.train_per_site  # the images behind the update, not the batches drawn
    assert math.isfinite(reply.config["loss"]) and reply.config["loss"] > 0


def test_teacher_train_on_wli_is_refused_naming_site_and_modality(globals_):
    reply = send(teacher_request(globals_), new_context(node(WLI)))
    reason = assert_error(reply, "wli-0", "WLI", "teacher.train", "modality")
    assert "NBI" in reason


# ---------------------------------------------------------------------------------- knowledge


def test_knowledge_seed_then_stats_return_consistent_sufficient_statistics(knowledge):
    seeds, sums = knowledge["seeds"], knowledge["sums"]
    assert seeds.kind == "knowledge.seeds" and sums.kind == "knowledge.sums"
    validate(seeds, DIMS)
    validate(sums, DIMS)
    site = resolve_site(node(NBI), CFG)
    counts = train_count(site)
    images = sums.arrays["image_count"]
    assert (images <= counts).all(), (images, counts)
    assert images.sum() > 0
    k_min = CFG.pagkd.min_group_size
    assert sums.config["smallest-group"] >= k_min
    groups = sums.config["groups"]
    assert groups == seeds.config["groups"] > 0
    assert images.sum() >= groups * k_min
    assert images.sum() <= groups * CFG.pagkd.group_size
    # S = 1: every group's prototype set lands in its class's one slot.
    assert sums.arrays["prototype_count"].sum() == groups
    for c in range(DIMS.C):
        assert sums.arrays["prototype_count"][c].sum() <= images[c] // k_min
    # Protocol 5: no sum of squares leaves the site (nothing read it; issue 12).
    assert not [key for key in sums.arrays if "sqsum" in key]
    # Token codebook counts are token counts of >= K_min images each: never a lone token cluster.
    for name in ("foreground_count", "background_count"):
        assert ((sums.arrays[name] == 0) | (sums.arrays[name] >= k_min)).all(), sums.arrays[name]


def test_knowledge_stats_is_deterministic_within_a_refresh(knowledge):
    again = send(stats_request(knowledge["centroids"]), knowledge["context"])
    for name, array in knowledge["sums"].arrays.items():
        np.testing.assert_allclose(again.arrays[name], array, rtol=1e-5, atol=1e-5, err_msg=name)


def test_knowledge_stats_without_a_seed_is_refused_naming_the_site(knowledge):
    reply = send(stats_request(knowledge["centroids"]), new_context(node(NBI)))
    assert_error(reply, "nbi-0", "nbi-0", "re-seed")


def test_knowledge_stats_for_another_refresh_is_refused(knowledge):
    reply = send(stats_request(knowledge["centroids"], round_=2), knowledge["context"])
    assert_error(reply, "nbi-0", "refresh 1", "not 2")


def test_knowledge_seed_on_wli_is_refused(globals_):
    reply = send(seed_request(globals_), new_context(node(WLI)))
    assert_error(reply, "wli-0", "WLI", "knowledge.seed")


# ---------------------------------------------------------------------------------- student


def student_request(globals_, bank, use_bank=True, evaluate=False) -> Payload:
    config = {
        "round": 1,
        "seed": 3,
        "local-epochs": 1,
        "group-losses": True,
        "use-bank": use_bank,
        "evaluate": "val" if evaluate else "",
        **SPAN,
    }
    arrays = {**bank, **empty_statistics(CLASS_PROTOTYPES, DIMS)}
    return make(
        "student.train", DIMS, arrays=arrays, config=config, weights={"student": globals_["student"], "head": globals_["head"]}
    )


@pytest.mark.parametrize("use_bank", [True, False], ids=["with-bank", "wli-only"])
def test_student_train_on_wli_returns_changed_finite_weights(globals_, knowledge, use_bank):
    bank = knowledge["sums"].arrays if use_bank else empty_bank(DIMS)
    reply = send(student_request(globals_, bank, use_bank), new_context(node(WLI)))
    assert reply.kind == "student.update"
    validate(reply, DIMS, {"student": weight_shapes(globals_["student"]), "head": weight_shapes(globals_["head"])})
    changed = [
        n for n, a in reply.weights["student"].items() if a.dtype.kind == "f" and not np.array_equal(a, globals_["student"][n])
    ]
    assert len(changed) > len(reply.weights["student"]) // 2, "most student tensors should move after a local epoch"
    head_changed = [n for n, a in reply.weights["head"].items() if not np.array_equal(a, globals_["head"][n])]
    assert head_changed
    assert reply.config["num-examples"] == CFG.data.train_per_site
    for key in ("loss", "ce", "den", "pro"):
        assert math.isfinite(reply.config[key])
    assert reply.config["ce"] > 0
    if use_bank:
        assert reply.config["den"] > 0, "with an NBI bank the GKD-Den term must be active"


def test_a_student_request_without_the_bank_trains_unless_it_asks_to_distil(globals_):
    """The bank is an optional group of student.train: a CE-only student gets none (its method does
    not read it); a request that sets use-bank without it is refused by the site, named."""
    plain = student_request(globals_, {}, use_bank=False)
    assert not set(plain.arrays) & {f.name for f in BANK_STATISTICS}
    assert send(plain, new_context(node(WLI))).kind == "student.update"
    distil = student_request(globals_, {}, use_bank=True)
    assert_error(send(distil, new_context(node(WLI))), "wli-0", "use-bank", "no bank")


def _optimizer_steps(context: Context, role: str) -> int:
    import io

    import torch

    state = torch.load(io.BytesIO(context.state.config_records["optimizer." + role]["state"]), weights_only=True)
    return {int(v["step"]) for v in state["state"].values()}.pop()


def test_kept_optimizer_state_carries_adamw_moments_into_the_next_round(globals_):
    """train.keep_optimizer_state: the site's AdamW continues (its step count adds up across rounds,
    so the moments were loaded, not re-estimated); off, nothing is kept in the context."""
    import dataclasses

    steps_per_round = math.ceil(CFG.data.train_per_site / CFG.train.batch_size)  # one local epoch
    cfg = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, keep_optimizer_state=True))
    for role, request, partition in (
        ("student", student_request(globals_, empty_bank(DIMS), use_bank=False), WLI),
        ("teacher", teacher_request(globals_), NBI),
    ):
        context = new_context(node(partition), cfg)
        for round_ in (1, 2):
            assert send(request, context).kind == ("student.update" if role == "student" else "teacher.update")
            assert _optimizer_steps(context, role) == round_ * steps_per_round
    fresh = new_context(node(WLI), dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, keep_optimizer_state=False)))
    send(student_request(globals_, empty_bank(DIMS), use_bank=False), fresh)
    assert not [k for k in fresh.state.config_records if k.startswith("optimizer.")]


def test_student_train_on_nbi_is_refused(globals_):
    reply = send(student_request(globals_, empty_bank(DIMS), use_bank=False), new_context(node(NBI)))
    assert_error(reply, "nbi-0", "NBI", "student.train")


# ---------------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("model, partition", [("student", WLI), ("teacher", NBI)])
def test_evaluate_returns_histograms_totalling_the_test_split(globals_, model, partition):
    net = globals_[model]
    reply = send(
        make("evaluate", DIMS, config={"model": model, "split": "test"}, weights={"net": net}), new_context(node(partition))
    )
    assert reply.kind == "evaluation"
    validate(reply, DIMS)
    site = resolve_site(node(partition), CFG)
    n_test = len(site.test)
    assert n_test == CFG.data.test_per_site
    assert reply.config["num-examples"] == n_test
    assert reply.arrays["score_positives"].sum() == n_test  # each image is positive for one class
    assert reply.arrays["score_negatives"].sum() == n_test * (DIMS.C - 1)
    assert reply.arrays["confusion"].sum() == n_test
    np.testing.assert_array_equal(
        reply.arrays["confusion"].sum(axis=1), np.bincount(np.asarray(site.test.labels), minlength=DIMS.C)
    )
    np.testing.assert_array_equal(reply.arrays["score_positives"].sum(axis=1), reply.arrays["confusion"].sum(axis=1))
    assert reply.config["loss"] > 0


@pytest.mark.parametrize("model, partition", [("student", WLI), ("teacher", NBI), ("teacher.train", NBI)])
def test_a_folded_evaluation_equals_the_evaluate_reply(globals_, knowledge, model, partition):
    """The scores riding on student.update (val split: model selection) / teacher.update (val) /
    knowledge.seeds (test) are those of the weights received, exactly what an evaluate message of
    their own on that split gives; with evaluate off they are all zero."""
    if model == "student":
        split, requests = "val", [student_request(globals_, knowledge["sums"].arrays, evaluate=flag) for flag in (True, False)]
    elif model == "teacher":
        split, requests = "test", [seed_request(globals_, evaluate=flag) for flag in (True, False)]
    else:
        split, requests = "val", [teacher_request(globals_, evaluate=flag) for flag in ("val", "")]
    model = "teacher" if model == "teacher.train" else model
    alone = send(
        make("evaluate", DIMS, config={"model": model, "split": split}, weights={"net": globals_[model]}),
        new_context(node(partition)),
    )
    folded, skipped = [send(r, new_context(node(partition))) for r in requests]
    assert (
        folded.kind
        == {"student.train": "student.update", "knowledge.seed": "knowledge.seeds", "teacher.train": "teacher.update"}[
            requests[0].kind
        ]
    )
    for name in ("score_positives", "score_negatives", "confusion"):
        np.testing.assert_array_equal(folded.arrays[name], alone.arrays[name])
        assert not skipped.arrays[name].any()
    assert folded.config["eval-examples"] == alone.config["num-examples"] > 0
    assert folded.config["eval-loss"] == pytest.approx(alone.config["loss"])
    assert skipped.config["eval-examples"] == 0


def test_evaluate_on_an_unknown_split_is_refused(globals_):
    payload = make("evaluate", DIMS, config={"model": "student", "split": "bogus"}, weights={"net": globals_["student"]})
    assert_error(send(payload, new_context(node(WLI))), "wli-0", "bogus")


def test_evaluate_student_on_nbi_is_refused(globals_):
    payload = make("evaluate", DIMS, config={"model": "student", "split": "test"}, weights={"net": globals_["student"]})
    assert_error(send(payload, new_context(node(NBI))), "nbi-0", "WLI")


# ---------------------------------------------------------------------------------- malformed requests


def _bad_teacher_weights(globals_, mutate) -> dict:
    teacher = {k: v.copy() for k, v in globals_["teacher"].items()}
    mutate(teacher)
    return {"teacher": teacher, "head": globals_["head"]}


def _first_float(state: dict) -> str:
    return next(k for k, v in state.items() if v.dtype.kind == "f" and v.ndim >= 2)


def _malformed_cases(globals_, centroids):
    nan_centroids = {k: v.copy() for k, v in centroids.items()}
    nan_centroids["prototype_centroids"][0, 0, 0, 0] = np.nan
    bad_shape = dict(centroids)
    bad_shape["foreground_centroids"] = np.zeros((DIMS.C, DIMS.L + 1, DIMS.D), np.float32)
    missing_array = {k: v for k, v in centroids.items() if k != "background_centroids"}
    stats_config = {"round": 1, "seed": 5, "iteration": 1, "peers": "", "attempt": 0}
    name = _first_float(globals_["teacher"])

    def nan_weight(t):
        t[name].flat[0] = np.nan

    def wrong_shape(t):
        t[name] = np.zeros(t[name].shape[:-1] + (t[name].shape[-1] + 1,), t[name].dtype)

    def drop_tensor(t):
        del t[name]

    teacher_config = {"round": 1, "seed": 1, "local-epochs": 1, **SPAN, "evaluate": ""}
    return {
        "missing-config-key": (
            Payload(
                "teacher.train",
                config={"round": 1, "local-epochs": 1, **SPAN, "evaluate": ""},
                weights={"teacher": globals_["teacher"], "head": globals_["head"]},
            ),
            ["missing config keys", "seed"],
        ),
        "nan-array": (Payload("knowledge.stats", arrays=nan_centroids, config=stats_config), ["prototype_centroids", "NaN"]),
        "wrong-shape-array": (
            Payload("knowledge.stats", arrays=bad_shape, config=stats_config),
            ["foreground_centroids", "shape"],
        ),
        "missing-array": (
            Payload("knowledge.stats", arrays=missing_array, config=stats_config),
            ["missing arrays", "background_centroids"],
        ),
        "nan-weight": (
            Payload("teacher.train", config=teacher_config, weights=_bad_teacher_weights(globals_, nan_weight)),
            [name, "NaN"],
        ),
        "wrong-shape-weight": (
            Payload("teacher.train", config=teacher_config, weights=_bad_teacher_weights(globals_, wrong_shape)),
            [name],
        ),
        "missing-weight": (
            Payload("teacher.train", config=teacher_config, weights=_bad_teacher_weights(globals_, drop_tensor)),
            [name, "lack"],
        ),
        "wrong-config-type": (
            Payload(
                "teacher.train",
                config={**teacher_config, "local-epochs": 1.5},
                weights={"teacher": globals_["teacher"], "head": globals_["head"]},
            ),
            ["local-epochs", "int"],
        ),
    }


CASES = [
    "missing-config-key",
    "nan-array",
    "wrong-shape-array",
    "missing-array",
    "nan-weight",
    "wrong-shape-weight",
    "missing-weight",
    "wrong-config-type",
]


@pytest.mark.parametrize("case", CASES)
def test_malformed_request_yields_an_error_reply_naming_the_problem(globals_, knowledge, case):
    payload, needles = _malformed_cases(globals_, knowledge["centroids"])[case]
    context = new_context(node(NBI))
    # Built without make(): make() would refuse it on the sending side.
    reply = send(payload, context)
    # A request refused by its schema is refused before the site's data is resolved, so a
    # simulated site names itself by its partition (a deployed one by its node config's site-name).
    assert_error(reply, ("partition-0", "nbi-0"), *needles)
    assert not context.state.array_records, "a refused request must not leave state behind"


def test_weight_of_the_wrong_size_is_refused(globals_):
    name = _first_float(globals_["teacher"])
    teacher = dict(globals_["teacher"])
    teacher[name] = np.zeros(teacher[name].shape[:-1] + (teacher[name].shape[-1] + 1,), np.float32)
    payload = Payload(
        "teacher.train",
        config={"round": 1, "seed": 1, "local-epochs": 1, **SPAN, "evaluate": ""},
        weights={"teacher": teacher, "head": globals_["head"]},
    )
    assert_error(send(payload, new_context(node(NBI))), ("partition-0", "nbi-0"), "shape")


def test_weight_of_the_wrong_shape_but_the_same_size_is_refused(globals_):
    name = next(k for k, v in globals_["teacher"].items() if v.ndim == 4 and v.shape[0] != v.shape[1])
    teacher = dict(globals_["teacher"])
    teacher[name] = np.ascontiguousarray(teacher[name].transpose(1, 0, 2, 3))
    payload = Payload(
        "teacher.train",
        config={"round": 1, "seed": 1, "local-epochs": 1, **SPAN, "evaluate": ""},
        weights={"teacher": teacher, "head": globals_["head"]},
    )
    reply = send(payload, new_context(node(NBI)))
    assert_error(reply, ("partition-0", "nbi-0"), name)


def test_request_whose_kind_does_not_match_the_message_type_is_refused(globals_):
    payload = student_request(globals_, empty_bank(DIMS), use_bank=False)
    reply = send(payload, new_context(node(NBI)), message_type=MESSAGE_TYPE["teacher.train"])
    assert_error(reply, "partition-0", "teacher.train", "student.train")


def test_request_without_a_config_record_is_refused():
    content = RecordDict({"arrays": ArrayRecord([np.zeros(3, np.float32)])})
    reply = send_raw(content, new_context(node(NBI)), MESSAGE_TYPE["discover"])
    assert_error(reply, "partition-0", "'config'", "kind")


def test_request_with_an_unknown_kind_is_refused():
    reply = send(
        Payload("teacher.finetune", config={"round": 1}), new_context(node(NBI)), message_type=MESSAGE_TYPE["teacher.train"]
    )
    assert_error(reply, "partition-0", "unknown message kind", "teacher.finetune")


def test_bad_run_config_is_reported_not_raised(globals_):
    context = new_context(node(NBI))
    context.run_config["train.nosuch"] = 1
    reply = send(make("discover", DIMS, config={"protocol": PROTOCOL_VERSION}), context)
    assert_error(reply, "partition-0", "train.nosuch")


# ---------------------------------------------------------------------------------- deployment-style sites


@pytest.fixture(scope="module")
def folder_site(tmp_path_factory) -> tuple[Path, SyntheticSiteSpec]:
    spec = SyntheticSiteSpec(modality="nbi", num_train=12, num_val=0, num_test=6, num_classes=DIMS.C, seed=77, image_size=32)
    root = write_image_folder(spec, tmp_path_factory.mktemp("deploy") / "hospital-a")
    return root, spec


def test_deployment_node_config_with_a_data_path_works(globals_, folder_site):
    root, spec = folder_site
    node_config = {"site-name": "hospital-a", "modality": "nbi", "data-path": str(root)}
    reply = send(make("discover", DIMS, config={"protocol": PROTOCOL_VERSION}), new_context(node_config))
    assert reply.kind == "metadata"
    assert reply.config["site-name"] == "hospital-a" and reply.config["modality"] == "nbi"
    on_disk = [sum(1 for _ in (root / split / name).glob("*.png")) for split in ("train", "test") for name in spec.class_names]
    np.testing.assert_array_equal(reply.arrays["train_class_counts"], on_disk[: DIMS.C])
    np.testing.assert_array_equal(reply.arrays["test_class_counts"], on_disk[DIMS.C :])
    assert reply.arrays["train_class_counts"].sum() == 12 and reply.arrays["test_class_counts"].sum() == 6
    update = send(teacher_request(globals_), new_context(node_config))
    assert update.kind == "teacher.update"
    assert update.config["num-examples"] == 12 == reply.arrays["train_class_counts"].sum()


def test_deployment_with_the_wrong_modality_is_refused_naming_site_json(folder_site):
    root, _ = folder_site
    node_config = {"site-name": "hospital-a", "modality": "wli", "data-path": str(root)}
    reply = send(make("discover", DIMS, config={"protocol": PROTOCOL_VERSION}), new_context(node_config))
    assert_error(reply, "hospital-a", "site.json", "modality", "'nbi'", "'wli'")


def test_deployment_with_a_missing_data_path_is_refused_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    node_config = {"site-name": "hospital-b", "modality": "wli", "data-path": str(missing)}
    reply = send(make("discover", DIMS, config={"protocol": PROTOCOL_VERSION}), new_context(node_config))
    assert_error(reply, "hospital-b", str(missing), "does not exist")


def test_deployment_without_modality_is_refused(folder_site):
    root, _ = folder_site
    reply = send(
        make("discover", DIMS, config={"protocol": PROTOCOL_VERSION}),
        new_context({"site-name": "hospital-c", "data-path": str(root)}),
    )
    assert_error(reply, "hospital-c", "modality")
