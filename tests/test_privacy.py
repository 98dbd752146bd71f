"""Differential privacy (common/privacy.py, client/knowledge.py) and secure aggregation
(common/secagg.py through the protocol) of the NBI knowledge statistics.

DP: removing one group moves a release by at most the declared bounds (the sensitivity the
noise is calibrated to), without clipping it does not, the noise has the declared std and
comes from OS entropy, and epsilon is Flower's RDP accountant's. Secure aggregation: with
3 NBI sites the server receives only uniform-looking masked sums, the bank they decode to
equals the plain bank, a site that drops out of a masked sum is restarted around, and a site
refuses a replayed step or a roster that misrepresents its key.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client.app import app as client_app
from client.app import dims_of
from client.knowledge import DP_COUNT_KEYS, DP_FLOAT_KEYS, SiteKnowledge, _statistics
from client.wire import MESSAGE_TYPE, from_recorddict, to_recorddict
from common import secagg
from common.config import ConfigError, config_to_flat
from common.losses import BACKGROUND, FOREGROUND, UNCERTAIN
from common.privacy import (
    MECHANISMS_PER_RELEASE,
    add_noise,
    clip_factors,
    count_sensitivity,
    group_sq_norms,
    max_group_size,
    noise_generator,
)
from common.records import Payload, make
from server.aggregation import initial_centroids
from server.state import load_state
from server.workflow import FederationError, Protocol, run_federation
from tests.conftest import tiny_config
from tests.fakes import InProcessGrid, synthetic_node_configs

pytestmark = pytest.mark.usefixtures("single_thread", "task_identity")

# ---------------------------------------------------------------------------- common.privacy


def test_max_group_size_and_count_sensitivity():
    assert max_group_size(8, 4) == 11  # a last chunk of 3 < K_min joins a chunk of 8
    # 1 group, <= 11 images, <= 11 x 4 tokens
    assert count_sensitivity(11, 4) == pytest.approx(np.sqrt(1 + 121 + 44**2))


def test_group_sq_norms_equals_a_hand_computation():
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    group = torch.tensor([0, 0, 1, 1])
    assign = torch.tensor([0, 0, 0, 1])
    # group 0: cluster 0 sum (3, 0) -> 9; group 1: cluster 0 (0, 3) -> 9, cluster 1 (1, 1) -> 2
    assert group_sq_norms(2, [(x, group, assign, 2)]).tolist() == [9.0, 11.0]
    # Blocks add: the same block twice doubles every norm.
    assert group_sq_norms(2, [(x, group, assign, 2)] * 2).tolist() == [18.0, 22.0]


def test_clip_factors_bound_every_contribution_and_leave_small_ones():
    sq = torch.tensor([0.25, 4.0, 100.0, 0.0])
    factors = clip_factors(sq, clip=1.0)
    assert factors.tolist() == pytest.approx([1.0, 0.5, 0.1, 1.0])
    assert (factors * sq.sqrt() <= 1.0 + 1e-6).all()


def test_add_noise_has_the_declared_std_and_keeps_counts_non_negative_integers():
    stats = {"s": np.zeros((200, 100), np.float32), "n": np.full((200, 100), 5, np.int64), "other": np.ones(3, np.float32)}
    out = add_noise(stats, ["s"], ["n"], 2.0, 3.0, torch.Generator().manual_seed(0))
    assert out["s"].dtype == np.float32 and out["n"].dtype == np.int64
    assert out["s"].std() == pytest.approx(2.0, rel=0.03)
    assert (out["n"] >= 0).all() and out["n"].std() == pytest.approx(3.0, rel=0.05)  # clamped at 0 only far in the tail
    assert np.array_equal(out["other"], stats["other"])  # not a DP key: untouched
    assert np.array_equal(stats["s"], np.zeros((200, 100), np.float32))  # the input is not modified


def test_noise_generator_is_fresh_each_time():
    a, b = torch.randn(8, generator=noise_generator()), torch.randn(8, generator=noise_generator())
    assert not torch.equal(a, b)


# --------------------------------------------------------------- sensitivity of a DP release


def synthetic_knowledge(seed: int = 0, groups_per_class: int = 4, size: int = 3, tokens: int = 4, dims=None) -> SiteKnowledge:
    """A site's local view: groups of ``size`` images per class, random prototypes and tokens
    with foreground / background / uncertain labels (no model needed)."""
    g = torch.Generator().manual_seed(seed)
    c = dims.C
    labels = torch.arange(c).repeat_interleave(groups_per_class)
    sizes = torch.full((len(labels),), size, dtype=torch.long)
    images = int(sizes.sum())
    choice = torch.tensor([FOREGROUND, BACKGROUND, UNCERTAIN])
    return SiteKnowledge(
        prototypes=torch.randn(len(labels), dims.M, dims.D, generator=g) * 3,
        group_labels=labels,
        group_sizes=sizes,
        tokens=torch.randn(images, tokens, dims.D, generator=g) * 2,
        token_labels=choice[torch.randint(0, 3, (images, tokens), generator=g)],
        classes=labels.repeat_interleave(sizes),
    )


def without_group(knowledge: SiteKnowledge, group: int) -> SiteKnowledge:
    """The neighbouring dataset: the same site without one group (and its images)."""
    start = int(knowledge.group_sizes[:group].sum())
    stop = start + int(knowledge.group_sizes[group])
    keep_groups = torch.arange(len(knowledge.group_labels)) != group
    keep_images = torch.ones(len(knowledge.classes), dtype=torch.bool)
    keep_images[start:stop] = False
    return SiteKnowledge(
        knowledge.prototypes[keep_groups],
        knowledge.group_labels[keep_groups],
        knowledge.group_sizes[keep_groups],
        knowledge.tokens[keep_images],
        knowledge.token_labels[keep_images],
        knowledge.classes[keep_images],
    )


def release_parts(stats: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    floats = np.concatenate([stats[k].astype(np.float64).ravel() for k in DP_FLOAT_KEYS])
    counts = np.concatenate([stats[k].astype(np.float64).ravel() for k in DP_COUNT_KEYS])
    return floats, counts


DP_CFG = tiny_config(privacy__noise_multiplier=1e-9, privacy__clip=5.0, pagkd__group_size=3, pagkd__min_group_size=2)
DP_DIMS = dims_of(DP_CFG)


def _centroids(knowledge, cfg, phase):
    if phase == "seeds":
        return None
    seeds = _statistics(
        knowledge, DP_DIMS, dataclasses.replace(cfg, privacy=dataclasses.replace(cfg.privacy, noise_multiplier=0.0)), None, 3
    )
    return initial_centroids(
        [{f"{k.replace('_sum', '_seed_sum').replace('_count', '_seed_count')}": v for k, v in seeds.items()}], DP_DIMS, seed=3
    )


@pytest.mark.parametrize("phase", ["seeds", "lloyd"])
def test_removing_one_group_moves_a_dp_release_by_at_most_its_bounds(phase):
    knowledge = synthetic_knowledge(dims=DP_DIMS)
    centroids = _centroids(knowledge, DP_CFG, phase)
    quiet = torch.Generator().manual_seed(1)  # noise of std ~1e-9: the release is the clipped sums
    full_floats, full_counts = release_parts(_statistics(knowledge, DP_DIMS, DP_CFG, centroids, 3, noise=quiet))
    bound = count_sensitivity(max_group_size(3, 2), knowledge.tokens.shape[1])
    moves = []
    for group in range(len(knowledge.group_labels)):
        floats, counts = release_parts(_statistics(without_group(knowledge, group), DP_DIMS, DP_CFG, centroids, 3, noise=quiet))
        moves.append(np.linalg.norm(full_floats - floats))
        assert np.linalg.norm(full_floats - floats) <= DP_CFG.privacy.clip * (1 + 1e-5) + 1e-4, group
        assert np.linalg.norm(full_counts - counts) <= bound + 1e-6, group
    # The data are large enough that clipping binds: some groups move the release by the full clip.
    assert max(moves) == pytest.approx(DP_CFG.privacy.clip, rel=1e-3)


def test_without_dp_one_group_moves_the_release_far_beyond_the_clip():
    """The check above can fail: the plain statistics have no bounded contribution."""
    plain = dataclasses.replace(DP_CFG, privacy=dataclasses.replace(DP_CFG.privacy, noise_multiplier=0.0))
    knowledge = synthetic_knowledge(dims=DP_DIMS)
    centroids = _centroids(knowledge, DP_CFG, "lloyd")
    full, _ = release_parts(_statistics(knowledge, DP_DIMS, plain, centroids, 3))
    moved, _ = release_parts(_statistics(without_group(knowledge, 0), DP_DIMS, plain, centroids, 3))
    assert np.linalg.norm(full - moved) > 3 * DP_CFG.privacy.clip


def test_a_dp_release_is_noisy_with_the_declared_std_and_differs_every_time():
    cfg = dataclasses.replace(DP_CFG, privacy=dataclasses.replace(DP_CFG.privacy, noise_multiplier=2.0))
    knowledge = synthetic_knowledge(dims=DP_DIMS)
    centroids = _centroids(knowledge, DP_CFG, "lloyd")
    clean, _ = release_parts(_statistics(knowledge, DP_DIMS, DP_CFG, centroids, 3, noise=torch.Generator().manual_seed(0)))
    first, counts = release_parts(_statistics(knowledge, DP_DIMS, cfg, centroids, 3))
    second, _ = release_parts(_statistics(knowledge, DP_DIMS, cfg, centroids, 3))
    assert (first - clean).std() == pytest.approx(2.0 * cfg.privacy.clip, rel=0.1)
    assert not np.allclose(first, second)  # OS entropy: the same seed does not give the same noise
    assert (counts >= 0).all() and np.array_equal(counts, np.rint(counts))


# ---------------------------------------------------------------------------------- accounting


def protocol(cfg, tmp_path, faults=None) -> tuple[Protocol, InProcessGrid]:
    grid = InProcessGrid(synthetic_node_configs(cfg.data.nbi_sites + cfg.data.wli_sites), config_to_flat(cfg), faults)
    return Protocol(grid, cfg, tmp_path / "run"), grid


def test_epsilon_is_flowers_rdp_accountant_over_every_release_and_falls_with_noise(tmp_path):
    from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    eps = []
    for sigma in (0.5, 1.0, 2.0):
        proto, _ = protocol(tiny_config(privacy__noise_multiplier=sigma), tmp_path)
        proto.ledger.releases = {"nbi-0": 3, "nbi-1": 6}
        report = proto.privacy_spent()
        accountant = RdpAccountant(PrivacyConfig(1e-5, 1, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION))
        accountant.compose(GaussianPrivacyEvent(sigma, 1, 1), count=6 * MECHANISMS_PER_RELEASE)
        assert report["epsilon"]["nbi-1"] == pytest.approx(accountant.get_epsilon(1e-5))
        assert report["epsilon"]["nbi-0"] < report["epsilon"]["nbi-1"] == report["max_epsilon"]
        eps.append(report["max_epsilon"])
    assert eps[0] > eps[1] > eps[2]
    proto, _ = protocol(tiny_config(), tmp_path)
    proto.ledger.releases = {"nbi-0": 3}
    assert proto.privacy_spent()["max_epsilon"] is None  # no noise, no guarantee claimed


def test_a_dp_run_reports_each_sites_releases_and_epsilon(tmp_path):
    cfg = tiny_config(privacy__noise_multiplier=1.0)
    grid = InProcessGrid(synthetic_node_configs(4), config_to_flat(cfg))
    summary = run_federation(grid, cfg, tmp_path / "dp")
    privacy = summary.privacy
    expected = 1 + cfg.pagkd.kmeans_iters  # seeds + one release per Lloyd step
    assert privacy["releases"] == {"nbi-0": expected, "nbi-1": expected}
    assert 0 < privacy["max_epsilon"] < float("inf")
    assert json.loads((tmp_path / "dp" / "metrics.json").read_text())["privacy"]["max_epsilon"] == pytest.approx(
        privacy["max_epsilon"]
    )
    # The noisy counts stay usable counts on the wire.
    sums = [from_recorddict(m.content) for m in grid.received if from_recorddict(m.content).kind == "knowledge.sums"]
    assert sums and all((p.arrays["image_count"] >= 0).all() for p in sums)


def test_releases_of_an_interrupted_refresh_stay_counted_after_resume(tmp_path):
    """A crash in the middle of a bank refresh: the sites did release their seeds and a Lloyd
    step; the resumed run rebuilds the bank, and epsilon counts both attempts."""
    from tests.test_workflow import Crash, crash_on

    cfg = tiny_config(privacy__noise_multiplier=1.0)
    run_dir = tmp_path / "run"
    first = InProcessGrid(synthetic_node_configs(4), config_to_flat(cfg))
    first.faults[102] = crash_on(first, MESSAGE_TYPE["knowledge.stats"], nth=2)  # nbi-1's 2nd Lloyd step
    with pytest.raises(Crash):
        run_federation(first, cfg, run_dir)
    summary = run_federation(InProcessGrid(synthetic_node_configs(4), config_to_flat(cfg)), cfg, run_dir)
    per_refresh = 1 + cfg.pagkd.kmeans_iters
    # Asked in the crashed refresh: seeds + 2 steps for nbi-0 (asked before nbi-1 crashed the server), seeds + 2 for nbi-1.
    assert summary.privacy["releases"] == {"nbi-0": 2 * per_refresh, "nbi-1": 2 * per_refresh}
    # The audit log keeps the crashed refresh's messages: every knowledge message of both attempts.
    egress = json.loads((run_dir / "egress.json").read_text())
    seeds = [e for e in egress if e["kind"] == "knowledge.seeds"]
    assert len(seeds) == 4 and len(egress) == sum(e["messages"] for e in summary.bytes.values())


# ------------------------------------------------------------------ secure aggregation, protocol

SECURE = dict(data__nbi_sites=3, data__wli_sites=1, fed__student_rounds=1, pagkd__kmeans_iters=2)
NBI2 = 103  # node ids 101-103 are nbi-0..2, 104 is wli-0


@pytest.fixture(scope="module")
def secure_pair(single_thread, tmp_path_factory):
    """The same tiny run (3 NBI sites) with and without secure aggregation."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0
    out = {}
    for secure in (False, True):
        cfg = tiny_config(**SECURE, privacy__secure_aggregation=secure)
        grid = InProcessGrid(synthetic_node_configs(4), config_to_flat(cfg))
        run_dir = tmp_path_factory.mktemp("secure") / "run"
        run_federation(grid, cfg, run_dir)
        out[secure] = {"grid": grid, "bank": load_state(run_dir)[0]["bank"]}
    return out


def payloads(messages) -> list[Payload]:
    return [from_recorddict(m.content) for m in messages if m.has_content()]


def test_the_masked_bank_equals_the_plain_bank(secure_pair):
    plain, masked = secure_pair[False]["bank"], secure_pair[True]["bank"]
    assert set(plain) == set(masked)
    for key in plain:
        if plain[key].dtype.kind == "i":
            assert np.array_equal(plain[key], masked[key]), key
        else:  # fixed point: 3 sites x 2**-25 rounding, then float32
            np.testing.assert_allclose(masked[key], plain[key], rtol=1e-6, atol=3 * 2.0**-24, err_msg=key)
    assert plain["image_count"].sum() > 0


def test_the_server_receives_only_uniform_looking_masked_sums(secure_pair):
    secure = payloads(secure_pair[True]["grid"].received)
    plain = payloads(secure_pair[False]["grid"].received)
    assert not [p for p in secure if p.kind == "knowledge.sums"], "a plain sum reached the server"
    masked = [p for p in secure if p.kind == "knowledge.masked"]
    assert len(masked) == 3 * SECURE["pagkd__kmeans_iters"]
    plain_sums = [p for p in plain if p.kind == "knowledge.sums"]
    for reply, clear in zip(masked, plain_sums):
        values = np.concatenate([a.ravel() for a in reply.arrays.values()])
        bits = np.unpackbits(values.view(np.uint8))
        assert abs(bits.mean() - 0.5) < 0.01, bits.mean()
        encoded = np.concatenate([a.ravel() for a in secagg.encode_fixed_point(clear.arrays).values()])
        assert abs(np.corrcoef(values.astype(np.float64), encoded.astype(np.float64))[0, 1]) < 0.1


def test_the_peer_roster_lists_every_nbi_site_with_its_own_key(secure_pair):
    grid = secure_pair[True]["grid"]
    sent = [(m.metadata.dst_node_id, from_recorddict(m.content)) for m in grid.sent]
    keys = {}
    for m in grid.received:
        p = from_recorddict(m.content)
        if p.kind == "knowledge.seeds":
            keys[m.metadata.src_node_id] = p.config["public-key"]
    assert len(set(keys.values())) == 3 and all(len(k) == 64 for k in keys.values())
    rosters = [json.loads(p.config["peers"]) for _, p in sent if p.kind == "knowledge.stats"]
    assert rosters and all(r == {"nbi-0": keys[101], "nbi-1": keys[102], "nbi-2": keys[103]} for r in rosters)


def _drop_first_stats(grid_ref: dict, node_id: int):
    """A fault hook: the site answers nothing to its first knowledge.stats (it dropped out)."""
    seen = {"stats": 0}

    def fault(node: int, message: Message):
        if message.metadata.message_type == MESSAGE_TYPE["knowledge.stats"]:
            seen["stats"] += 1
            if seen["stats"] == 1:
                return None
        return grid_ref["grid"].deliver(node, message)

    return fault


def test_a_site_dropping_out_of_a_masked_sum_is_restarted_around(tmp_path, caplog):
    banks = {}
    for secure in (False, True):
        cfg = tiny_config(**SECURE, privacy__secure_aggregation=secure)
        ref: dict = {}
        grid = InProcessGrid(synthetic_node_configs(4), config_to_flat(cfg), {NBI2: _drop_first_stats(ref, NBI2)})
        ref["grid"] = grid
        with caplog.at_level(logging.WARNING, logger="fedpagkd.server"):
            run_federation(grid, cfg, tmp_path / f"drop-{secure}")
        banks[secure] = load_state(tmp_path / f"drop-{secure}")[0]["bank"]
        stats = [p for p in payloads(grid.sent) if p.kind == "knowledge.stats"]
        if secure:
            # attempt 0 with all three, then attempt 1 without nbi-2, then the second Lloyd step.
            assert [(p.config["iteration"], p.config["attempt"]) for p in stats] == [(1, 0)] * 3 + [(1, 1)] * 2 + [(2, 0)] * 2
            assert set(json.loads(stats[3].config["peers"])) == {"nbi-0", "nbi-1"}
    assert "restarting the masked sum without 'nbi-2'" in caplog.text
    # The same sites end up in the bank either way: it decodes to the plain run's bank.
    for key in banks[False]:
        np.testing.assert_allclose(banks[True][key], banks[False][key], rtol=1e-6, atol=3 * 2.0**-24, err_msg=key)


def test_secure_aggregation_with_a_single_nbi_site_stops_with_the_reason(tmp_path):
    cfg = tiny_config(data__nbi_sites=1, data__wli_sites=1, privacy__secure_aggregation=True)
    with pytest.raises(FederationError, match=r"secure aggregation needs >= 2 NBI sites"):
        run_federation(InProcessGrid(synthetic_node_configs(2), config_to_flat(cfg)), cfg, tmp_path / "one")


def test_secure_aggregation_with_robust_rules_is_a_config_error():
    with pytest.raises(ConfigError, match="privacy.secure_aggregation"):
        tiny_config(privacy__secure_aggregation=True, fed__aggregation="median")
    with pytest.raises(ConfigError, match="privacy.secure_aggregation"):
        tiny_config(privacy__secure_aggregation=True, fed__clip_ratio=2.0)


# ------------------------------------------------------------------ a site's own checks (handlers)


@pytest.fixture(scope="module")
def seeded_site(single_thread):
    """nbi-0 after a knowledge.seed under secure aggregation: its context holds its key."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 0
    cfg = tiny_config(privacy__secure_aggregation=True)
    dims = dims_of(cfg)
    torch.manual_seed(0)
    proto, _ = protocol(cfg, __import__("pathlib").Path("/nonexistent"))
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(),
        run_config=config_to_flat(cfg),
    )
    request = make(
        "knowledge.seed",
        dims,
        config={"round": 1, "seed": 5, "evaluate": ""},
        weights={"teacher": proto.run_state.teacher, "head": proto.run_state.head},
    )
    seeds = ask(request, context)
    return {
        "cfg": cfg,
        "dims": dims,
        "context": context,
        "key": seeds.config["public-key"],
        "centroids": initial_centroids([seeds.arrays], dims, seed=5),
    }


def ask(request: Payload, context: Context) -> Payload:
    message = Message(to_recorddict(request), dst_node_id=7, message_type=MESSAGE_TYPE[request.kind])
    return from_recorddict(client_app(message, context).content)


def stats(site, peers: dict[str, str], attempt: int) -> Payload:
    config = {"round": 1, "seed": 5, "iteration": 1, "peers": json.dumps(peers), "attempt": attempt}
    return ask(make("knowledge.stats", site["dims"], arrays=site["centroids"], config=config), site["context"])


def test_a_site_masks_once_per_step_and_refuses_a_replay(seeded_site):
    other = secagg.public_key_hex(secagg.generate_keypair())
    first = stats(seeded_site, {"nbi-0": seeded_site["key"], "nbi-1": other}, attempt=0)
    assert first.kind == "knowledge.masked"
    replay = stats(seeded_site, {"nbi-0": seeded_site["key"], "nbi-9": other}, attempt=0)
    assert replay.kind == "error" and "already masked a sum for step 1|1|0" in replay.config["reason"]
    assert stats(seeded_site, {"nbi-0": seeded_site["key"], "nbi-1": other}, attempt=1).kind == "knowledge.masked"


def test_a_site_refuses_a_roster_that_misstates_its_own_key(seeded_site):
    fake = secagg.public_key_hex(secagg.generate_keypair())
    reply = stats(seeded_site, {"nbi-0": fake, "nbi-1": secagg.public_key_hex(secagg.generate_keypair())}, attempt=5)
    assert reply.kind == "error" and "own public key" in reply.config["reason"] and reply.config["site-name"] == "nbi-0"
    alone = stats(seeded_site, {"nbi-0": seeded_site["key"]}, attempt=6)
    assert alone.kind == "error" and "nbi-0" in alone.config["reason"]
