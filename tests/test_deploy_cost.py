"""benchmarks/deploy_cost.py's arithmetic on hand-made exchange timings (the runs themselves are the
benchmark: ``python -m benchmarks.deploy_cost``)."""

from __future__ import annotations

import pytest

from benchmarks.deploy_cost import arm, exchanges, ratios, table


def timing(phase: str, kind: str, wall: float, compute: dict[str, float]) -> dict:
    return {"phase": phase, "kind": kind, "round": 1, "sites": len(compute), "wall_s": wall, "compute_s": compute}


DEPLOYMENT = {
    "timing": [
        timing("student", "student.train", 30.0, {"wli-0": 4.0, "wli-1": 6.0}),
        timing("student", "student.train", 20.0, {"wli-0": 2.0, "wli-1": 4.0}),
        timing("evaluation", "evaluate", 12.0, {}),
    ]
}
SIMULATION = {"timing": [timing("student", "student.train", 8.0, {"wli-0": 5.0}), timing("evaluation", "evaluate", 3.0, {})]}


def test_exchanges_are_averaged_per_kind_with_the_slowest_site_as_compute():
    rows = exchanges(DEPLOYMENT)
    assert rows["student:student.train"] == {"exchanges": 2, "wall_s": 25.0, "slowest_compute_s": 5.0, "overhead_s": 20.0}
    assert rows["evaluation:evaluate"] == {"exchanges": 1, "wall_s": 12.0, "slowest_compute_s": 0.0, "overhead_s": 12.0}


def test_ratios_are_deployment_over_simulation():
    dep, sim = arm(100.0, DEPLOYMENT), arm(40.0, SIMULATION)
    result = ratios(dep, sim)
    assert result["wall"] == pytest.approx(2.5)
    assert result["exchange_wall"] == pytest.approx(62.0 / 11.0)
    assert result["per_exchange"] == {
        "evaluation:evaluate": pytest.approx(4.0),
        "student:student.train": pytest.approx(25.0 / 8.0),
    }
    lines = table({"deployment": dep, "simulation": sim, "ratio": result}).splitlines()
    assert lines[1].split()[-3:] == ["100.0", "40.0", "2.50"]
    assert lines[-1].split()[0] == "student:student.train" and lines[-1].endswith("3.12")
