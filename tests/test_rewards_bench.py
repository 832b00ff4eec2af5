"""``flowalign bench rewards`` computes what it reports (no timing thresholds here)."""

from __future__ import annotations

import json
import math

from flowalign import cli
from flowalign.bench.rewards import run_benchmark


def test_benchmark_results_are_consistent_on_tiny_inputs():
    results = run_benchmark(["jpeg_compressibility", "clipscore"], batch_size=4, image_size=32, repeats=2)
    assert results["batch_size"] == 4 and results["target_overhead"] == 0.05 and results["wrapper_cost_s"] > 0
    assert set(results["rewards"]) == {"jpeg_compressibility", "clipscore"}
    for r in results["rewards"].values():
        assert r["max_abs_difference"] == 0.0  # the wrapper returns exactly the model's scores
        assert r["images_per_s"] == 4 / r["wrapper_s"]
        assert math.isclose(r["overhead"], r["wrapper_s"] / r["direct_s"] - 1)
        assert math.isclose(r["overhead_from_wrapper_cost"], results["wrapper_cost_s"] / r["direct_s"])


def test_bench_cli_prints_json(capsys):
    assert (
        cli.main(
            [
                "bench",
                "rewards",
                "--json",
                "--rewards",
                "shapes",
                "--batch-size",
                "3",
                "--image-size",
                "32",
                "--repeats",
                "1",
            ]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert list(results["rewards"]) == ["shapes"] and results["rewards"]["shapes"]["images_per_s"] > 0
