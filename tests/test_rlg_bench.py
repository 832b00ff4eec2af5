"""``flowalign bench rlg`` runs and its variants compute what they claim (no timing thresholds here).

Run: nice -n 10 env OMP_NUM_THREADS=1 python -m pytest tests/test_rlg_bench.py -q -x
"""

from __future__ import annotations

import argparse

import pytest

from flowalign.bench import rlg as bench_rlg


def test_bench_rlg_report():
    parser = argparse.ArgumentParser()
    bench_rlg.add_arguments(parser)
    args = parser.parse_args(
        ["--repeats", "1", "--steps", "2", "--batch", "2", "--lora-rank", "8", "--device", "cpu", "--sweep", "0", "1", "2",
         "--compile", "--compile-backend", "aot_eager"]  # aot_eager: the compiled pipeline's graphs in seconds
    )
    report = bench_rlg.run_benchmark(args)
    results = report["results"]
    assert set(results) == {
        "stock_cfg",
        "stock_cfg_finetuned",
        "rlg_exact",
        "rlg_exact_two_pass",
        "rlg_lora_scaled",
        "rlg_shared_uncond",
        "reference_loop",
        "rlg_sweep",
        "reference_loop_sweep",
        "rlg_sde",
        "rlg_exact_compiled",
        "rlg_sde_compiled",
    }
    assert report["exact_mode"] == "exact_batched"
    assert results["stock_cfg"]["ratio_vs_stock_cfg"] == 1.0
    for name, r in results.items():
        assert r["median_s"] > 0 and r["ratio_vs_stock_cfg"] > 0
        assert r["exact"] == (name not in ("rlg_lora_scaled", "rlg_shared_uncond"))
    # The reference-style loop (PeftModel + disable_adapter, SDE step at noise 0) and every exact mode agree with
    # rlg_exact; the approximations do not.
    for name in ("rlg_exact_two_pass", "reference_loop"):
        assert results[name]["max_abs_diff_vs_rlg_exact"] <= 1e-3  # float noise of other batchings, through CFG
    for name in ("rlg_lora_scaled", "rlg_shared_uncond"):
        assert results[name]["max_abs_diff_vs_rlg_exact"] > 1e-5
    assert [
        results[n]["evaluations_per_step"] for n in ("stock_cfg", "rlg_exact", "rlg_lora_scaled", "rlg_shared_uncond")
    ] == [2, 4, 2, 3]
    # The sweep: one call for 0, 1, 2 (2 + 2 + 4 evaluations per step) against the reference loop run at each scale.
    assert report["sweep"] == [0.0, 1.0, 2.0]
    assert results["rlg_sweep"]["evaluations_per_step"] == 8
    assert results["reference_loop_sweep"]["evaluations_per_step"] == 12
    assert results["rlg_sweep"]["max_abs_diff_vs_reference_loop_sweep"] <= 1e-3
    ratio = results["rlg_sweep"]["median_s"] / results["reference_loop_sweep"]["median_s"]
    assert report["sweep_vs_reference"] == pytest.approx(ratio, rel=1e-2, abs=2e-3)
    assert set(report["targets"]) == {
        "rlg_exact_le_2.05x_stock_cfg",
        "rlg_exact_faster_than_reference_loop",
        "sweep_vs_reference_le_0.7",
    }
    assert report["targets"]["sweep_vs_reference_le_0.7"] == (report["sweep_vs_reference"] <= 0.7)
    # --compile: the compiled pipeline draws the eager pipeline's images (Euler and SDE, the same noise); its first
    # call compiled (graphs of the tiny transformer: seconds, against a fraction of a second per call).
    compiled = report["compiled"]
    assert compiled["backend"] == "aot_eager"
    assert set(compiled["pairs"]) == {"rlg_exact_compiled", "rlg_sde_compiled"}
    assert [compiled["pairs"][n]["eager"] for n in ("rlg_exact_compiled", "rlg_sde_compiled")] == ["rlg_exact", "rlg_sde"]
    for pair in compiled["pairs"].values():
        assert pair["max_abs_diff"] <= 1e-4
        assert pair["speed_ratio_eager_over_compiled"] > 0
    assert compiled["pairs"]["rlg_exact_compiled"]["compile_s"] > compiled["pairs"]["rlg_exact_compiled"]["compiled_median_s"]
