"""`flowalign demo --quick`: the files it promises, and the same numbers for the same seed."""

import csv

import pytest

from flowalign.demo import demo


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
