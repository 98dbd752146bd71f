"""End to end: a real ``flwr run`` simulation (local SuperLink, Ray, virtual SuperNodes) through
:func:`server.launch.simulate`, which reads the run's real final status back.

Slow (a cold SuperLink + Ray start is ~30-60 s on 2 cores), so marked ``slow``; CI runs them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from server import launch
from tests.conftest import TINY

pytestmark = pytest.mark.slow

# Enough training for the WLI student to beat chance clearly, still a few minutes on 2 cores.
LEARN: dict[str, Any] = {
    **TINY,
    "fed.num_bins": 200,
}


@pytest.fixture()
def ports(monkeypatch) -> list[int]:
    """Every port the launcher picks (the SuperLink's first), to check nothing is left on them."""
    picked: list[int] = []
    original = launch.free_port

    def recording() -> int:
        port = original()
        picked.append(port)
        return port

    monkeypatch.setattr(launch, "free_port", recording)
    yield picked
    for port in picked:
        assert launch._superlink_pids(port) == [], f"a flower-superlink is still serving port {port}"


def _run_config(tmp_path, name: str, **overrides: Any) -> dict[str, Any]:
    return {**LEARN, "fed.run_dir": str(tmp_path / "runs"), "fed.run_name": name, **overrides}


def test_simulation_completes_and_the_student_learns(tmp_path, ports):
    run_config = _run_config(tmp_path, "e2e")
    result = launch.simulate(run_config, num_supernodes=4, cpus_per_client=1, work_dir=tmp_path / "work", timeout_s=480, stream=False)
    assert result.status == "finished:completed", result.details
    assert result.run_dir == tmp_path / "runs" / "e2e"
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert [e["round"] for e in metrics["student"]] == list(range(1, run_config["fed.student_rounds"] + 1))
    assert sorted(s["name"] for s in metrics["sites"]) == ["nbi-0", "nbi-1", "wli-0", "wli-1"]
    final = metrics["final"]
    print(f"e2e simulation: {result.wall_s:.0f} s, pooled WLI AUC per round "
          f"{[round(e['pooled']['auc'], 3) for e in metrics['evaluation'] if e['model'] == 'student']}")
    assert final["num_examples"] == 2 * run_config["data.test_per_site"]
    assert final["auc"] > AUC_FLOOR, f"the WLI student did not learn: pooled AUC {final['auc']:.3f}"
    # Egress audit: statistics messages carry no per-image dimension; groups are >= K_min.
    egress = json.loads((result.run_dir / "egress.json").read_text())
    assert egress and {e["kind"] for e in egress} >= {"knowledge.sums", "student.update", "evaluation"}
    k_min = run_config["pagkd.min_group_size"]
    sizes = {run_config["data.train_per_site"], run_config["data.test_per_site"]}
    declared = {3, 1, run_config["model.num_queries"], run_config["model.embed_dim"], run_config["pagkd.codebook_size"], 200}
    for entry in egress:
        for name, spec in entry["arrays"].items():
            leaking = [d for d in spec["shape"] if d in sizes and d not in declared]
            assert not leaking, (entry["kind"], name, spec["shape"])
        if entry["kind"] == "knowledge.sums":
            assert entry["config"]["smallest-group"] >= k_min, entry["config"]
    assert sum(e["messages"] for e in metrics["bytes"].values()) == len(egress)


def test_a_failing_run_is_reported_as_a_failure(tmp_path, ports):
    run_config = _run_config(tmp_path, "no-nbi", **{"data.nbi_sites": 0, "data.wli_sites": 2})
    with pytest.raises(launch.SimulationError) as err:
        launch.simulate(run_config, num_supernodes=2, cpus_per_client=1, work_dir=tmp_path / "work", timeout_s=300, stream=False)
    message = str(err.value)
    assert "finished:failed" in message
    assert "NBI: 0 of 1 needed" in message, message
    assert not (tmp_path / "runs" / "no-nbi" / "metrics.json").exists()


AUC_FLOOR = 0.6
