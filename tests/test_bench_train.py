"""The frontier bench: pairing and summarising on constructed results (hand values), then --quick end to end."""

import json
import math

import pytest

from flowalign.bench.train import (
    _parse_sets,
    arm_overrides,
    compare_at_equal,
    decide,
    format_decision,
    format_table,
    parse_methods,
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



def test_run_measures_distance_axes_hand_values_and_absent():
    control = _eval([0.0, 1.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0])
    run = _eval([1.0, 1.0, 1.5], [0.0, 1.0, 1.0], [0.5, 1.0, 3.0])
    # before the evaluation reports them: NaN, not an error
    m = run_measures(control, run)
    assert math.isnan(m["coupling_distance"]) and math.isnan(m["path_kl_se"])
    run["per_image"].update(coupling_distance=[1.0, 2.0, 6.0], path_kl=[0.5, 0.5, 2.0])
    m = run_measures(control, run)
    # coupling [1, 2, 6]: mean 3, sample var (4 + 1 + 9) / 2 = 7, SE sqrt(7 / 3)
    assert m["coupling_distance"] == pytest.approx(3.0) and m["coupling_distance_se"] == pytest.approx(math.sqrt(7 / 3))
    # path KL [0.5, 0.5, 2]: mean 1, sample var (0.25 + 0.25 + 1) / 2 = 0.75, SE 0.5
    assert m["path_kl"] == pytest.approx(1.0) and m["path_kl_se"] == pytest.approx(0.5)
    assert m["kl_measured"] == pytest.approx(1.5)  # the window KL unchanged beside them


def test_arms_parse_and_scope_overrides():
    assert parse_methods(["acflow", "grpo"]) == {"acflow": "acflow", "grpo": "grpo"}  # plain names as before
    arms = parse_methods(["acflow_v0=acflow", "acflow_v1 = acflow", "grpo"])
    assert arms == {"acflow_v0": "acflow", "acflow_v1": "acflow", "grpo": "grpo"} and next(iter(arms)) == "acflow_v0"
    assert run_name("acflow_v0", 0.15, 0) == "acflow_v0-kl0.15-seed0"
    common, scoped = _parse_sets(["eval_prompts=4", "acflow:inner_epochs=1", "acflow:critic=latent",
                                  "acflow_v1:critic=zero", "acflow_v1:inner_epochs=2", "grpo:grpo_clip_range=0.1"],
                                 arms)
    assert common == {"eval_prompts": 4}
    per_arm = arm_overrides(arms, scoped)
    # METHOD: reaches every arm of that method, NAME: its arm only and wins over METHOD:
    assert per_arm == {"acflow_v0": {"inner_epochs": 1, "critic": "latent"},
                       "acflow_v1": {"inner_epochs": 2, "critic": "zero"},
                       "grpo": {"grpo_clip_range": 0.1}}
    with pytest.raises(SystemExit, match="'acflow_v2' is not one of this sweep's --methods"):
        _parse_sets(["acflow_v2:critic=zero"], arms)
    with pytest.raises(SystemExit, match="names the arm 'acflow_v0' twice"):
        parse_methods(["acflow_v0=acflow", "acflow_v0=grpo"])
    with pytest.raises(SystemExit, match="'grpo' is a method's own name"):
        parse_methods(["grpo=acflow"])
    with pytest.raises(SystemExit, match="arm name 'a/b'"):
        parse_methods(["a/b=acflow"])
    with pytest.raises(SystemExit, match="METHOD or NAME=METHOD"):
        parse_methods(["v0="])


def _arm_point(arm, kl, gain, se, **axes):
    """A summary row of arm ``arm`` (method acflow) with gain ± se over seeds and the given axis values."""
    row = {"arm": arm, "method": "acflow", "kl_coef": kl, "reward_gain": gain, "reward_gain_se_seeds": se,
           "reward_gain_paired_se": 0.5, "kl_measured": float("nan"), "coupling_distance": float("nan"),
           "path_kl": float("nan"), "diversity_ratio": float("nan")}
    return {**row, **axes}


def test_equal_distance_interpolates_linearly_by_hand():
    # the baseline at (d 1, g 0.1 ± 0.01) and (d 3, g 0.3 ± 0.03); the arm at d 2 with 0.5 ± 0.01
    summary = [_arm_point("B", 1.0, 0.1, 0.01, coupling_distance=1.0), _arm_point("B", 0.1, 0.3, 0.03, coupling_distance=3.0),
               _arm_point("A", 0.5, 0.5, 0.01, coupling_distance=2.0), _arm_point("A", 0.05, 0.9, 0.01, coupling_distance=3.5),
               _arm_point("A", 5.0, 0.0, 0.01, coupling_distance=0.5)]
    rows = compare_at_equal(summary, "A", "B", "coupling_distance")
    # halfway linearly: B's 0.2 ± 0.02 at d 2; difference 0.3 ± sqrt(0.01^2 + 0.02^2)
    assert rows[0]["other_gain"] == pytest.approx(0.2) and rows[0]["other_se"] == pytest.approx(0.02)
    assert rows[0]["difference"] == pytest.approx(0.3) and rows[0]["difference_se"] == pytest.approx(math.hypot(0.01, 0.02))
    assert rows[0]["verdict"] == "above" and rows[0]["arm"] == "A" and rows[0]["method"] == "acflow"
    # beyond B's range on either side: no extrapolation
    assert [r["verdict"] for r in rows[1:]] == ["outside", "outside"] and "difference" not in rows[1]
    # the window KL is interpolated in log KL by default (the historical comparison), linearly when asked
    kl = [_arm_point("B", 1.0, 0.1, 0.01, kl_measured=1.0), _arm_point("B", 0.1, 0.3, 0.01, kl_measured=4.0),
          _arm_point("A", 0.5, 0.2, 0.01, kl_measured=2.0)]
    assert compare_at_equal(kl, "A", "B", "kl_measured")[0]["other_gain"] == pytest.approx(0.2)  # halfway in log
    assert compare_at_equal(kl, "A", "B", "kl_measured", log_x=False)[0]["other_gain"] == pytest.approx(0.1 + 0.2 / 3)
    # an axis not measured for the arm: outside, not an error
    assert compare_at_equal(summary, "A", "B", "path_kl")[0]["verdict"] == "outside"


def _decision_summary(a_gain, a_div=0.7, path=2.0):
    """B at distance 1 and 3 on all three axes with gains 0.1 and 0.3 (SE 0.01); A at distance 2 (path KL ``path``)."""
    b = {"kl_measured": 1.0, "coupling_distance": 1.0, "path_kl": 1.0, "diversity_ratio": 0.9}
    b3 = {"kl_measured": 3.0, "coupling_distance": 3.0, "path_kl": 3.0, "diversity_ratio": 0.5}
    return [_arm_point("B", 1.0, 0.1, 0.01, **b), _arm_point("B", 0.1, 0.3, 0.01, **b3),
            _arm_point("A", 0.5, a_gain, 0.01, kl_measured=2.0, coupling_distance=2.0, path_kl=path,
                       diversity_ratio=a_div)]


def test_decision_rule_by_hand():
    helps = decide(_decision_summary(0.5), "A", "B")
    # B's 0.2 at distance 2 on every axis, A 0.5: +0.3 with SE hypot(0.01, 0.01) on all three axes
    assert helps["axes"] == ["kl_measured", "coupling_distance", "path_kl"] and helps["missing_axes"] == []
    diffs = [r["difference"] for r in helps["rows"] if r["axis"] != "diversity_ratio"]
    assert diffs == pytest.approx([0.3, 0.3, 0.3])
    assert helps["points"] == [{"kl_coef": 0.5, "beats": ["kl_measured", "coupling_distance", "path_kl"],
                                "beaten": [], "diversity": "above", "helps": True, "hurts": False}]
    assert helps["verdict"] == "helps"
    # beats on 2 axes only (path KL 3.5 is outside B's range): still helps
    assert decide(_decision_summary(0.5, path=3.5), "A", "B")["verdict"] == "helps"
    # beats on the window KL only (path KL 3.5 and coupling 0.5 outside B's range): no difference
    one = _decision_summary(0.5, path=3.5)
    one[2]["coupling_distance"] = 0.5
    assert decide(one, "A", "B")["verdict"] == "no difference"
    # A worse by > 3 SE at equal diversity: at diversity 0.52 B has 0.29, A 0.21 -> -0.08 with SE 0.014: not helps
    worse_div = decide(_decision_summary(0.21, a_div=0.52), "A", "B")
    assert worse_div["points"][0]["diversity"] == "below"
    # 0.21 vs 0.2 at distance 2: level on every axis -> no difference
    assert worse_div["verdict"] == "no difference"
    # 0.25: +0.05 > 3 x 0.014 on every distance axis, but -0.05 against B's 0.3 at diversity 0.5: not helps
    strong_but_less_diverse = _decision_summary(0.25, a_div=0.5)
    d = decide(strong_but_less_diverse, "A", "B")
    assert d["points"][0]["beats"] == ["kl_measured", "coupling_distance", "path_kl"]
    assert d["points"][0]["diversity"] == "below" and d["verdict"] == "no difference"
    # B beats A by > 3 SE on >= 2 axes: hurts
    hurts = decide(_decision_summary(0.1), "A", "B")
    assert hurts["points"][0]["beaten"] == ["kl_measured", "coupling_distance", "path_kl"]
    assert hurts["verdict"] == "hurts"
    # only the window KL measured (before the evaluation reports the other two): the rule cannot decide
    only_kl = _decision_summary(0.5)
    for row in only_kl:
        row["coupling_distance"] = row["path_kl"] = float("nan")
    undecided = decide(only_kl, "A", "B")
    assert undecided["axes"] == ["kl_measured"] and undecided["verdict"] == "undecided"
    assert undecided["missing_axes"] == ["coupling_distance", "path_kl"]
    table = format_decision(helps)
    assert "| 0.5 | 0.300 ± 0.014 (z 21.2, above) | 0.300 ± 0.014 (z 21.2, above) |" in table
    assert "verdict: helps" in table
    with pytest.raises(ValueError, match="no summary rows for the arm 'C'"):
        decide(_decision_summary(0.5), "A", "C")


def test_summary_and_table_carry_arms_and_distance_axes():
    runs = [{**_run("acflow", 0.1, s, 0.1 * (s + 1), 0.02, 1.0 + s, 0.9), "arm": "acflow_v0",
             "coupling_distance": 2.0 + 2 * s, "path_kl": 0.5} for s in (0, 1)]
    runs.append({**_run("acflow", 0.1, 0, 0.0, 0.02, 0.5, 1.0), "arm": "acflow_v1"})  # no coupling / path KL yet
    rows = summarize(runs)
    assert [(r["arm"], r["method"]) for r in rows] == [("acflow_v0", "acflow"), ("acflow_v1", "acflow")]
    # coupling 2 and 4 over two seeds: mean 3, SE 1
    assert rows[0]["coupling_distance"] == pytest.approx(3.0) and rows[0]["coupling_distance_se_seeds"] == pytest.approx(1.0)
    assert rows[0]["path_kl"] == pytest.approx(0.5) and math.isnan(rows[1]["coupling_distance"])
    table = format_table(rows, reward="shapes")
    assert "coupling (sq. latent norm)" in table and "path KL (nats/image)" in table
    assert "| acflow_v0 (acflow) | 0.1 | 2 | 0.150 ± 0.050 | 0.020 | 1.5000 ± 0.5000 | 3.0000 ± 1.0000 | 0.5000 ± 0.0000 |" in table
    assert "| acflow_v1 (acflow) | 0.1 | 1 | 0.000 | 0.020 | 0.5000 | n/a | n/a |" in table


def _colour_pixels(image, rgb, tol=40):
    """How many pixels of ``image`` (H x W x 3 uint8) lie within ``tol`` of colour ``rgb`` in every channel."""
    import numpy as np

    return int((np.abs(image.astype(int) - np.array(rgb)).max(axis=-1) <= tol).sum())


def test_plot_frontier_draws_one_panel_per_distance_axis(tmp_path):
    import numpy as np
    from PIL import Image

    # two arms apart on every panel (v1: 0.3 more gain, the same distances and diversity)
    runs = [{**_run("acflow", k, s, 0.1 * k + 0.01 * s + 0.3 * j, 0.02, k * 3 + s + 0.5, 1 - 0.1 * k), "arm": arm,
             "coupling_distance": 10 * k + s + 1, "path_kl": 2 * k + 0.5 * s + 0.1}
            for j, arm in enumerate(("acflow_v0", "acflow_v1")) for k in (0.5, 1.0, 2.0) for s in (0, 1)]
    panels = plot_frontier(summarize(runs), tmp_path / "frontier.png", reward="shapes")
    assert panels == ["kl_measured", "coupling_distance", "path_kl", "diversity_ratio"]
    image = np.asarray(Image.open(tmp_path / "frontier.png").convert("RGB"))
    assert image.shape[0] > 500 and image.shape[1] > 500
    # 2 x 2 panels: each quadrant holds the first arm's curve in matplotlib's first colour (C0 = #1f77b4)
    h, w = image.shape[0] // 2, image.shape[1] // 2
    quadrants = [image[:h, :w], image[:h, w:], image[h:, :w], image[h:, w:]]
    assert all(_colour_pixels(q, (0x1F, 0x77, 0xB4)) > 50 for q in quadrants), [
        _colour_pixels(q, (0x1F, 0x77, 0xB4)) for q in quadrants]
    # ... and the second arm's in C1 (#ff7f0e)
    assert all(_colour_pixels(q, (0xFF, 0x7F, 0x0E)) > 50 for q in quadrants)
    # only the window KL measured: that panel and the diversity one
    for r in runs:
        r.pop("coupling_distance"), r.pop("path_kl")
    assert plot_frontier(summarize(runs), tmp_path / "two.png") == ["kl_measured", "diversity_ratio"]
    two = np.asarray(Image.open(tmp_path / "two.png").convert("RGB"))
    assert two.shape[1] > 1.5 * two.shape[0]  # one row of two panels


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


def test_quick_sweep_with_variant_arms_names_runs_and_scopes_settings(tmp_path):
    from flowalign.cli import main

    out = tmp_path / "arms"
    assert main(["bench", "train", "--quick", "--methods", "v0=grpo", "v1=grpo", "--kl", "0.1", "--out", str(out),
                 "--set", "learning_rate=0", "--set", "grpo:grpo_learning_rate=0", "--set", "grpo:grpo_clip_range=0.3",
                 "--set", "v1:grpo_clip_range=0.1", "--compare", "v1", "--baseline", "v0"]) == 0
    records = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/result.json")}
    assert set(records) == {"control", "v0-kl0.1-seed0", "v1-kl0.1-seed0"}  # run folders named by the arm
    v0, v1 = records["v0-kl0.1-seed0"], records["v1-kl0.1-seed0"]
    assert (v0["arm"], v0["method"], v1["arm"], v1["method"]) == ("v0", "grpo", "v1", "grpo")
    # grpo: reaches both arms of grpo, v1: only v1 and wins there
    assert (v0["overrides"]["grpo_clip_range"], v1["overrides"]["grpo_clip_range"]) == (0.3, 0.1)
    assert v0["overrides"]["grpo_learning_rate"] == v1["overrides"]["grpo_learning_rate"] == 0.0
    assert "grpo_clip_range" not in records["control"]["overrides"]
    data = json.loads((out / "frontier.json").read_text())
    assert [(r["name"], r["arm"], r["method"]) for r in data["runs"]] == [("v0-kl0.1-seed0", "v0", "grpo"),
                                                                        ("v1-kl0.1-seed0", "v1", "grpo")]
    assert [(r["arm"], r["method"]) for r in data["summary"]] == [("v0", "grpo"), ("v1", "grpo")]
    assert "--methods v0=grpo v1=grpo" in data["command"] and "--compare v1 --baseline v0" in data["command"]
    decision = data["decision"]
    assert (decision["arm"], decision["baseline"]) == ("v1", "v0") and "kl_measured" in decision["axes"]
    # no update: both arms are the base model, so every measured difference is exactly zero and nothing is decided
    compared = [r for r in decision["rows"] if r["verdict"] != "outside"]
    assert compared and all(r["difference"] == 0.0 for r in compared)
    assert decision["verdict"] == ("undecided" if len(decision["axes"]) < 2 else "no difference")


def test_baseline_must_be_another_swept_arm_before_anything_trains(tmp_path):
    from flowalign.cli import main

    with pytest.raises(SystemExit, match="--baseline 'orw' must be another arm"):
        main(["bench", "train", "--quick", "--baseline", "orw", "--out", str(tmp_path / "f")])
    with pytest.raises(SystemExit, match="--baseline 'acflow' must be another arm"):
        main(["bench", "train", "--quick", "--methods", "acflow", "grpo", "--baseline", "acflow",
              "--out", str(tmp_path / "f")])
    with pytest.raises(SystemExit, match="'grpo' is a method's own name"):
        main(["bench", "train", "--quick", "--methods", "grpo=acflow", "--out", str(tmp_path / "f")])
    assert not (tmp_path / "f").exists()  # refused before the control or any run
