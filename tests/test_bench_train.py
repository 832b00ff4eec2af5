"""The training benchmark's bookkeeping (no timing thresholds)."""

import pytest

from flowalign.bench.train import format_table, summarize


def _run(algo, seed, final_reward, div0=0.2, div1=0.1):
    evals = [{"iteration": 0, "images_seen": 0, "reward": 0.1, "diversity": div0},
             {"iteration": 2, "images_seen": 64, "reward": final_reward, "diversity": div1}]
    metrics = [{"time_sampling": 2.0, "time_reward": 0.1, "time_critic": 0.5, "time_actor": 1.0, "time_update": 1.6}] * 2
    return {"algorithm": algo, "seed": seed, "evals": evals, "metrics": metrics}


def test_summarize_means_over_seeds_and_curves():
    s = summarize([_run("acflow", 0, 0.5), _run("acflow", 1, 0.7), _run("orw", 0, 0.4)])
    a = s["acflow"]
    assert a["reward"]["mean"] == pytest.approx(0.6) and a["reward"]["std"] == pytest.approx(0.1)
    assert a["diversity_ratio_to_base"] == pytest.approx(0.5)
    assert [p["images_seen"] for p in a["curve"]] == [0, 64]
    assert a["curve"][1]["reward"] == pytest.approx(0.6)
    assert a["seconds_per_iteration"]["time_sampling"] == pytest.approx(2.0)
    assert s["orw"]["seeds"] == [0]
    table = format_table({"algorithms": s})
    assert "| acflow | " in table and "0.600 ± 0.100" in table
