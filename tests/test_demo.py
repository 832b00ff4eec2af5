"""`flowalign demo --quick`: the files it promises, and the same numbers for the same seed."""

import csv

import pytest
import torch

from flowalign.demo import demo, describe_reading, trade_off_reading


@pytest.mark.slow
def test_quick_demo_writes_report_and_is_reproducible(tmp_path):
    first = demo(out=str(tmp_path / "a"), quick=True, seed=0, scales=[0.0, 1.0, 2.0])
    out = first["out"]
    for name in ("grid.png", "plot.png", "results.csv", "report.md", "settings.json"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert "![grid](grid.png)" in report and "![plot](plot.png)" in report
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [float(r["rlg_scale"]) for r in rows] == [0.0, 1.0, 2.0]
    for r in rows:
        assert 0.0 <= float(r["reward (verifier, dense)"]) <= 1.0
        assert float(r["diversity"]) > 0.0
    # w changes the images (the LoRA moved), and the same seed gives the same numbers.
    assert rows[0]["diversity"] != rows[2]["diversity"] or rows[0]["JPEG size (kB)"] != rows[2]["JPEG size (kB)"]
    # the report reads the trend from the same numbers as the table
    reading = first["reading"]
    assert reading["non_decreasing"] == (float(rows[1]["reward (verifier, dense)"]) >= float(rows[0]["reward (verifier, dense)"]))
    assert reading["delta"] == pytest.approx(float(rows[1]["reward (verifier, dense)"]) - float(rows[0]["reward (verifier, dense)"]), abs=1e-6)
    assert reading["n"] == 12 and describe_reading(reading) in report
    second = demo(out=str(tmp_path / "b"), quick=True, seed=0, scales=[0.0, 1.0, 2.0])
    assert second["rows"] == first["rows"]


def test_demo_training_settings_are_the_shipped_config_with_fewer_iterations():
    """The demo fine-tunes like samples/configs/acflow_shapes.yaml: every key it sets agrees, except the
    schedule (iterations), the evaluation and the checkpoints, which the demo does itself."""
    from pathlib import Path

    import yaml

    from flowalign.demo import DEMO_TRAINING

    shipped = yaml.safe_load((Path(__file__).parents[1] / "samples" / "configs" / "acflow_shapes.yaml").read_text())
    own = {"iterations", "eval_prompts", "checkpoint_every"}
    differ = {k: (v, shipped[k]) for k, v in DEMO_TRAINING.items() if k not in own and k in shipped and shipped[k] != v}
    assert not differ, f"demo settings differ from the shipped config: {differ}"
    assert DEMO_TRAINING["iterations"] <= shipped["iterations"]


def test_trade_off_reading_pairs_the_images_and_states_the_noise():
    flat = {0.0: torch.tensor([0.2, 0.4, 0.6, 0.8]), 1.0: torch.tensor([0.3, 0.3, 0.7, 0.7])}
    r = trade_off_reading(flat)  # differences +0.1, -0.1, +0.1, -0.1: mean 0, se 0.1 / sqrt(4) * sqrt(4/3)
    assert r["non_decreasing"] and r["n"] == 4 and r["delta"] == pytest.approx(0.0, abs=1e-7)
    assert r["se"] == pytest.approx(torch.tensor([0.1, -0.1, 0.1, -0.1]).std().item() / 2, rel=1e-5)
    assert not r["beyond_noise"] and "does not show a real change" in describe_reading(r)
    up = {0.0: torch.tensor([0.2, 0.4, 0.6]), 0.5: torch.tensor([0.1, 0.3, 0.5]),
          1.0: torch.tensor([0.5, 0.7, 0.9]), 2.0: torch.tensor([0.0, 0.0, 0.0])}
    r = trade_off_reading(up)  # a dip at 0.5; w = 2 is outside [0, 1] and does not count
    assert r["scales"] == [0.0, 0.5, 1.0] and not r["non_decreasing"]
    assert r["delta"] == pytest.approx(0.3) and r["se"] == pytest.approx(0.0, abs=1e-7) and r["beyond_noise"]
    assert describe_reading(r).startswith("The training reward is not non-decreasing over w = 0, 0.5, 1")
