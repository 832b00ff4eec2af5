"""``flowalign score`` on a folder laid out as ``flowalign sample`` writes it."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from flowalign.rewards import combine, load
from flowalign.rewards.jpeg import jpeg_size_kb
from PIL import Image

from flowalign import cli, shapes
from flowalign.score import read_entries, summarize


@pytest.fixture
def sample_folder(tmp_path):
    """3 prompts x 2 scales x 2 seeds: PNGs under images/ and a metadata.jsonl (file, prompt, scale, seed)."""
    folder = tmp_path / "run"
    (folder / "images").mkdir(parents=True)
    prompts = shapes.heldout_prompts(3)
    lines = []
    for p, prompt in enumerate(prompts):
        for scale in (1.0, 2.0):
            for seed in range(2):
                rng = np.random.default_rng(100 * p + 10 * seed + int(scale))
                image = shapes.render_prompt(prompt if seed == 0 else prompts[(p + 1) % 3], rng)  # seed 1: wrong prompt
                name = f"images/{p}-{scale:g}-{seed}.png"
                Image.fromarray(image).save(folder / name)
                lines.append({"file": name, "prompt": prompt, "scale": scale, "seed": seed})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return folder, lines


def test_score_folder_with_metadata_writes_csv_and_summary(sample_folder, tmp_path, capsys, as_tensor):
    folder, lines = sample_folder
    out = tmp_path / "scores.csv"
    rc = cli.main(
        [
            "score",
            "--reward",
            "shapes=0.5",
            "--reward",
            "jpeg_compressibility=0.5",
            "--normalize",
            "zscore",
            "--images",
            str(folder),
            "--out",
            str(out),
            "--batch-size",
            "5",
        ]
    )
    assert rc == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [line["file"] for line in lines]
    assert list(rows[0]) == ["file", "prompt", "scale", "seed", "shapes", "jpeg_compressibility", "total"]

    images = as_tensor([folder / line["file"] for line in lines])
    fraction, _ = shapes.verify_batch(images, [line["prompt"] for line in lines])
    jpeg = -jpeg_size_kb(images)
    got = {name: torch.tensor([float(r[name]) for r in rows]) for name in ("shapes", "jpeg_compressibility", "total")}
    torch.testing.assert_close(got["shapes"], fraction)
    torch.testing.assert_close(got["jpeg_compressibility"], jpeg)
    torch.testing.assert_close(got["total"], combine([fraction, jpeg], [0.5, 0.5], "zscore"), atol=1e-5, rtol=1e-5)
    assert fraction[::2].mean() > fraction[1::2].mean()  # images rendered from their own prompt verify better

    printed = capsys.readouterr().out
    assert "all" in printed and "scale = 1" in printed and "scale = 2" in printed
    assert lines[0]["prompt"][:20] in printed and f"Wrote 12 rows to {out}" in printed


def test_score_metadata_file_to_jsonl_with_a_model_reward(sample_folder, tmp_path, tiny_reward_checkpoints, as_tensor):
    folder, lines = sample_folder
    kwargs = tiny_reward_checkpoints("pickscore")["pickscore"]
    out = tmp_path / "scores.jsonl"
    spec = f"pickscore(model={kwargs['model']},processor={kwargs['processor']})"
    assert cli.main(["score", "--reward", spec, "--images", str(folder / "metadata.jsonl"), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["seed"] for r in rows] == [line["seed"] for line in lines] and "total" not in rows[0]
    expected = load("pickscore", **kwargs)(as_tensor([folder / line["file"] for line in lines]),
                                           [line["prompt"] for line in lines])
    torch.testing.assert_close(torch.tensor([r["pickscore"] for r in rows]), expected, atol=1e-4, rtol=1e-5)


def test_plain_folder_with_prompt_file_and_default_output(tmp_path, capsys):
    folder = tmp_path / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("b.png", "a.png", "c.jpg"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
    (tmp_path / "prompts.txt").write_text("first\nsecond\nthird\n")
    _, entries = read_entries(folder, tmp_path / "prompts.txt")
    assert [(e["file"], e["prompt"]) for e in entries] == [("a.png", "first"), ("b.png", "second"), ("c.jpg", "third")]

    assert cli.main(["score", "--reward", "jpeg_incompressibility", "--images", str(folder)]) == 0
    with open(folder / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == ["a.png", "b.png", "c.jpg"]
    # each score is the file's decoded pixels saved again by PIL as a quality-95 JPEG, in kB
    sizes = []
    for name in ("a.png", "b.png", "c.jpg"):
        buffer = io.BytesIO()
        Image.open(folder / name).convert("RGB").save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    assert [float(r["jpeg_incompressibility"]) for r in rows] == pytest.approx(sizes, rel=1e-6)

    with pytest.raises(ValueError, match="some images have none: pass --prompts FILE"):
        cli.main(["score", "--reward", "shapes", "--images", str(folder), "--out", str(tmp_path / "x.csv")])


def test_cli_errors_name_the_problem(sample_folder, tmp_path):
    folder, lines = sample_folder
    (tmp_path / "short.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="has 2 prompts for 12 images"):
        read_entries(folder, tmp_path / "short.txt")
    (folder / lines[0]["file"]).unlink()
    with pytest.raises(FileNotFoundError, match="1 images listed in the metadata are missing"):
        read_entries(folder)
    (folder / "metadata.jsonl").write_text('{"file": "a.png"}\nnot json\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl:2 is not valid JSON"):
        read_entries(folder)
    with pytest.raises(FileNotFoundError, match="no such folder or file"):
        read_entries(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no metadata.jsonl and no images"):
        read_entries(empty)


def test_summary_means_and_stds_by_group():
    entries = [
        {"prompt": "a", "scale": 1.0},
        {"prompt": "a", "scale": 2.0},
        {"prompt": "b", "scale": 1.0},
        {"prompt": "b", "scale": 2.0},
    ]
    columns = {"r": [1.0, 3.0, 5.0, 11.0]}
    rows = {row["group"]: row for row in summarize(entries, columns)}
    assert rows["all"]["n"] == 4 and rows["all"]["r"][0] == 5.0
    assert rows["all"]["r"][1] == pytest.approx(np.std([1, 3, 5, 11], ddof=1))
    assert rows["a"]["r"] == (2.0, pytest.approx(math.sqrt(2)))
    assert rows["scale = 2.0"]["r"][0] == 7.0 and rows["scale = 1.0"]["n"] == 2
    one = summarize([{"prompt": "a"}], {"r": [1.0]})
    assert len(one) == 1 and math.isnan(one[0]["r"][1])
    truncated = summarize([{"prompt": str(i)} for i in range(5)], {"r": [0.0] * 5}, max_groups=2)
    assert truncated[-1]["group"].startswith("... 3 more prompts")


def test_score_a_folder_written_by_flowalign_sample(tmp_path, capsys, tiny_base_and_lora, as_tensor):
    """End to end: ``flowalign sample`` (tiny random base + LoRA) writes the folder, ``flowalign score`` reads it."""
    base, lora = tiny_base_and_lora
    prompts = shapes.heldout_prompts(2)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "samples"
    sample_args = [
        "--base",
        base,
        "--finetuned",
        lora,
        "--prompts",
        tmp_path / "prompts.txt",
        "--scales",
        0,
        1,
        "--steps",
        2,
        "--seed",
        0,
        "--out",
        out,
        "--device",
        "cpu",
    ]
    assert cli.main(["sample", *map(str, sample_args)]) == 0
    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]

    assert cli.main(["score", "--reward", "shapes", "--reward", "jpeg_incompressibility", "--images", str(out)]) == 0
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["file"], r["prompt"], float(r["scale"])) for r in rows] == [
        (r["file"], r["prompt"], r["scale"]) for r in records
    ]
    images = as_tensor([out / r["file"] for r in records])
    fraction, _ = shapes.verify_batch(images, [r["prompt"] for r in records])
    torch.testing.assert_close(torch.tensor([float(r["shapes"]) for r in rows]), fraction)
    printed = capsys.readouterr().out
    assert "scale = 0" in printed and "scale = 1" in printed
