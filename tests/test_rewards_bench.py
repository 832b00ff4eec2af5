"""``flowalign bench rewards`` computes what it reports: its figures against hand-computed values from a fake clock
(no timing thresholds here)."""

from __future__ import annotations

import json

import pytest
import torch
from flowalign.rewards import Reward

from flowalign import cli, rewards
from flowalign.bench import rewards as bench_rewards
from flowalign.bench.rewards import run_benchmark


class Clocked(Reward):
    """A reward whose model costs a known time on the fake clock: call k advances it by ``costs[k]`` seconds and
    returns ``values[k]`` for every image (0 once the lists run out)."""

    name = "clocked"

    def __init__(self, clock, costs, values):
        super().__init__()
        self.clock, self.costs, self.values, self.calls = clock, list(costs), list(values), 0

    def score_chunk(self, images, prompts):
        k, self.calls = self.calls, self.calls + 1
        self.clock.advance(self.costs[k] if k < len(self.costs) else 0.0)
        return torch.full((images.shape[0],), self.values[k] if k < len(self.values) else 0.0)


def test_benchmark_figures_are_medians_of_the_timed_calls(monkeypatch, fake_clock):
    """Calls 0 and 1 are the untimed warm-up (wrapper, direct); then wrapper / direct alternate. Every clock read
    adds 1 ms, so a timed call measures its cost + 1 ms."""
    fake_clock.tick = 0.001
    monkeypatch.setattr(bench_rewards, "time", fake_clock)
    wrapper_costs, direct_costs = [0.2, 0.5, 0.1], [0.1, 0.15, 0.4]
    costs = [100.0, 100.0] + [c for pair in zip(wrapper_costs, direct_costs) for c in pair]
    reward = Clocked(fake_clock, costs, values=[1.0, 1.25])  # the warm-up calls differ by 0.25
    rewards.register("test_clocked", reward, overwrite=True)

    results = run_benchmark(["test_clocked"], batch_size=4, image_size=32, repeats=3)
    r = results["rewards"]["test_clocked"]
    assert reward.calls == 2 + 2 * 3
    # medians of the measured 0.201 / 0.501 / 0.101 and 0.101 / 0.151 / 0.401 s (means would be 0.268 and 0.218)
    assert r["wrapper_s"] == pytest.approx(0.201) and r["direct_s"] == pytest.approx(0.151)
    assert r["images_per_s"] == pytest.approx(19.900497512)  # 4 images / 0.201 s
    assert r["overhead"] == pytest.approx(0.331125828)  # 0.201 / 0.151 - 1
    assert r["overhead_of_fastest"] == pytest.approx(0.0, abs=1e-9)  # 0.101 / 0.101 - 1
    assert r["max_abs_difference"] == pytest.approx(0.25)  # |1.0 - 1.25| on the warm-up calls
    # the wrapper around a free model costs only the clock's own 1 ms per timed call
    assert results["wrapper_cost_s"] == pytest.approx(0.001)
    assert r["overhead_from_wrapper_cost"] == pytest.approx(0.006622517)  # 0.001 / 0.151
    assert (results["batch_size"], results["image_size"], results["repeats"], results["target_overhead"]) == (
        4, 32, 3, 0.05)


def test_the_wrapper_returns_exactly_the_models_scores():
    results = run_benchmark(["jpeg_compressibility", "clipscore"], batch_size=4, image_size=32, repeats=1)
    assert list(results["rewards"]) == ["jpeg_compressibility", "clipscore"]
    for r in results["rewards"].values():
        assert r["max_abs_difference"] == 0.0


def test_bench_cli_prints_the_figures_as_json(capsys, monkeypatch, fake_clock):
    """On the fake clock the shapes verifier costs nothing: every timed call measures the clock's 2 ms."""
    fake_clock.tick = 0.002
    monkeypatch.setattr(bench_rewards, "time", fake_clock)
    args = ["bench", "rewards", "--json", "--rewards", "shapes", "--batch-size", "3", "--image-size", "32",
            "--repeats", "1"]
    assert cli.main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert list(results["rewards"]) == ["shapes"] and results["batch_size"] == 3
    shapes = results["rewards"]["shapes"]
    assert shapes["images_per_s"] == pytest.approx(1500.0)  # 3 images / 0.002 s
    assert shapes["overhead"] == pytest.approx(0.0, abs=1e-9) and shapes["max_abs_difference"] == 0.0
