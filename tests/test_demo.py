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
