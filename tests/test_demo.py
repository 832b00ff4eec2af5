"""``flowalign demo``: the numbers it prints come from its per-image data, its figures show them, it reads the
shipped config, and the committed ``samples/demo/`` shows alignment and its dial."""

import csv
import io
import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from flowalign import demo as D
from flowalign.eval import diversity

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "samples" / "demo"


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def paired_se(a, b):
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return d.mean(), d.std(ddof=1) / math.sqrt(d.size)


def by_scale(rows, key, index_key):
    """{w: [values in index order]} from per_image.csv / per_prompt.csv rows."""
    out = {}
    for r in rows:
        out.setdefault(float(r["rlg_scale"]), []).append((int(r[index_key]), float(r[key])))
    return {w: [v for _, v in sorted(vals)] for w, vals in out.items()}


def png_pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def figure_pixels(fig, dpi: int = 100) -> np.ndarray:
    """The figure rendered again as plot_sweep saves it (PNG at 100 dpi), decoded."""
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    return png_pixels(buffer)


def check_results_match_per_image_data(folder: Path) -> tuple[list[dict], dict]:
    """results.csv is what per_image.csv / per_prompt.csv say (recomputed here with numpy, not the demo's code)."""
    results = read_csv(folder / "results.csv")
    assert list(results[0]) == list(D.COLUMNS)
    images, prompts = read_csv(folder / "per_image.csv"), read_csv(folder / "per_prompt.csv")
    reward, unseen = by_scale(images, "reward", "image"), by_scale(images, "shapes", "image")
    kl, div = by_scale(images, "kl_to_base", "image"), by_scale(prompts, "diversity", "prompt_index")
    assert [float(r["rlg_scale"]) for r in results] == sorted(reward)
    for r in results:
        w = float(r["rlg_scale"])
        n = len(reward[w])
        assert float(r["reward"]) == pytest.approx(np.mean(reward[w]), abs=2e-6)
        assert float(r["reward_paired_se"]) == pytest.approx(paired_se(reward[w], reward[0.0])[1], abs=2e-6)
        assert float(r["shapes"]) == pytest.approx(np.mean(unseen[w]), abs=2e-6)
        assert float(r["shapes_paired_se"]) == pytest.approx(paired_se(unseen[w], unseen[0.0])[1], abs=2e-6)
        assert float(r["diversity"]) == pytest.approx(np.mean(div[w]), abs=2e-6)
        assert float(r["diversity_paired_se"]) == pytest.approx(paired_se(div[w], div[0.0])[1], abs=2e-6)
        assert float(r["kl_to_base"]) == pytest.approx(np.mean(kl[w]), abs=2e-6)
        assert float(r["kl_to_base_se"]) == pytest.approx(np.std(kl[w], ddof=1) / math.sqrt(n), abs=2e-6)
    # w = 0 is the base model: no difference from itself, and its KL to itself is exactly 0
    assert float(results[0]["reward_paired_se"]) == 0.0 and set(kl[0.0]) == {0.0}
    return results, {"reward": reward, "unseen": unseen, "kl": kl, "diversity": div}


def check_grid_layout(path: Path, rows: int) -> None:
    """grid.png decodes to the labelled layout (prompt column, header of scales, a caption under every image), with
    text drawn in the label column of every row, in every caption and in the header, and cells that are not all
    alike."""
    grid = np.asarray(Image.open(path).convert("L"))
    assert (grid.shape[1], grid.shape[0]) == D.grid_size(rows, len(D.SCALES))
    assert grid.shape[1] == D.LABEL_W + len(D.SCALES) * (D.CELL + D.PAD) + D.PAD  # not the bare image grid
    cells = set()
    for i in range(rows):
        y = D.HEADER_H + i * (D.CELL + D.CAPTION_H + D.PAD)
        assert (grid[y : y + D.CELL, : D.LABEL_W - D.PAD] < 100).any(), f"no prompt text on row {i}"
        for j in range(len(D.SCALES)):
            x = D.LABEL_W + D.PAD + j * (D.CELL + D.PAD)
            assert (grid[y + D.CELL : y + D.CELL + D.CAPTION_H, x : x + D.CELL] < 100).any(), f"no reward under ({i}, {j})"
            cells.add(grid[y : y + D.CELL, x : x + D.CELL].tobytes())
    assert (grid[: D.HEADER_H, D.LABEL_W :] < 100).any(), "no scale labels"
    assert len(cells) > 1, "every cell of the grid holds the same pixels"


@pytest.mark.slow
def test_quick_demo_numbers_figures_report_and_reproducibility(tmp_path):
    first = D.demo(out=tmp_path / "a", quick=True, seed=0)
    out = first["out"]
    results, data = check_results_match_per_image_data(out)
    assert [float(r["rlg_scale"]) for r in results] == list(D.SCALES)
    n_images = D.QUICK["prompts"] * D.QUICK["images_per_prompt"]
    assert all(len(v) == n_images for v in data["reward"].values())

    # The KL: positive for w > 0; with --quick the window is the first step only, where every scale starts from
    # the same x_T, so the RLG velocity gap is exactly w (v_ft - v_base) and the KL exactly w^2 KL(w = 1).
    kl = {float(r["rlg_scale"]): float(r["kl_to_base"]) for r in results}
    assert kl[1.0] > 0
    for w, value in kl.items():
        assert value == pytest.approx(w * w * kl[1.0], rel=1e-3, abs=1e-6)

    # The reading is computed from the same data, and the report prints it with the table.
    reading = first["reading"]
    delta, se = paired_se(data["reward"][1.0], data["reward"][0.0])
    # (per_image.csv rounds to 1e-6)
    assert reading["gain"]["delta"] == pytest.approx(delta, abs=2e-6) and reading["gain"]["se"] == pytest.approx(se, abs=2e-6)
    assert reading["gain"]["clear"] == (delta >= D.GAIN_IN_SE * se)
    steps = [(s["from"], s["to"]) for s in reading["steps"]]
    assert steps == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]
    assert reading["monotone"] == all(
        paired_se(data["reward"][b], data["reward"][a])[0] >= -paired_se(data["reward"][b], data["reward"][a])[1]
        for a, b in steps)
    assert [b["w"] for b in reading["beyond"]] == [1.5, 2.0, 3.0]
    report = (out / "report.md").read_text()
    assert D.describe_reading(reading) in report and first["table"] in report
    assert "![grid" in report and "(grid.png)" in report and "(plot.png)" in report

    # grid.png: the labelled layout (prompt column, header of scales, a caption under every image)
    check_grid_layout(out / "grid.png", min(D.QUICK["prompts"], 6))

    # plot.png: reward with its paired SE as error bars, the fine-tuned point marked, the KL panel.
    fig = first["figure"]
    ax, ax_kl = fig.axes[0], fig.axes[1]
    reward_bars = ax.containers[0]
    as_floats = lambda values: np.asarray(values, dtype=np.float64)  # matplotlib keeps errorbar data as objects
    np.testing.assert_allclose(as_floats(reward_bars.lines[0].get_ydata()), [float(r["reward"]) for r in results])
    segments = reward_bars.lines[2][0].get_segments()
    np.testing.assert_allclose(as_floats([s[1][1] - s[0][1] for s in segments]),
                               [2 * float(r["reward_paired_se"]) for r in results], atol=1e-9)
    star = [line for line in ax.lines if line.get_marker() == "*"]
    assert len(star) == 1 and list(star[0].get_xdata()) == [1.0]
    np.testing.assert_allclose(as_floats(ax_kl.containers[0].lines[0].get_ydata()),
                               [float(r["kl_to_base"]) for r in results])
    # ... and plot.png is that figure, pixel for pixel
    np.testing.assert_array_equal(png_pixels(out / "plot.png"), figure_pixels(fig))

    # Determinism: the same seed, a second run, the same results.csv byte for byte.
    second = D.demo(out=tmp_path / "b", quick=True, seed=0)
    assert (second["out"] / "results.csv").read_bytes() == (out / "results.csv").read_bytes()


def test_training_config_is_the_config_file_with_the_demo_folders(tmp_path):
    shipped = yaml.safe_load(D.SHIPPED_CONFIG.read_text())
    cfg = D.training_config(D.SHIPPED_CONFIG, tmp_path, seed=0, quick=False)
    for key in ("algorithm", "reward", "kl_coef", "iterations", "prompts_per_iteration", "images_per_prompt",
                "learning_rate", "sample_steps", "sde_steps_fraction"):
        assert getattr(cfg, key) == shipped[key], key
    assert cfg.eval_prompts == 0 and cfg.output_dir == str(tmp_path / "acflow_run")
    # The demo reads the file: another kl_coef in the file is another regulariser in the run.
    changed = tmp_path / "other.yaml"
    changed.write_text(yaml.safe_dump({**shipped, "kl_coef": 0.7}))
    other = D.training_config(changed, tmp_path, seed=0, quick=True)
    assert other.kl_coef == 0.7 and other.w2_weight == pytest.approx(0.7 * other.beta)
    assert other.reward == shipped["reward"] and other.iterations == D.QUICK_TRAINING["iterations"]
    with pytest.raises(FileNotFoundError, match="--config"):
        D.training_config(tmp_path / "missing.yaml", tmp_path, seed=0, quick=True)


def test_demo_refuses_scales_without_the_two_models(tmp_path):
    with pytest.raises(ValueError, match="include 0"):
        D.demo(out=tmp_path, quick=True, scales=[0.5, 1.0])


def test_per_prompt_diversity_averages_to_the_trainers_diversity():
    images = torch.rand(9, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    groups = [0, 0, 0, 1, 1, 1, 2, 2, 2]
    values = D.per_prompt_diversity(images, groups)
    assert len(values) == 3 and np.mean(values) == pytest.approx(diversity(images, groups))
    assert values[1] == pytest.approx(diversity(images[3:6], [0, 0, 0]))


def test_read_sweep_on_hand_values():
    def block(reward, unseen=None, kl=None):
        return {"reward": reward, "unseen": unseen or [0.0] * len(reward), "kl_to_base": kl or [0.0] * len(reward)}

    per_image = {
        0.0: block([0.0, 0.1, 0.2, 0.3]),
        0.5: block([0.2, 0.2, 0.5, 0.5], kl=[1.0, 1.0, 1.0, 1.0]),      # +0.2 on average
        1.0: block([0.3, 0.5, 0.6, 0.6], kl=[4.0, 4.0, 4.0, 4.0]),      # +0.35 from w = 0: differences .3 .4 .4 .3
        2.0: block([0.3, 0.5, 0.6, 0.6], unseen=[-1.0] * 4, kl=[20.0] * 4),  # no further gain
    }
    per_prompt = {0.0: [0.5, 0.4], 0.5: [0.5, 0.4], 1.0: [0.4, 0.3], 2.0: [0.2, 0.2]}
    r = D.read_sweep(per_image, per_prompt)
    d = np.array([0.3, 0.4, 0.4, 0.3])
    assert r["gain"]["delta"] == pytest.approx(0.35) and r["gain"]["se"] == pytest.approx(d.std(ddof=1) / 2)
    assert r["gain"]["in_se"] == pytest.approx(0.35 / (d.std(ddof=1) / 2)) and r["gain"]["clear"]
    assert [(s["from"], s["to"]) for s in r["steps"]] == [(0.0, 0.5), (0.5, 1.0)] and r["monotone"]
    (beyond,) = r["beyond"]
    assert beyond["w"] == 2.0 and beyond["reward"]["delta"] == pytest.approx(0.0) and beyond["reward"]["se"] == 0.0
    assert beyond["unseen"]["delta"] == pytest.approx(-1.0) and beyond["diversity"]["delta"] == pytest.approx(-0.15)
    assert r["kl"]["ratio_to_w2"] == pytest.approx({0.5: 1.0, 1.0: 1.0, 2.0: 20.0 / 16.0})
    text = D.describe_reading(r)
    assert "+0.3500" in text and "a clear gain" in text and "never falls by more than one standard error" in text
    assert "w = 2 against w = 1:** reward +0.0000 ± 0.0000 (no change beyond two standard errors)" in text

    # a dip larger than its standard error between 0 and 1 is reported as such, and a small gain is not clear
    per_image[0.5] = block([-0.1, 0.0, 0.1, 0.1])
    r = D.read_sweep(per_image, per_prompt)
    assert not r["monotone"] and "not monotone" in D.describe_reading(r)
    per_image[1.0] = block([0.05, 0.1, 0.2, 0.3], kl=[4.0] * 4)
    r = D.read_sweep(per_image, per_prompt)
    assert not r["gain"]["clear"] and "short of the 5 standard errors" in D.describe_reading(r)


@pytest.mark.committed
@pytest.mark.skipif(not (COMMITTED / "per_image.csv").exists(), reason="samples/demo/ has not been generated")
def test_committed_demo_shows_alignment_and_its_dial(tmp_path):
    """samples/demo/ (what the README shows) was written by `flowalign demo` with the config file as it is now,
    its table is its per-image data, w = 1 gains >= 5 paired SEs over w = 0, and the reward does not fall by more
    than one SE from one w to the next over 0 ... 1."""
    data = check_results_match_per_image_data(COMMITTED)[1]
    settings = json.loads((COMMITTED / "settings.json").read_text())
    shipped = yaml.safe_load(D.SHIPPED_CONFIG.read_text())
    assert not settings["quick"] and settings["scales"] == list(D.SCALES)
    for key in ("algorithm", "reward", "kl_coef", "iterations"):
        assert settings["training"][key] == shipped[key], (
            f"samples/demo/ was made with {key}={settings['training'][key]!r}, the config file now says "
            f"{shipped[key]!r}: rerun `flowalign demo` and commit samples/demo/")
    reward = data["reward"]
    delta, se = paired_se(reward[1.0], reward[0.0])
    assert delta >= 5 * se, f"w = 1 - w = 0: {delta:+.4f} ± {se:.4f} ({delta / se:.1f} SE)"
    inside = [w for w in sorted(reward) if w <= 1.0]
    for a, b in itertools.pairwise(inside):
        step, step_se = paired_se(reward[b], reward[a])
        assert step >= -step_se, f"the reward falls from w = {a:g} to {b:g}: {step:+.4f} ± {step_se:.4f}"
    report = (COMMITTED / "report.md").read_text()
    # the report's figures are these (to its 4 printed decimals; float32 vs float64 sums may differ in the last)
    quoted = re.search(r"changes by ([+-]\d+\.\d+) ± (\d+\.\d+) .*?: (\d+\.\d+) standard errors", report)
    assert quoted, "report.md does not quote the w = 1 gain"
    assert float(quoted.group(1)) == pytest.approx(delta, abs=2e-4) and float(quoted.group(2)) == pytest.approx(se, abs=2e-4)
    assert float(quoted.group(3)) == pytest.approx(delta / se, abs=0.06)  # printed to 1 decimal
    # the figures: grid.png has the labelled layout with an image in every cell, and plot.png is what plot_sweep
    # draws from results.csv, pixel for pixel (a figure from other numbers, or a stale one, differs)
    check_grid_layout(COMMITTED / "grid.png", settings["grid_rows"])
    with open(COMMITTED / "results.csv") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    D.plot_sweep(rows, tmp_path / "plot.png", reward_name=settings["training"]["reward"])
    assert np.array_equal(png_pixels(COMMITTED / "plot.png"), png_pixels(tmp_path / "plot.png")), (
        "samples/demo/plot.png is not plot_sweep(results.csv): rerun `flowalign demo` (or matplotlib's version differs "
        "from the one that drew it)")


def test_draw_grid_pastes_each_prompts_first_image_under_its_scale(tmp_path):
    """Solid-colour images, a different colour per (prompt, scale): every cell of grid.png holds exactly its image's
    colour (first image of each prompt, k = 2 images per prompt), and its caption is drawn under it."""
    scales, k, n_rows = [0.0, 1.0, 2.0], 2, 2
    colour = {(i, j): (40 * i + 10, 80 * j + 20, 200 - 50 * i) for i in range(n_rows) for j in range(len(scales))}
    images, per_image = {}, {}
    for j, w in enumerate(scales):
        batch = torch.zeros(n_rows * k, 3, 8, 8)
        for i in range(n_rows):
            batch[i * k] = torch.tensor(colour[i, j]).view(3, 1, 1) / 255
            batch[i * k + 1] = 1.0  # the prompt's second image (white) is not shown
        images[w] = batch
        per_image[w] = {"reward": [0.5 * j - i for i in range(n_rows) for _ in range(k)]}
    D.draw_grid(images, per_image, ["a photo of a red circle", "a photo of two squares"], k, tmp_path / "grid.png",
                n_rows=n_rows)
    grid = png_pixels(tmp_path / "grid.png")
    assert (grid.shape[1], grid.shape[0]) == D.grid_size(n_rows, len(scales))
    for (i, j), rgb in colour.items():
        y = D.HEADER_H + i * (D.CELL + D.CAPTION_H + D.PAD)
        x = D.LABEL_W + D.PAD + j * (D.CELL + D.PAD)
        cell = grid[y : y + D.CELL, x : x + D.CELL]
        assert (cell == rgb).all(), f"cell ({i}, {j}) is not its image's colour {rgb}"
        assert (grid[y + D.CELL : y + D.CELL + D.CAPTION_H, x : x + D.CELL] < 100).any(), f"no caption under ({i}, {j})"
    assert (grid[:, : D.LABEL_W - D.PAD] < 100).any() and (grid[D.HEADER_H :, : D.LABEL_W - D.PAD] < 255).any()


def test_plot_sweep_draws_its_rows_where_they_belong(tmp_path):
    """plot.png decoded: the fine-tuned star sits at (w = 1, reward(1)) in the star's colour, and each measured KL at
    (w, KL(w)) in the KL colour, at the pixels matplotlib maps those data points to."""
    rows = [{"rlg_scale": w, "reward": r, "reward_paired_se": 0.02, "diversity": d, "diversity_paired_se": 0.01,
             "kl_to_base": kl, "kl_to_base_se": 0.1}
            for w, r, d, kl in [(0.0, 0.0, 0.30, 0.0), (0.5, 0.5, 0.28, 0.5), (1.0, 1.0, 0.25, 2.0),
                                (2.0, 1.2, 0.20, 6.0)]]
    fig = D.plot_sweep(rows, tmp_path / "plot.png", reward_name="redness")
    image = png_pixels(tmp_path / "plot.png").astype(int)
    assert image.shape == (380, 1000, 3)  # figsize (10, 3.8) at 100 dpi
    ax, ax_kl = fig.axes[0], fig.axes[1]

    def coloured_pixels(axes, x, y, rgb, radius=12):
        """How many pixels within `radius` of data point (x, y) have colour `rgb` (antialiasing aside)."""
        px, py = axes.transData.transform((x, y)) * 100 / fig.dpi  # display -> saved pixels (origin bottom-left)
        row, col = round(float(image.shape[0] - py)), round(float(px))
        window = image[row - radius : row + radius + 1, col - radius : col + radius + 1]
        return int((np.abs(window - rgb).max(axis=-1) <= 10).sum())

    star, kl_colour = (214, 39, 40), (255, 127, 14)  # matplotlib's C3 and C1
    assert coloured_pixels(ax, 1.0, 1.0, star) >= 30  # a 16-point star, less the marker and bar drawn over it (46)
    for w, r in [(0.0, 0.0), (0.5, 0.5), (2.0, 1.2)]:
        assert coloured_pixels(ax, w, r, star) == 0, f"a star at w = {w}"
    for w, kl in [(0.5, 0.5), (1.0, 2.0), (2.0, 6.0)]:
        assert coloured_pixels(ax_kl, w, kl, kl_colour, radius=5) >= 15, (w, kl)
    assert coloured_pixels(ax_kl, 1.5, 6.0, kl_colour, radius=5) == 0  # where nothing was drawn
