"""Server-side aggregation (server/aggregation.py), strategy-style with hand-made replies.

The central property: NBI sites send per-class sums and counts, so the server's bank and its
federated Lloyd steps equal what one site holding every group would compute.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from client.knowledge import SiteKnowledge, knowledge_sums
from common.losses import BACKGROUND, FOREGROUND, UNCERTAIN
from common.records import (
    BANK_STATISTICS,
    CENTROIDS,
    CLASS_PROTOTYPES,
    EVALUATION_FIELDS,
    KNOWLEDGE_SEEDS_FIELDS,
    SUM_COUNT_PAIRS,
    Dims,
    empty_statistics,
    make,
)
from server.aggregation import (
    ROBUST,
    bank_statistics,
    clip_updates,
    empty_bank,
    initial_centroids,
    lloyd_centroids,
    norm_outliers,
    robust_average,
    robust_statistics,
    sum_statistics,
    update_norm,
    weighted_average,
)
from tests.conftest import tiny_config

# ------------------------------------------------------------------------------- FedAvg


def test_weighted_average_is_exact_on_known_inputs():
    states = [
        {"w": np.array([1.0, 2.0], np.float32), "n": np.array([10], np.int64), "h": np.array([[0.5]], np.float64)},
        {"w": np.array([3.0, 6.0], np.float32), "n": np.array([13], np.int64), "h": np.array([[1.5]], np.float64)},
    ]
    out = weighted_average(states, [1, 3])
    np.testing.assert_array_equal(out["w"], np.array([2.5, 5.0], np.float32))
    np.testing.assert_array_equal(out["h"], np.array([[1.25]]))
    assert out["n"].dtype == np.int64 and out["n"].tolist() == [12]  # 12.25 rounded back to int
    assert out["w"].dtype == np.float32 and out["h"].dtype == np.float64
    # Only the ratio of the weights matters.
    scaled = weighted_average(states, [100, 300])
    for name in out:
        np.testing.assert_array_equal(scaled[name], out[name])


def test_weighted_average_rounds_integer_buffers_to_nearest():
    states = [{"n": np.array([0, 4], np.int64)}, {"n": np.array([1, 7], np.int64)}]
    out = weighted_average(states, [1, 3])  # 0.75 -> 1, 6.25 -> 6
    assert out["n"].dtype == np.int64
    assert out["n"].tolist() == [1, 6]


def test_weighted_average_of_one_state_is_that_state():
    state = {"w": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32), "n": np.array([5], np.int64)}
    out = weighted_average([state], [7.0])
    np.testing.assert_allclose(out["w"], state["w"], rtol=1e-6)
    assert out["n"].tolist() == [5]


@pytest.mark.parametrize(
    "states, weights, needle", [([], [], "at least one"), ([{"w": np.ones(2, np.float32)}] * 2, [0, 0], "sum to")]
)
def test_weighted_average_refuses_degenerate_input(states, weights, needle):
    with pytest.raises(ValueError, match=needle):
        weighted_average(states, weights)


def test_update_norm_counts_floating_tensors_only():
    reference = {"w": np.array([0.0, 1.0], np.float32), "n": np.array([0], np.int64)}
    state = {"w": np.array([3.0, 5.0], np.float32), "n": np.array([1000], np.int64)}
    assert update_norm(state, reference) == pytest.approx(5.0)
    assert update_norm(reference, reference) == 0.0


@pytest.mark.parametrize(
    "norms, ratio, expected",
    [
        ([1.0, 1.1, 0.9, 500.0], 100, [3]),
        ([1.0, 1.0, 100.0], 100, []),  # exactly the ratio is not an outlier
        ([1.0, 1.0, 100.5], 100, [2]),
        ([1.0, 1000.0], 100, []),  # two updates: no meaningful median
        ([0.0, 0.0, 5.0], 100, []),  # median 0: nothing to compare with
        ([2.0, 30.0, 2.0, 3.0, 2.5], 10, [1]),
    ],
)
def test_norm_outliers(norms, ratio, expected):
    assert norm_outliers(norms, ratio) == expected


# ------------------------------------------------------------------------------- sums and banks

DIMS = Dims(C=2, S=2, M=2, D=3, L=2, B=10)
CFG = tiny_config(**{"pagkd.min_group_size": 2, "pagkd.group_size": 3})


def test_empty_bank_is_all_zeros_with_the_schema_shapes():
    bank = empty_bank(DIMS)
    assert sorted(bank) == sorted(f.name for f in BANK_STATISTICS)
    for spec in BANK_STATISTICS:
        assert bank[spec.name].shape == DIMS.resolve(spec.shape)
        assert bank[spec.name].dtype == np.dtype(spec.dtype)
        assert not bank[spec.name].any()
    # It is a valid student.train payload (a WLI-only student is sent it).
    config = {
        "round": 1,
        "seed": 0,
        "local-epochs": 1,
        "group-losses": False,
        "use-bank": False,
        "evaluate": "",
        "schedule-start": 0.0,
        "schedule-end": 1.0,
    }
    make(
        "student.train",
        DIMS,
        arrays={**bank, **empty_statistics(CLASS_PROTOTYPES, DIMS)},
        config=config,
        weights={"student": {}, "head": {}},
    )


def test_sum_statistics_adds_floats_in_float64_and_counts_exactly():
    a = {"x": np.full((2,), 1e8, np.float32), "k": np.array([2**40, 1], np.int64)}
    b = {"x": np.full((2,), 1.0, np.float32), "k": np.array([1, 2], np.int64)}
    c = {"x": np.full((2,), -1e8, np.float32), "k": np.array([0, 0], np.int64)}
    out = sum_statistics([a, b, c], ["x", "k"])
    np.testing.assert_array_equal(out["x"], np.ones(2, np.float32))  # float32 accumulation would give 0
    assert out["x"].dtype == np.float32
    assert out["k"].tolist() == [2**40 + 1, 3] and out["k"].dtype == np.int64


def _centres(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Well-separated cluster centres per class: prototype sets [C, S, M, D], tokens [C, L, D]."""
    return {
        "prototype": rng.normal(scale=5.0, size=(DIMS.C, DIMS.S, DIMS.M, DIMS.D)).astype(np.float32),
        "foreground": rng.normal(scale=5.0, size=(DIMS.C, DIMS.L, DIMS.D)).astype(np.float32),
        "background": rng.normal(scale=5.0, size=(DIMS.C, DIMS.L, DIMS.D)).astype(np.float32),
    }


def make_knowledge(groups_per_class: int, group_size: int, seed: int) -> SiteKnowledge:
    """A hand-made site view. Groups in order g0, g1, ... with their images contiguous (as
    extract_site_knowledge keeps them). Each image has 2 foreground, 1 background and 1
    uncertain token; the k-th image of a group has its tokens near centroid ``k % L`` of its
    class, so with ``group_size >= 2 * L`` every cluster gets tokens of >= K_min = 2 images in
    every group: any split into whole groups suppresses nothing."""
    assert group_size >= 2 * DIMS.L
    rng = np.random.default_rng(seed)
    centres = _centres(np.random.default_rng(1234))
    prototypes, group_labels, sizes, tokens, token_labels, classes = [], [], [], [], [], []
    for g in range(groups_per_class * DIMS.C):
        c = g % DIMS.C
        prototypes.append(centres["prototype"][c, g % DIMS.S] + rng.normal(scale=0.3, size=(DIMS.M, DIMS.D)))
        group_labels.append(c)
        sizes.append(group_size)
        for k in range(group_size):
            j = k % DIMS.L
            noise = rng.normal(scale=0.3, size=(4, DIMS.D))
            tokens.append(
                np.stack(
                    [
                        centres["foreground"][c, j],
                        centres["foreground"][c, j],
                        centres["background"][c, j],
                        np.zeros(DIMS.D, np.float32),
                    ]
                )
                + noise
            )
            token_labels.append([FOREGROUND, FOREGROUND, BACKGROUND, UNCERTAIN])
            classes.append(c)
    return SiteKnowledge(
        prototypes=torch.tensor(np.array(prototypes), dtype=torch.float32),
        group_labels=torch.tensor(group_labels, dtype=torch.long),
        group_sizes=torch.tensor(sizes, dtype=torch.long),
        tokens=torch.tensor(np.array(tokens), dtype=torch.float32),
        token_labels=torch.tensor(token_labels, dtype=torch.long),
        classes=torch.tensor(classes, dtype=torch.long),
    )


def split_knowledge(knowledge: SiteKnowledge, groups: slice) -> SiteKnowledge:
    """The sub-site holding ``groups`` (a slice of groups) and exactly their images."""
    sizes = knowledge.group_sizes
    starts = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    first, last = groups.start or 0, groups.stop if groups.stop is not None else len(sizes)
    images = slice(int(starts[first]), int(starts[last]))
    return SiteKnowledge(
        prototypes=knowledge.prototypes[first:last],
        group_labels=knowledge.group_labels[first:last],
        group_sizes=sizes[first:last],
        tokens=knowledge.tokens[images],
        token_labels=knowledge.token_labels[images],
        classes=knowledge.classes[images],
    )


def perturbed_centroids(seed: int) -> dict[str, np.ndarray]:
    centres = _centres(np.random.default_rng(1234))
    rng = np.random.default_rng(seed)
    return {f"{k}_centroids": (v + rng.normal(scale=0.5, size=v.shape)).astype(np.float32) for k, v in centres.items()}


def assert_same_bank(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(expected) == sorted(f.name for f in BANK_STATISTICS)
    for spec in BANK_STATISTICS:
        if spec.counts:
            np.testing.assert_array_equal(got[spec.name], expected[spec.name], err_msg=spec.name)
        else:
            np.testing.assert_allclose(got[spec.name], expected[spec.name], rtol=1e-5, atol=1e-5, err_msg=spec.name)


@pytest.mark.parametrize("cut", [1, 3, 5])
def test_bank_of_two_sites_equals_the_pooled_bank(cut):
    union = make_knowledge(groups_per_class=3, group_size=4, seed=0)
    site_a, site_b = split_knowledge(union, slice(0, cut)), split_knowledge(union, slice(cut, None))
    assert len(site_a.classes) + len(site_b.classes) == len(union.classes)
    centroids = perturbed_centroids(1)
    pooled = knowledge_sums(union, DIMS, CFG, centroids)
    summed = bank_statistics([knowledge_sums(site_a, DIMS, CFG, centroids), knowledge_sums(site_b, DIMS, CFG, centroids)])
    assert_same_bank(summed, pooled)
    # Non-trivial: every class has images and tokens behind its bank.
    assert (pooled["image_count"] == 12).all()
    assert pooled["prototype_count"].sum() == 6
    assert pooled["foreground_count"].sum() == 2 * 24 and pooled["background_count"].sum() == 24
    assert (pooled["foreground_count"] > 0).all() and (pooled["background_count"] > 0).all()


def test_two_federated_lloyd_steps_equal_the_pooled_ones():
    union = make_knowledge(groups_per_class=4, group_size=4, seed=2)
    sites = [split_knowledge(union, slice(0, 3)), split_knowledge(union, slice(3, 6)), split_knowledge(union, slice(6, None))]
    fed = pooled = perturbed_centroids(3)
    for _ in range(2):
        fed_bank = bank_statistics([knowledge_sums(s, DIMS, CFG, fed) for s in sites])
        pooled_bank = knowledge_sums(union, DIMS, CFG, pooled)
        assert_same_bank(fed_bank, pooled_bank)
        fed, pooled = lloyd_centroids(fed_bank, fed, DIMS), lloyd_centroids(pooled_bank, pooled, DIMS)
        for name in fed:
            np.testing.assert_allclose(fed[name], pooled[name], rtol=1e-5, atol=1e-5, err_msg=name)
    # The steps moved the centroids onto the data (not a no-op).
    assert not np.allclose(fed["foreground_centroids"], perturbed_centroids(3)["foreground_centroids"])


def test_lloyd_centroids_is_sum_over_count_and_keeps_empty_clusters():
    rng = np.random.default_rng(4)
    old = perturbed_centroids(5)
    bank = empty_bank(DIMS)
    target = rng.normal(size=(DIMS.C, DIMS.L, DIMS.D)).astype(np.float32)
    bank["foreground_count"][:] = [[2, 0], [5, 1]]
    bank["foreground_sum"][:] = target * bank["foreground_count"][..., None]
    bank["prototype_count"][0, 1] = 4
    bank["prototype_sum"][0, 1] = 4 * np.ones((DIMS.M, DIMS.D), np.float32)
    new = lloyd_centroids(bank, old, DIMS)
    for name in ("prototype_centroids", "foreground_centroids", "background_centroids"):
        assert new[name].shape == old[name].shape and new[name].dtype == np.float32
    expected = np.where(bank["foreground_count"][..., None] > 0, target, old["foreground_centroids"])
    np.testing.assert_allclose(new["foreground_centroids"], expected, rtol=1e-6)
    np.testing.assert_array_equal(new["background_centroids"], old["background_centroids"])  # no points anywhere
    np.testing.assert_allclose(new["prototype_centroids"][0, 1], np.ones((DIMS.M, DIMS.D)))
    np.testing.assert_array_equal(new["prototype_centroids"][1], old["prototype_centroids"][1])


# ------------------------------------------------------------------------------- seeds -> centroids


def seed_reply(rng: np.random.Generator, means: dict[str, np.ndarray], counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name in ("prototype", "foreground", "background"):
        n = counts[name]
        out[f"{name}_seed_count"] = n.astype(np.int64)
        out[f"{name}_seed_sum"] = (means[name] * n.reshape(n.shape + (1,) * (means[name].ndim - n.ndim))).astype(np.float32)
    scores = {f.name: np.zeros(DIMS.resolve(f.shape), np.int64) for f in EVALUATION_FIELDS}
    make(
        "knowledge.seeds",
        DIMS,
        arrays={**out, **scores},
        config={"groups": 1, "public-key": "", "eval-examples": 0, "eval-loss": 0.0},
    )  # a valid reply
    return out


def test_initial_centroids_shapes_finite_and_at_the_seed_means():
    rng = np.random.default_rng(0)
    centres = _centres(np.random.default_rng(1234))
    replies = []
    for site in range(2):
        counts = {
            "prototype": np.full((DIMS.C, DIMS.S), 3 + site),
            "foreground": np.full((DIMS.C, DIMS.L), 10),
            "background": np.full((DIMS.C, DIMS.L), 7),
        }
        means = {k: v + rng.normal(scale=0.01, size=v.shape).astype(np.float32) for k, v in centres.items()}
        replies.append(seed_reply(rng, means, counts))
    out = initial_centroids(replies, DIMS, seed=0)
    assert out["prototype_centroids"].shape == (DIMS.C, DIMS.S, DIMS.M, DIMS.D)
    assert out["foreground_centroids"].shape == out["background_centroids"].shape == (DIMS.C, DIMS.L, DIMS.D)
    assert sorted(out) == sorted(f.name for f in CENTROIDS)
    for name, array in out.items():
        assert array.dtype == np.float32 and np.isfinite(array).all(), name
    # Two sites' seeds around the same centres: the k-means of the seeds recovers the centres.
    for name in ("prototype", "foreground", "background"):
        got = out[f"{name}_centroids"]
        for c in range(DIMS.C):
            k = got.shape[1]
            found = got[c].reshape(k, -1)
            want = centres[name][c].reshape(k, -1)
            dist = np.linalg.norm(found[:, None] - want[None], axis=-1)
            assert sorted(dist.argmin(axis=1).tolist()) == list(range(k)), f"{name} class {c}"
            assert dist.min(axis=1).max() < 0.1


def test_initial_centroids_with_missing_or_too_few_seeds():
    rng = np.random.default_rng(1)
    centres = _centres(np.random.default_rng(1234))
    counts = {
        "prototype": np.array([[2, 0], [0, 0]]),
        "foreground": np.array([[5, 5], [0, 0]]),
        "background": np.array([[0, 3], [0, 0]]),
    }
    out = initial_centroids([seed_reply(rng, centres, counts)], DIMS, seed=1)
    for array in out.values():
        assert np.isfinite(array).all()
    # Class 1 has no seed at all: zeros.
    for name in out:
        assert not out[name][1].any(), name
    # Class 0 prototypes: one seed for S = 2 slots -> every slot is that seed (a real location).
    for s in range(DIMS.S):
        np.testing.assert_allclose(out["prototype_centroids"][0, s], centres["prototype"][0, 0], rtol=1e-5, atol=1e-5)
    for s in range(DIMS.L):
        np.testing.assert_allclose(out["background_centroids"][0, s], centres["background"][0, 1], rtol=1e-5, atol=1e-5)


def test_seed_schema_fields_cover_what_initial_centroids_reads():
    names = {f.name for f in KNOWLEDGE_SEEDS_FIELDS}
    assert names == {f"{k}_seed_{s}" for k in ("prototype", "foreground", "background") for s in ("sum", "count")}


# ------------------------------------------------------------------------------- a real site's knowledge


@pytest.mark.usefixtures("single_thread")
def test_real_site_knowledge_split_in_two_sums_to_the_whole():
    """extract_site_knowledge on a synthetic NBI site: split its groups into two sites. Prototype
    and image statistics add exactly; token clusters add exactly unless a part has fewer than
    K_min images in a cluster (then that part suppresses it: the parts can only hold less)."""
    from client.app import dims_of
    from client.knowledge import extract_site_knowledge, knowledge_seeds
    from client.site import resolve_site
    from client.train import eval_loader
    from common.models import build_query_head, build_teacher

    cfg = tiny_config(**{"data.image_size": 64, "data.train_per_site": 36})
    dims = dims_of(cfg)
    torch.manual_seed(0)
    teacher, head = build_teacher(cfg.model, dims.C), build_query_head(cfg.model, dims.C)
    site = resolve_site({"partition-id": 0, "num-partitions": 4}, cfg)
    knowledge = extract_site_knowledge(
        teacher, head, eval_loader(site.train, cfg.train.batch_size), cfg, torch.device("cpu"), seed=3
    )
    groups = len(knowledge.group_sizes)
    assert groups >= 4 and int(knowledge.group_sizes.min()) >= cfg.pagkd.min_group_size
    assert len(knowledge.classes) == int(knowledge.group_sizes.sum()) <= len(site.train)
    parts = [split_knowledge(knowledge, slice(0, groups // 2)), split_knowledge(knowledge, slice(groups // 2, None))]
    centroids = initial_centroids([knowledge_seeds(knowledge, dims, cfg, seed=3)], dims, seed=3)
    whole = knowledge_sums(knowledge, dims, cfg, centroids)
    summed = bank_statistics([knowledge_sums(p, dims, cfg, centroids) for p in parts])
    for name in ("prototype_count", "image_count"):
        np.testing.assert_array_equal(summed[name], whole[name], err_msg=name)
    np.testing.assert_allclose(summed["prototype_sum"], whole["prototype_sum"], rtol=1e-5, atol=1e-4, err_msg="prototype_sum")
    assert whole["image_count"].sum() == len(knowledge.classes)
    for label in ("foreground", "background"):
        count_parts, count_whole = summed[f"{label}_count"], whole[f"{label}_count"]
        assert (count_parts <= count_whole).all()
        same = count_parts == count_whole
        np.testing.assert_allclose(summed[f"{label}_sum"][same], whole[f"{label}_sum"][same], rtol=1e-5, atol=1e-4)
    assert whole["foreground_count"].sum() + whole["background_count"].sum() > 0


def test_split_knowledge_helper_partitions_images():
    union = make_knowledge(groups_per_class=2, group_size=4, seed=9)
    a, b = split_knowledge(union, slice(0, 1)), split_knowledge(union, slice(1, None))
    assert torch.equal(torch.cat([a.tokens, b.tokens]), union.tokens)
    assert int(a.group_sizes.sum()) == len(a.classes) == 4
    assert dataclasses.fields(SiteKnowledge)  # the helper builds every field


# ------------------------------------------------------------------------------- robust aggregation


def outlier_states() -> list[dict[str, np.ndarray]]:
    """5 states: 4 honest near w = [1, 2, 3], n = 10; the last is a huge outlier."""
    honest = [[1.0, 2.0, 3.0], [1.1, 2.1, 2.9], [0.9, 1.9, 3.1], [1.0, 2.2, 3.0]]
    states = [{"w": np.array(w, np.float32), "n": np.array([10 + i], np.int64)} for i, w in enumerate(honest)]
    states.append({"w": np.array([1e6, -1e6, 1e6], np.float32), "n": np.array([10**6], np.int64)})
    return states


def test_median_and_trimmed_mean_resist_one_huge_outlier():
    states = outlier_states()
    weights = [1, 1, 1, 1, 1000]  # the outlier also claims a huge num-examples: ignored by the robust methods
    median = robust_average(states, weights, "median", 0.0)
    np.testing.assert_allclose(median["w"], [1.0, 2.0, 3.0], rtol=1e-6)  # hand-computed middle of 5
    assert median["n"].tolist() == [12]  # median of 10, 11, 12, 13, 10**6
    trimmed = robust_average(states, weights, "trimmed_mean", 0.2)  # floor(0.2 * 5) = 1 off each end
    # w0: drop 0.9 and 1e6 -> mean(1.0, 1.1, 1.0); w1: drop -1e6 and 2.2 -> mean(2.0, 2.1, 1.9); w2: drop 2.9, 1e6.
    np.testing.assert_allclose(trimmed["w"], [3.1 / 3, 2.0, 9.1 / 3], rtol=1e-6)
    assert trimmed["n"].tolist() == [12]  # mean(11, 12, 13)
    mean = robust_average(states, weights, "mean", 0.0)
    assert np.abs(mean["w"] - [1.0, 2.0, 3.0]).min() > 1e5  # FedAvg is dragged off by the outlier


def test_trimmed_mean_without_trim_is_the_unweighted_mean():
    states = outlier_states()[:4]
    out = robust_average(states, [1, 2, 3, 4], "trimmed_mean", 0.0)
    expected = weighted_average(states, [1, 1, 1, 1])
    np.testing.assert_allclose(out["w"], expected["w"], rtol=1e-6)
    assert not np.allclose(out["w"], weighted_average(states, [1, 2, 3, 4])["w"], rtol=1e-6)  # not weighted
    assert out["n"].tolist() == expected["n"].tolist() == [12]  # 11.5 rounded half to even


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_average_of_one_state_is_that_state(method):
    state = {"w": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32), "n": np.array([5], np.int64)}
    out = robust_average([state], [7.0], method, 0.4)
    np.testing.assert_array_equal(out["w"], state["w"])
    assert out["n"].tolist() == [5]


@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_average_rounds_integer_buffers_and_keeps_dtypes(method):
    states = [
        {"n": np.array([0, 4], np.int32), "h": np.array([0.25], np.float64)},
        {"n": np.array([1, 7], np.int32), "h": np.array([0.5], np.float64)},
    ]
    out = robust_average(states, [1, 1], method, 0.0)  # median of 2 = mean: 0.5 -> 0 (half to even), 5.5 -> 6
    assert out["n"].dtype == np.int32 and out["n"].tolist() == [0, 6]
    assert out["h"].dtype == np.float64 and out["h"].tolist() == [0.375]


def test_robust_average_mean_is_weighted_average_exactly():
    rng = np.random.default_rng(1)
    states = [{"w": rng.normal(size=(4, 3)).astype(np.float32), "n": np.array([i], np.int64)} for i in range(4)]
    weights = [3.0, 1.0, 7.0, 2.5]
    out, expected = robust_average(states, weights, "mean", 0.3), weighted_average(states, weights)
    for name in expected:
        np.testing.assert_array_equal(out[name], expected[name])
        assert out[name].dtype == expected[name].dtype


@pytest.mark.parametrize(
    "states, method, trim, needle",
    [
        ([{"w": np.ones(2, np.float32)}], "krum", 0.0, "unknown aggregation method 'krum'.*median.*trimmed_mean"),
        ([{"w": np.ones(2, np.float32)}], "trimmed_mean", 0.5, r"outside \[0, 0.5\)"),
        ([{"w": np.ones(2, np.float32)}], "trimmed_mean", -0.1, r"outside \[0, 0.5\)"),
        ([], "median", 0.0, "at least one"),
        ([], "mean", 0.0, "at least one"),
    ],
)
def test_robust_average_refuses(states, method, trim, needle):
    with pytest.raises(ValueError, match=needle):
        robust_average(states, [1.0] * len(states), method, trim)


def test_robust_choices():
    assert ROBUST == ("mean", "median", "trimmed_mean")


def clip_inputs() -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    rng = np.random.default_rng(2)
    reference = {
        "w": rng.normal(size=(4, 3)).astype(np.float32),
        "b": rng.normal(size=3).astype(np.float32),
        "n": np.array([7], np.int64),
    }
    states = []
    for i in range(5):
        scale = 100.0 if i == 3 else 1.0
        states.append(
            {
                "w": (reference["w"] + scale * rng.normal(size=(4, 3))).astype(np.float32),
                "b": (reference["b"] + scale * rng.normal(size=3)).astype(np.float32),
                "n": np.array([7 + 1000 * i], np.int64),
            }
        )
    return states, reference


def test_clip_updates_scales_the_huge_update_to_ratio_times_median():
    states, reference = clip_inputs()
    norms = [update_norm(s, reference) for s in states]
    median = float(np.median(norms))
    assert norms[3] > 20 * median  # the setup has one update far above the others
    clipped, scales = clip_updates(states, reference, ratio=2.0)
    assert update_norm(clipped[3], reference) == pytest.approx(2.0 * median, rel=1e-6)
    assert scales[3] == pytest.approx(2.0 * median / norms[3]) and scales[3] < 1
    # Direction kept: the clipped update is the original one scaled.
    np.testing.assert_allclose(
        clipped[3]["w"] - reference["w"], scales[3] * (states[3]["w"] - reference["w"]), rtol=1e-5, atol=1e-6
    )
    for i in (0, 1, 2, 4):
        assert scales[i] == 1.0
        for name in states[i]:
            np.testing.assert_array_equal(clipped[i][name], states[i][name])
    for i in range(5):  # integer tensors pass unchanged, dtypes kept
        assert clipped[i]["n"].tolist() == states[i]["n"].tolist() and clipped[i]["n"].dtype == np.int64
        assert clipped[i]["w"].dtype == np.float32
    assert clipped[0]["w"] is not states[0]["w"]  # copies, not the inputs


@pytest.mark.parametrize("ratio", [0.0, -1.0])
def test_clip_updates_off_leaves_everything_unchanged(ratio):
    states, reference = clip_inputs()
    clipped, scales = clip_updates(states, reference, ratio)
    assert scales == [1.0] * 5
    for got, state in zip(clipped, states):
        for name in state:
            np.testing.assert_array_equal(got[name], state[name])


def test_clip_updates_with_zero_median_norm_clips_nothing():
    reference = {"w": np.zeros(2, np.float32)}
    states = [dict(reference), dict(reference), {"w": np.array([3.0, 4.0], np.float32)}]
    clipped, scales = clip_updates(states, reference, 2.0)
    assert scales == [1.0] * 3
    np.testing.assert_array_equal(clipped[2]["w"], [3.0, 4.0])


# Bank statistics: 3 honest sites around the same class means, one poisoned.

HONEST_SITES = 3


def honest_bank_reply(
    rng: np.random.Generator, centres: dict[str, np.ndarray], counts: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Sums = count x (class mean + small noise)."""
    out = {}
    for name in ("prototype", "foreground", "background"):
        n = counts[name].astype(np.int64)
        mean = centres[name] + rng.normal(scale=0.05, size=centres[name].shape)
        expand = n.reshape(n.shape + (1,) * (mean.ndim - n.ndim))
        out[f"{name}_sum"] = (mean * expand).astype(np.float32)
        out[f"{name}_count"] = n
    out["image_count"] = np.array([20, 30], np.int64)
    return out


def bank_sites(seed: int) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    centres = _centres(np.random.default_rng(1234))
    counts = [
        {
            "prototype": np.array([[3, 2], [0, 0]]),
            "foreground": np.array([[10, 4], [6, 0]]),
            "background": np.array([[5, 5], [2, 0]]),
        },
        {
            "prototype": np.array([[1, 4], [0, 0]]),
            "foreground": np.array([[8, 8], [1, 0]]),
            "background": np.array([[3, 1], [9, 0]]),
        },
        {
            "prototype": np.array([[2, 2], [0, 0]]),
            "foreground": np.array([[5, 2], [7, 0]]),
            "background": np.array([[4, 6], [1, 0]]),
        },
    ]
    replies = [honest_bank_reply(rng, centres, c) for c in counts]
    for reply in replies:
        make("knowledge.sums", DIMS, arrays=reply, config={"groups": 1, "smallest-group": 2})  # a valid reply
    return replies, centres


def bank_means(bank: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """sum / count per slot where the count is positive (the bank's reading)."""
    out = {}
    for sum_name, count_name in SUM_COUNT_PAIRS:
        count = bank[count_name]
        have = count > 0
        out[sum_name] = bank[sum_name][have].astype(np.float64) / count[have].reshape(
            (-1,) + (1,) * (bank[sum_name].ndim - count.ndim)
        )
    return out


def poison(kind: str, honest: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A poisoned site with an honest site's counts (it may also claim huge ones)."""
    out = {k: v.copy() for k, v in honest.items()}
    for name in ("prototype_sum", "foreground_sum", "background_sum"):
        if kind == "flip":
            out[name] = (-10.0 * honest[name]).astype(np.float32)
        elif kind == "scale":
            out[name] = (100.0 * honest[name]).astype(np.float32)
        else:  # random of norm 1000 per slot
            noise = rng.normal(size=honest[name].shape)
            slots = noise.reshape(noise.shape[:2] + (-1,))
            slots *= 1000.0 / np.linalg.norm(slots, axis=-1, keepdims=True)
            out[name] = slots.reshape(noise.shape).astype(np.float32)
    if kind == "scale":  # and claims 50x the counts, to buy weight in a weighted mean
        for name in ("prototype_count", "foreground_count", "background_count"):
            out[name] = honest[name] * 50
    return out


@pytest.mark.parametrize("clip", [0.0, -1.0])
def test_robust_statistics_mean_without_clip_is_bank_statistics_exactly(clip):
    replies, _ = bank_sites(0)
    expected, out = bank_statistics(replies), robust_statistics(replies, "mean", 0.0, clip)
    assert sorted(out) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(out[name], expected[name], err_msg=name)
        assert out[name].dtype == expected[name].dtype


def assert_bank_shape(bank: dict[str, np.ndarray], replies: list[dict[str, np.ndarray]]) -> None:
    assert sorted(bank) == sorted(f.name for f in BANK_STATISTICS)
    for spec in BANK_STATISTICS:
        assert bank[spec.name].shape == replies[0][spec.name].shape == DIMS.resolve(spec.shape), spec.name
        assert bank[spec.name].dtype == replies[0][spec.name].dtype == np.dtype(spec.dtype), spec.name
    make(
        "student.train",
        DIMS,
        arrays={**bank, **empty_statistics(CLASS_PROTOTYPES, DIMS)},
        weights={"student": {}, "head": {}},
        config={
            "round": 1,
            "seed": 0,
            "local-epochs": 1,
            "group-losses": False,
            "use-bank": True,
            "evaluate": "",
            "schedule-start": 0.0,
            "schedule-end": 1.0,
        },
    )


@pytest.mark.parametrize("kind", ["flip", "scale", "random"])
@pytest.mark.parametrize(
    "method, trim, clip", [("median", 0.0, 0.0), ("trimmed_mean", 0.25, 0.0), ("median", 0.0, 2.0), ("mean", 0.0, 2.0)]
)
def test_robust_statistics_resist_a_poisoned_site(kind, method, trim, clip):
    honest, _ = bank_sites(1)
    replies = honest + [poison(kind, honest[0], np.random.default_rng(7))]
    pooled = bank_means(bank_statistics(honest))  # what the honest sites alone pool to
    robust = robust_statistics(replies, method, trim, clip)
    plain = bank_statistics(replies)
    assert_bank_shape(robust, replies)
    # Counts are always the exact sums (poisoned claims included), and empty slots stay zero.
    for spec in BANK_STATISTICS:
        if spec.counts:
            np.testing.assert_array_equal(robust[spec.name], plain[spec.name], err_msg=spec.name)
    for sum_name, count_name in SUM_COUNT_PAIRS:
        empty = plain[count_name] == 0
        assert empty.any() and not robust[sum_name][empty].any(), sum_name
    got, bad = bank_means(robust), bank_means(plain)
    # Max deviation over slots of a bank mean from the honest pooled mean: the honest sites'
    # means differ by noise 0.05 (the centres ~5).
    # The count-weighted mean after clipping is only bounded: the poisoned site keeps its
    # claimed weight and sits up to clip x the median deviation from the median, hence 2x tol.
    for name in got:
        tol = 0.3 * (2 if method == "mean" else 1)
        robust_error = np.abs(got[name] - pooled[name]).max()
        plain_error = np.abs(bad[name] - pooled[name]).max()
        assert robust_error < tol, (name, robust_error)
        assert plain_error > 5 * tol and plain_error > 10 * robust_error, (name, plain_error)


def test_robust_statistics_median_on_hand_made_slot():
    """One slot, 3 sites: means 1, 2, 100 (counts 1, 2, 3) -> median 2, written back as 2 x 6."""
    replies = []
    for mean, n in ((1.0, 1), (2.0, 2), (100.0, 3)):
        bank = empty_bank(DIMS)
        bank["foreground_count"][0, 0] = n
        bank["foreground_sum"][0, 0] = mean * n
        bank["image_count"][:] = n
        replies.append(bank)
    replies.append(empty_bank(DIMS))  # a site with no count anywhere takes no part in the slots
    out = robust_statistics(replies, "median", 0.0, 0.0)
    np.testing.assert_array_equal(out["foreground_sum"][0, 0], np.full(DIMS.D, 12.0, np.float32))
    assert out["foreground_count"][0, 0] == 6 and out["image_count"].tolist() == [6, 6]
    assert not out["foreground_sum"][1].any() and not out["foreground_sum"][0, 1].any()
    assert not out["prototype_sum"].any() and not out["background_sum"].any()
    # Count-weighted mean with clipping: the 100 is clipped to median + 2 x median deviation (1) = 4.
    clipped = robust_statistics(replies, "mean", 0.0, 2.0)
    np.testing.assert_allclose(clipped["foreground_sum"][0, 0], (1 * 1 + 2 * 2 + 3 * 4.0) * np.ones(DIMS.D), rtol=1e-6)
    # Without clipping the count-weighted mean is the exact sum.
    assert robust_statistics(replies, "mean", 0.0, 0.0)["foreground_sum"][0, 0, 0] == 1 + 4 + 300


def test_robust_statistics_trimmed_mean_on_hand_made_slot():
    """One prototype slot, 5 sites with means 1, 2, 6, 7, 100:
    trim 0.2 drops one of each end -> (2 + 6 + 7) / 3 = 5; the median is 6."""
    replies = []
    for mean, n in ((1.0, 4), (2.0, 1), (6.0, 2), (7.0, 1), (100.0, 2)):
        bank = empty_bank(DIMS)
        bank["prototype_count"][1, 0] = n
        bank["prototype_sum"][1, 0] = mean * n
        replies.append(bank)
    trimmed = robust_statistics(replies, "trimmed_mean", 0.2, 0.0)
    np.testing.assert_allclose(trimmed["prototype_sum"][1, 0], 5.0 * 10, rtol=1e-6)
    assert trimmed["prototype_count"][1, 0] == 10 and trimmed["prototype_sum"].dtype == np.float32
    median = robust_statistics(replies, "median", 0.0, 0.0)
    np.testing.assert_allclose(median["prototype_sum"][1, 0], 6.0 * 10, rtol=1e-6)
    untrimmed = robust_statistics(replies, "trimmed_mean", 0.0, 0.0)  # unweighted mean of the means
    np.testing.assert_allclose(untrimmed["prototype_sum"][1, 0], 116.0 / 5 * 10, rtol=1e-6)
    mask = np.ones(DIMS.C * DIMS.S, bool).reshape(DIMS.C, DIMS.S)
    mask[1, 0] = False
    assert not trimmed["prototype_sum"][mask].any()


@pytest.mark.parametrize(
    "method, trim, needle", [("krum", 0.0, "unknown"), ("trimmed_mean", 0.5, "outside"), ("median", 0.0, "at least one")]
)
def test_robust_statistics_refuses(method, trim, needle):
    replies = [] if needle == "at least one" else bank_sites(0)[0]
    with pytest.raises(ValueError, match=needle):
        robust_statistics(replies, method, trim, 0.0)
