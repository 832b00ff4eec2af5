"""``flowalign sample``: files, metadata, grid, and images reproducible from their metadata (tiny, CPU).

Run: nice -n 10 env OMP_NUM_THREADS=1 python -m pytest tests/test_sample_cli.py -q -x
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flowalign.pipelines import RLGStableDiffusion3Pipeline
from flowalign.pipelines.lora_utils import add_random_lora, save_peft_adapter
from PIL import Image
from torch._dynamo.utils import counters

from flowalign.cli import main
from flowalign.tiny import MAX_SEQUENCE_LENGTH, build_tiny_sd3_pipeline

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sample")
    pipe = build_tiny_sd3_pipeline(seed=0)
    pipe.save_pretrained(tmp / "base")
    add_random_lora(pipe.transformer, "ft", rank=4, seed=1, std=0.1)
    save_peft_adapter(pipe.transformer, "ft", tmp / "lora")
    pipe.transformer.unload_lora()
    return pipe, tmp / "base", tmp / "lora"


def sample(args):
    assert main(["sample", *map(str, args)]) == 0


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_sample_writes_images_grid_and_metadata(models, tmp_path):
    pipe, base, lora = models
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("# shapes\na red circle\n\ntwo blue squares\n")
    out = tmp_path / "out"
    sample(
        [
            "--base",
            base,
            "--finetuned",
            lora,
            "--prompts",
            prompt_file,
            "--scales",
            0,
            1,
            2,
            "--cfg",
            4.5,
            "--steps",
            3,
            "--seed",
            0,
            7,
            "--out",
            out,
            "--batch-size",
            1,
            "--max-rows",
            5,
            "--device",
            "cpu",
        ]
    )

    records = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 3 * 2
    assert {(r["prompt"], r["scale"], r["seed"]) for r in records} == {
        (p, w, s) for p in PROMPTS for w in (0.0, 1.0, 2.0) for s in (0, 7)
    }
    for r in records:
        for key in (
            "file",
            "prompt",
            "scale",
            "seed",
            "steps",
            "cfg",
            "base",
            "finetuned",
            "sampler",
            "mode",
            "height",
            "width",
        ):
            assert key in r
        assert (r["steps"], r["cfg"], r["sampler"], r["mode"], r["height"], r["width"]) == (
            3,
            4.5,
            "euler",
            "exact",
            32,
            32,
        )
        assert (out / r["file"]).is_file() and png(out / r["file"]).shape == (32, 32, 3)
    assert len(list((out / "images").glob("*.png"))) == 12

    grid = png(out / "grid.png")
    assert grid.shape == (4 * 32, 3 * 32, 3)  # rows: (prompt, seed) pairs; columns: scales
    for r in records:
        y, x = 32 * r["grid_row"], 32 * r["grid_col"]
        assert np.array_equal(grid[y : y + 32, x : x + 32], png(out / r["file"]))

    # Scales matter, seeds matter.
    by_key = {(r["prompt"], r["scale"], r["seed"]): png(out / r["file"]) for r in records}
    assert np.abs(by_key[("a red circle", 0.0, 0)] - by_key[("a red circle", 2.0, 0)]).max() > 2
    assert np.abs(by_key[("a red circle", 1.0, 0)] - by_key[("a red circle", 1.0, 7)]).max() > 2

    # w = 0 is the stock base pipeline; each image is reproducible from its metadata alone.
    stock = pipe(
        prompt="two blue squares",
        num_inference_steps=3,
        guidance_scale=4.5,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator("cpu").manual_seed(7),
    ).images[0]
    assert np.abs(np.asarray(stock, dtype=np.int16) - by_key[("two blue squares", 0.0, 7)]).max() <= 1
    r = next(r for r in records if (r["prompt"], r["scale"], r["seed"]) == ("a red circle", 2.0, 7))
    rlg = RLGStableDiffusion3Pipeline.from_pipe(pipe)
    rlg.set_progress_bar_config(disable=True)
    rlg.load_finetuned(r["finetuned"], mode=r["mode"])
    again = rlg(
        prompt=r["prompt"],
        rlg_scale=r["scale"],
        num_inference_steps=r["steps"],
        guidance_scale=r["cfg"],
        height=r["height"],
        width=r["width"],
        max_sequence_length=r["max_sequence_length"],
        generator=torch.Generator(r["device"]).manual_seed(r["seed"]),
    ).images[0]
    rlg.unload_finetuned()
    assert np.abs(np.asarray(again, dtype=np.int16) - png(out / r["file"])).max() <= 1


def test_sample_without_base_uses_the_embedded_model(models, tmp_path, monkeypatch):
    pipe, base, lora = models
    import flowalign.tiny

    calls = []

    def fake_load_base_pipeline(path=None, device="cpu", dtype=torch.float32):
        calls.append((device, dtype))
        return flowalign.tiny.load_pipeline(base, device=device, dtype=dtype)

    monkeypatch.setattr(flowalign.tiny, "load_base_pipeline", fake_load_base_pipeline)
    out = tmp_path / "out"
    sample(
        [
            "--finetuned",
            lora,
            "--prompts",
            "a red circle",
            "--scales",
            0.5,
            "--steps",
            2,
            "--out",
            out,
            "--device",
            "cpu",
            "--sampler",
            "sde",
            "--mode",
            "shared_uncond",
        ]
    )
    assert calls == [("cpu", torch.float32)]
    (record,) = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert record["base"] == "flowalign:embedded-tiny-base"
    assert (record["sampler"], record["mode"], record["exact"], record["dtype"]) == (
        "sde",
        "shared_uncond",
        False,
        "float32",
    )
    assert png(out / "grid.png").shape == (32, 32, 3)


def test_sample_sampler_ode_is_the_deprecated_name_of_euler(models, tmp_path):
    """``--sampler euler`` is the default; the old name ``ode`` still samples Euler (the same images), with a
    FutureWarning naming the replacement, and the metadata says "euler"."""
    _, base, lora = models
    args = ["--base", base, "--finetuned", lora, "--prompts", "a red circle", "--scales", 1.5, "--steps", 2,
            "--device", "cpu"]  # fmt: skip
    sample([*args, "--out", tmp_path / "euler"])
    with pytest.warns(FutureWarning, match=r"--sampler='ode' is deprecated.*use --sampler='euler'"):
        sample([*args, "--sampler", "ode", "--out", tmp_path / "ode"])
    records = {name: json.loads((tmp_path / name / "metadata.jsonl").read_text()) for name in ("euler", "ode")}
    assert records["euler"]["sampler"] == records["ode"]["sampler"] == "euler"
    assert np.array_equal(png(tmp_path / "ode" / records["ode"]["file"]), png(tmp_path / "euler" / records["euler"]["file"]))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--scales", "nan"], r"--scales: rlg_sweep\[0\]: rlg_scale must be finite, got nan"),
        (["--scales", "1", "inf"], r"--scales: rlg_sweep\[1\]: rlg_scale must be finite, got inf"),
        (["--max-rows", "0"], r"--max-rows must be >= 1, got 0"),
    ],
)
def test_sample_rejects_bad_scales(models, tmp_path, extra, message):
    _, base, lora = models
    with pytest.raises(SystemExit, match=message):
        sample(["--base", base, "--finetuned", lora, "--prompts", "x", "--out", tmp_path, *extra])
    assert not (tmp_path / "images").exists()  # nothing written, nothing loaded


def test_sample_compile_writes_the_eager_images(models, tmp_path):
    """``--compile`` samples through ``enable_compile`` (aot_eager here: the graphs inductor would compile, traced
    in seconds); every image equals the eager run's, and the metadata says how it was sampled."""
    _, base, lora = models
    args = ["--base", base, "--finetuned", lora, "--prompts", *PROMPTS, "--scales", 0, 1.5, "--cfg", 4.5,
            "--steps", 2, "--device", "cpu", "--sampler", "sde"]  # fmt: skip
    sample([*args, "--out", tmp_path / "eager"])
    torch._dynamo.reset()
    counters.clear()
    sample([*args, "--out", tmp_path / "compiled", "--compile", "--compile-backend", "aot_eager"])
    assert counters["stats"]["unique_graphs"] >= 3  # the transformer, the mix, the SDE step ran compiled
    torch._dynamo.reset()
    eager = [json.loads(line) for line in (tmp_path / "eager" / "metadata.jsonl").read_text().splitlines()]
    compiled = [json.loads(line) for line in (tmp_path / "compiled" / "metadata.jsonl").read_text().splitlines()]
    assert [r["compile"] for r in eager] == [None] * 4 and [r["compile"] for r in compiled] == ["aot_eager"] * 4
    for e, c in zip(eager, compiled, strict=True):
        assert e["file"] == c["file"]
        assert np.abs(png(tmp_path / "compiled" / c["file"]) - png(tmp_path / "eager" / e["file"])).max() <= 1
    differs = png(tmp_path / "compiled" / compiled[0]["file"]) - png(tmp_path / "compiled" / compiled[1]["file"])
    assert (compiled[0]["scale"], compiled[1]["scale"]) == (0.0, 1.5) and compiled[0]["prompt"] == compiled[1]["prompt"]
    assert np.abs(differs).max() > 2  # w = 0 and w = 1.5 of one prompt: real, different samples
