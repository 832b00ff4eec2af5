"""The frontier bench: pairing and summarising on constructed results (hand values), then --quick end to end."""

import json
import math

import pytest

from flowalign.bench.train import (
    _parse_sets,
    format_table,
    plot_frontier,
    run_measures,
    run_name,
    summarize,
)


def _eval(rewards, binary, kls, diversity=0.2, w2=0.0):
    means = {"reward": sum(rewards) / len(rewards), "eval_shapes_binary": sum(binary) / len(binary),
             "diversity": diversity, "w2_to_reference": w2, "kl_to_reference": sum(kls) / len(kls)}
    return {**means, "per_image": {"reward": rewards, "eval_shapes_binary": binary, "kl_to_reference": kls}}


def test_run_measures_pairs_images_hand_values():
    control = _eval([0.0, 1.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], diversity=0.2)
    run = _eval([1.0, 1.0, 1.5], [0.0, 1.0, 1.0], [0.5, 1.0, 3.0], diversity=0.1, w2=0.7)
    m = run_measures(control, run)
    # d = [1, 0, 1]: mean 2/3, sample var ((1/3)^2 + (2/3)^2 + (1/3)^2) / 2 = 1/3, se = sqrt(1/3) / sqrt(3) = 1/3
    assert m["reward_gain"] == pytest.approx(2 / 3) and m["reward_gain_se"] == pytest.approx(1 / 3)
    # d = [0, 0, 1]: mean 1/3, sample var (1/9 + 1/9 + 4/9) / 2 = 1/3, se = 1/3
    assert m["eval_shapes_binary_gain"] == pytest.approx(1 / 3) and m["eval_shapes_binary_gain_se"] == pytest.approx(1 / 3)
    assert m["kl_measured"] == pytest.approx(1.5)
    assert m["diversity_ratio"] == pytest.approx(0.5) and m["w2_to_reference"] == pytest.approx(0.7)
    same = run_measures(control, control)
    assert (same["reward_gain"], same["reward_gain_se"], same["kl_measured"], same["diversity_ratio"]) == (0, 0, 0, 1)


def test_run_measures_refuses_unpaired_evaluations():
    control = _eval([0.0, 1.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="3 images in the run but 2 in the control"):
        run_measures(_eval([0.0, 1.0], [0.0, 1.0], [0.0, 0.0]), control)
    with pytest.raises(ValueError, match="per_image"):
        run_measures({"reward": 0.5, "diversity": 0.2}, control)


def _run(method, kl, seed, gain, se, kl_measured, ratio, binary_gain=0.0):
    return {"method": method, "kl_coef": kl, "seed": seed, "reward_gain": gain, "reward_gain_se": se,
            "eval_shapes_binary_gain": binary_gain, "eval_shapes_binary_gain_se": 0.01,
            "kl_measured": kl_measured, "diversity_ratio": ratio, "w2_to_reference": 1.0}


def test_summarize_means_and_standard_errors_over_seeds():
    runs = [_run("grpo", 1.0, 0, 0.0, 0.02, 0.5, 1.0), _run("acflow", 0.1, 0, 0.1, 0.03, 2.0, 0.9, binary_gain=0.2),
            _run("acflow", 0.1, 1, 0.3, 0.05, 4.0, 0.7, binary_gain=0.4), _run("acflow", 0.0, 0, 0.5, 0.04, 9.0, 0.5)]
    rows = summarize(runs)
    assert [(r["method"], r["kl_coef"]) for r in rows] == [("grpo", 1.0), ("acflow", 0.0), ("acflow", 0.1)]
    a = rows[2]
    assert a["seeds"] == [0, 1] and a["n_seeds"] == 2
    # two seeds: mean 0.2, sample sd sqrt(0.02), SE = sd / sqrt(2) = 0.1
    assert a["reward_gain"] == pytest.approx(0.2) and a["reward_gain_se_seeds"] == pytest.approx(0.1)
    assert a["reward_gain_paired_se"] == pytest.approx(0.04)
    assert a["kl_measured"] == pytest.approx(3.0) and a["kl_measured_se_seeds"] == pytest.approx(1.0)
    assert a["diversity_ratio"] == pytest.approx(0.8) and a["diversity_ratio_se_seeds"] == pytest.approx(0.1)
    assert a["eval_shapes_binary_gain"] == pytest.approx(0.3)
    assert math.isnan(rows[0]["reward_gain_se_seeds"])  # one seed: no spread over seeds
    table = format_table(rows, reward="shapes")
    assert "| acflow | 0.1 | 2 | 0.200 ± 0.100 | 0.040 | 3.0000 ± 1.0000 | 0.80 ± 0.10 | 0.300 ± 0.100 |" in table
    assert "| grpo | 1 | 1 | 0.000 | 0.020 |" in table


def test_plot_frontier_writes_a_png(tmp_path):
    runs = [_run("acflow", k, s, 0.1 * k + 0.01 * s, 0.02, k * 3 + s, 1 - 0.1 * k) for k in (0.0, 1.0) for s in (0, 1)]
    plot_frontier(summarize(runs), tmp_path / "frontier.png", reward="shapes")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_name_and_set_parsing():
    assert run_name("grpo", 0.03, 1) == "grpo-kl0.03-seed1" and run_name("orw", 0.0, 0) == "orw-kl0-seed0"
    assert _parse_sets(["learning_rate=0", "eval_prompts=4"]) == ({"learning_rate": 0.0, "eval_prompts": 4}, {})
    # METHOD:KEY=VALUE reaches that method's runs only; the typed value as for unscoped keys
    assert _parse_sets(["eval_prompts=4", "acflow:inner_epochs=1", "acflow:minibatch_size=64", "grpo:grpo_clip_range=0.1"],
                       ["acflow", "grpo"]) == ({"eval_prompts": 4}, {"acflow": {"inner_epochs": 1, "minibatch_size": 64},
                                                                      "grpo": {"grpo_clip_range": 0.1}})
    with pytest.raises(SystemExit, match="use --kl"):
        _parse_sets(["kl_coef=0.1"])
    with pytest.raises(SystemExit, match="use --kl"):
        _parse_sets(["acflow:kl_coef=0.1"])
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        _parse_sets(["learning_rate"])
    with pytest.raises(SystemExit, match="METHOD:KEY=VALUE"):
        _parse_sets([":learning_rate=1"])
    with pytest.raises(SystemExit, match="'acflw' is not one of this sweep's --methods"):
        _parse_sets(["acflw:learning_rate=1"], ["acflow", "orw"])


# ---------------------------------------------------------------------------------------------- end to end
def test_quick_sweep_end_to_end(tmp_path, capsys):
    from flowalign.cli import main

    out = tmp_path / "frontier"
    assert main(["bench", "train", "--quick", "--out", str(out), "--json"]) == 0
    data = json.loads((out / "frontier.json").read_text())
    assert {"reward", "command", "config", "wall_seconds", "control", "runs", "summary"} <= set(data)
    assert data["reward"] == "shapes" and "--quick" in data["command"]
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert [(r["method"], r["kl_coef"]) for r in data["runs"]] == [("acflow", 0.0), ("acflow", 1.0),
                                                                  ("grpo", 0.0), ("grpo", 1.0)]
    fields = {"reward_gain", "reward_gain_se", "eval_shapes_binary_gain", "eval_jpeg_compressibility_gain_se",
              "diversity_ratio", "kl_measured", "w2_to_reference", "images", "train_seconds", "method", "kl_coef",
              "seed"}
    for r in data["runs"]:
        assert fields <= set(r)
        assert r["images"] == 2 * 2 * 4  # 2 iterations x 2 prompts x 4 images
        assert r["kl_measured"] > 0  # every run moved away from the base model
    assert data["control"]["kl_to_reference"] == 0.0  # the fresh trainer is the base model
    assert len(data["summary"]) == 4
    # acflow's points against grpo's frontier, at equal KL then at equal diversity, one row per acflow point
    assert [(r["method"], r["other"], r["axis"]) for r in data["comparison"]] == (
        [("acflow", "grpo", "kl_measured")] * 2 + [("acflow", "grpo", "diversity_ratio")] * 2)
    assert all(r["verdict"] in ("above", "level", "below", "outside") for r in data["comparison"])
    assert data["runs_wall_seconds"] >= sum(r["train_seconds"] for r in data["runs"]) > 0
    # a re-run reads the finished runs back instead of retraining them: identical runs
    first = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/result.json")}
    assert len(first) == 5  # 4 runs and the control
    assert main(["bench", "train", "--quick", "--out", str(out), "--json"]) == 0
    assert {p.parent.name: p.stat().st_mtime_ns for p in out.glob("*/result.json")} == first
    assert json.loads((out / "frontier.json").read_text())["runs"] == data["runs"]
    # --report-only trains nothing: a run that has not finished is listed as missing, the others are reported
    (out / "grpo-kl1-seed0" / "result.json").unlink()
    assert main(["bench", "train", "--quick", "--out", str(out), "--report-only"]) == 0
    partial = json.loads((out / "frontier.json").read_text())
    assert partial["missing_runs"] == ["grpo-kl1-seed0"] and partial["runs"] == data["runs"][:3]
    assert not (out / "grpo-kl1-seed0" / "result.json").exists()


def test_quick_sweep_without_updates_is_the_control(tmp_path):
    from flowalign.cli import main

    out = tmp_path / "lr0"
    assert main(["bench", "train", "--quick", "--methods", "grpo", "orw", "--kl", "0.1", "--out", str(out),
                 "--set", "learning_rate=0", "--set", "grpo:grpo_learning_rate=0"]) == 0
    # the unscoped override reaches every run and the control, the grpo-scoped one grpo's run only
    overrides = {p.parent.name: json.loads(p.read_text())["overrides"] for p in out.glob("*/result.json")}
    assert overrides["control"]["learning_rate"] == 0.0 and "grpo_learning_rate" not in overrides["control"]
    assert overrides["grpo-kl0.1-seed0"]["grpo_learning_rate"] == 0.0
    assert overrides["orw-kl0.1-seed0"]["learning_rate"] == 0.0 and "grpo_learning_rate" not in overrides["orw-kl0.1-seed0"]
    for r in json.loads((out / "frontier.json").read_text())["runs"]:
        # no update: the same images as the control, so every paired difference is exactly zero
        assert (r["reward_gain"], r["reward_gain_se"], r["eval_shapes_binary_gain"]) == (0.0, 0.0, 0.0)
        assert r["kl_measured"] == 0.0 and r["diversity_ratio"] == 1.0


def _point(method, kl, gain, se_seeds, kl_measured, div, paired=0.01):
    return {"method": method, "kl_coef": kl, "reward_gain": gain, "reward_gain_se_seeds": se_seeds,
            "reward_gain_paired_se": paired, "kl_measured": kl_measured, "diversity_ratio": div}


def test_compare_at_equal_interpolates_and_judges_by_hand():
    from flowalign.bench.train import compare_at_equal, format_comparison

    summary = [_point("grpo", 1.0, 0.1, 0.01, 1.0, 0.9), _point("grpo", 0.1, 0.3, 0.03, 4.0, 0.5),
               _point("acflow", 0.5, 0.5, 0.04, 2.0, 0.7),   # at KL 2: halfway in log KL between 1 and 4
               _point("acflow", 0.3, 0.21, float("nan"), 2.0, 0.6, paired=0.02),  # one seed: the paired SE
               _point("acflow", 5.0, 0.0, 0.01, 0.5, 0.99)]  # below grpo's measured range
    rows = compare_at_equal(summary, "acflow", "grpo", "kl_measured")
    first = rows[0]
    assert first["other_gain"] == pytest.approx(0.2) and first["other_se"] == pytest.approx(0.02)
    assert first["difference"] == pytest.approx(0.3) and first["difference_se"] == pytest.approx(math.hypot(0.04, 0.02))
    assert first["verdict"] == "above" and first["se_kind"] == "seeds"
    # 0.21 vs 0.2 with se sqrt(0.02^2 + 0.02^2): noise
    assert rows[1]["se_kind"] == "paired" and rows[1]["verdict"] == "level"
    assert rows[1]["z"] == pytest.approx(0.01 / math.hypot(0.02, 0.02))
    assert rows[2]["verdict"] == "outside" and "other_gain" not in rows[2]
    # equal diversity: linear in the ratio; acflow 0.5 at 0.7 against grpo's 0.2 (halfway between 0.9 and 0.5)
    div = compare_at_equal(summary, "acflow", "grpo", "diversity_ratio")
    assert div[0]["other_gain"] == pytest.approx(0.2) and div[0]["verdict"] == "above"
    # acflow 0.21 at diversity 0.6: grpo 0.25 there, -0.04 with se hypot(0.02, 0.025) -> level
    assert div[1]["other_gain"] == pytest.approx(0.25) and div[1]["verdict"] == "level"
    below = compare_at_equal([*summary[:2], _point("acflow", 0.5, 0.05, 0.01, 2.0, 0.7)], "acflow", "grpo",
                             "kl_measured")
    assert below[0]["verdict"] == "below" and below[0]["z"] < -3
    table = format_comparison(rows)
    assert "| acflow | 0.5 | grpo | KL 2 | 0.500 ± 0.040 | 0.200 ± 0.020 |" in table and "outside its range" in table
    with pytest.raises(ValueError, match="axis"):
        compare_at_equal(summary, "acflow", "grpo", "reward")


def test_compare_must_name_a_swept_method_before_anything_trains(tmp_path):
    from flowalign.cli import main

    with pytest.raises(SystemExit, match="--compare 'orw' is not one of --methods"):
        main(["bench", "train", "--quick", "--compare", "orw", "--out", str(tmp_path / "f")])
    assert not (tmp_path / "f").exists()  # refused before the control or any run
