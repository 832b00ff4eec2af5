"""``flowalign bench rlg`` runs, its variants compute what they claim, and its figures are the costs it measures.

The figures are checked on a fake clock (conftest ``fake_clock``) that a hook on the SD3 transformer advances by the
rows of every forward, so each timing is the number of rows the models processed and each ratio is a count from the
RLG cost model (no timing thresholds here).

Run: nice -n 10 env OMP_NUM_THREADS=1 python -m pytest tests/test_rlg_bench.py -q -x
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from flowalign.bench import rlg as bench_rlg

# batch 2, 2 steps, CFG: the stock pipeline forwards 2 * 2 = 4 rows ([uncond; cond]) per step, 8 per call
BATCH, STEPS = 2, 2


def _args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_rlg.add_arguments(parser)
    common = ["--repeats", "1", "--steps", str(STEPS), "--batch", str(BATCH), "--lora-rank", "8", "--device", "cpu"]
    return parser.parse_args([*common, *extra])


def test_bench_rlg_report():
    # aot_eager: the compiled pipeline's graphs in seconds
    args = _args("--sweep", "0", "1", "2", "--compile", "--compile-backend", "aot_eager")
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
    assert set(report["targets"]) == {
        "rlg_exact_le_2.05x_stock_cfg",
        "rlg_exact_faster_than_reference_loop",
        "sweep_vs_reference_le_0.7",
    }
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


def test_bench_rlg_stock_row_is_the_base_model():
    """``stock_cfg`` is the stock pipeline on the base model: its images are a fresh stock ``StableDiffusion3Pipeline``
    of the base components (no LoRA anywhere), not the fine-tuned model's (RLG at w = 1). Before the fix the stock
    pipeline shared its transformer with the RLG pipeline, whose LoRA stays active outside RLG calls."""
    args = _args("--sweep", "0", "1")
    images: dict[str, np.ndarray] = {}
    bench_rlg.run_benchmark(args, images=images)
    pipe, _ = bench_rlg._tiny_pipeline("cpu", torch.float32)  # the base components, as the bench loads them
    pipe.set_progress_bar_config(disable=True)
    call = bench_rlg._call_kwargs(args, pipe, "cpu", torch.float32)
    stock = bench_rlg._as_numpy(pipe(**call, generator=torch.Generator("cpu").manual_seed(0)))
    at_w0, at_w1 = images["rlg_sweep"][:BATCH], images["rlg_sweep"][BATCH:]  # the sweep's blocks, w = 0 and w = 1
    assert np.abs(images["stock_cfg"] - stock).max() <= 1e-6
    assert np.abs(at_w0 - stock).max() <= 1e-5  # RLG at w = 0 is the base model too
    assert np.abs(images["stock_cfg_finetuned"] - at_w1).max() <= 1e-5  # the fine-tuned row is RLG at w = 1
    assert np.abs(images["stock_cfg"] - at_w1).max() > 1e-2  # and the stock row is not


@pytest.fixture
def rows_clock(monkeypatch, fake_clock):
    """The bench's clock, advanced by ``hidden_states.shape[0]`` at every forward of the SD3 transformer: a timing
    is the number of rows the models processed in it.

    The hook goes on the tiny pipeline's transformer as the bench loads it; the bench's other transformers (the
    stock fine-tuned pipeline's, the reference loop's inside ``PeftModel``) are ``copy.deepcopy`` of it and carry
    the hook with them. The RLG pipeline shares the module itself.
    """
    monkeypatch.setattr(bench_rlg, "time", fake_clock)
    load = bench_rlg._tiny_pipeline

    def count_rows(module, args, kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        fake_clock.advance(hidden_states.shape[0])  # 1 "second" per row

    def load_hooked(device, dtype):
        pipe, model = load(device, dtype)
        pipe.transformer.register_forward_pre_hook(count_rows, with_kwargs=True)
        return pipe, model

    monkeypatch.setattr(bench_rlg, "_tiny_pipeline", load_hooked)
    return fake_clock


# Rows per call (batch 2, 2 steps, CFG: 4 rows [uncond; cond] per step), at w = 1.5:
#   stock_cfg, stock_cfg_finetuned: 4 rows / step                                          -> 8
#   rlg_exact (exact_batched): one forward on [x; x], LoRA off / on: 8 rows / step          -> 16
#   rlg_exact_two_pass: base on x, fine-tuned on x: 4 + 4 rows / step                       -> 16
#   rlg_lora_scaled: one forward on x with the LoRA scaled by w: 4 rows / step              -> 8
#   rlg_shared_uncond: base on [x_u; x_c] + fine-tuned on x_c, one forward: 6 rows / step   -> 12
#   reference_loop: PeftModel on x with the LoRA on, then off: 4 + 4 rows / step            -> 16
STOCK_RELATIVE = {
    "stock_cfg": 8,
    "stock_cfg_finetuned": 8,
    "rlg_exact": 16,
    "rlg_exact_two_pass": 16,
    "rlg_lora_scaled": 8,
    "rlg_shared_uncond": 12,
    "reference_loop": 16,
}


@pytest.mark.parametrize(
    "sweep, sweep_rows, reference_rows, reference_ratio, sweep_vs_reference, sweep_target",
    [
        # K = 3 scales: 12 CFG rows per step. Step 0 (the same x_T at every scale): base on the 4 rows of w = 0 / 2,
        # fine-tuned on the 4 of w = 1 / 2 -> 8; step 1: base on the 8 rows of w = 0 / 2, fine-tuned on the 8 of
        # w = 1 / 2 -> 16; 8 + 16 = 24. Reference: 16 rows per scale (both models at every w), 3 scales -> 48 = 6x
        # stock; 24 / 48 = 0.5 <= 0.7.
        (["0", "1", "2"], 24, 48, 6.0, 0.5, True),
        # K = 2 scales, both models at each: step 0 base 4 + fine-tuned 4 = 8, step 1 base 8 + fine-tuned 8 = 16 -> 24;
        # reference 2 x 16 = 32 = 4x stock; 24 / 32 = 0.75 > 0.7.
        (["0.5", "1.5"], 24, 32, 4.0, 0.75, False),
    ],
)
def test_bench_rlg_times_are_the_rows_each_variant_runs(
    rows_clock, sweep, sweep_rows, reference_rows, reference_ratio, sweep_vs_reference, sweep_target
):
    report = bench_rlg.run_benchmark(_args("--sweep", *sweep))
    results = report["results"]
    assert "compiled" not in report and "rlg_sde" not in results
    expected = {**STOCK_RELATIVE, "rlg_sweep": sweep_rows, "reference_loop_sweep": reference_rows}
    assert {name: r["times_s"] for name, r in results.items()} == {name: [rows] for name, rows in expected.items()}
    assert {name: (r["median_s"], r["min_s"]) for name, r in results.items()} == {
        name: (rows, rows) for name, rows in expected.items()
    }
    # ratio_vs_stock_cfg = rows / 8: exact modes and the reference loop run both models on the CFG batch (2.0),
    # lora_scaled one model (1.0), shared_uncond the base on both halves + the fine-tuned model on the cond half (1.5)
    assert {name: r["ratio_vs_stock_cfg"] for name, r in results.items()} == {
        "stock_cfg": 1.0,
        "stock_cfg_finetuned": 1.0,
        "rlg_exact": 2.0,
        "rlg_exact_two_pass": 2.0,
        "rlg_lora_scaled": 1.0,
        "rlg_shared_uncond": 1.5,
        "reference_loop": 2.0,
        "rlg_sweep": 3.0,  # 24 / 8
        "reference_loop_sweep": reference_ratio,
    }
    assert report["sweep_vs_reference"] == sweep_vs_reference
    assert report["targets"] == {
        "rlg_exact_le_2.05x_stock_cfg": True,  # 2.0 <= 2.05
        "rlg_exact_faster_than_reference_loop": False,  # 16 rows, as many as the reference loop: not faster
        "sweep_vs_reference_le_0.7": sweep_target,
    }
