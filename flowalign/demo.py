"""``flowalign demo``: fine-tune, then turn the alignment dial, on a CPU in minutes.

On the embedded tiny base model:

1. fine-tune a LoRA with the shipped setting that learns (``samples/configs/acflow_jpeg.yaml``: AC-Flow on
   JPEG compressibility; its reward and its ``kl_coef`` are read from the file, never copied here);
2. sample held-out prompts with RLG at w = 0, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, the same prompts and initial
   noises at every w (one ``rlg_sweep`` call per batch);
3. score every image with the training reward and an unseen one (the shapes verifier: does the image still
   show what the prompt asks?), measure per-prompt diversity, and measure the KL of the RLG sampler to the base
   model at every w in nats per image (``flowalign.eval.sde_path_kl`` on the trainer's stochastic window, the
   units of the trainer's ``kl_to_reference`` and of ``kl_coef``);
4. write ``results.csv`` (one row per w), ``per_image.csv`` and ``per_prompt.csv`` (the data every number is
   computed from), ``grid.png``, ``plot.png``, ``report.md`` and ``settings.json`` to ``--out``.

Every standard error of a difference between two scales is *paired*: the same image (prompt, initial noise)
under both scales. ``docs/algorithms.md`` explains RLG and the KL units.

    flowalign demo                            # writes samples/demo/
    flowalign demo --quick --out /tmp/demo    # a smoke run with tiny settings (the tests run it)

The same seed reproduces ``results.csv``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from flowalign import rewards, shapes
from flowalign.checkpoints import latest_checkpoint
from flowalign.config import ACFlowConfig
from flowalign.eval import diversity, mean_se, paired_difference, sde_path_kl
from flowalign.pipelines import RLGStableDiffusion3Pipeline
from flowalign.policy import Policy
from flowalign.sampling import flow_sigmas
from flowalign.seeding import generator
from flowalign.tiny import MAX_SEQUENCE_LENGTH, load_base_pipeline
from flowalign.trainer import ACFlowTrainer

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "samples" / "configs" / "acflow_jpeg.yaml"
UNSEEN_REWARD = "shapes"  # the shapes verifier (fraction of the prompt's constraints satisfied): never trained on
GAIN_IN_SE = 5.0  # the reading calls w = 1's gain clear at this many paired standard errors

# The demo's own settings (the fine-tuning settings come from the config file).
FULL = {"prompts": 30, "images_per_prompt": 4, "steps": 20, "batch_size": 15}
QUICK = {"prompts": 4, "images_per_prompt": 2, "steps": 4, "batch_size": 8}
# --quick shrinks the schedule of the config file (its reward, kl_coef and algorithm stay).
QUICK_TRAINING = {"iterations": 2, "prompts_per_iteration": 2, "images_per_prompt": 2, "sample_steps": 4,
                  "critic_warmup_iterations": 1, "inner_epochs": 1, "noise_draws": 1}

# Grid layout (pixels); grid_size() is the one formula for the image size.
CELL, PAD, LABEL_W, HEADER_H, CAPTION_H = 96, 4, 200, 20, 14


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="samples/demo", help="Output folder (default samples/demo).")
    parser.add_argument("--quick", action="store_true", help="A smoke run with tiny settings (what the tests run).")
    parser.add_argument("--seed", type=int, default=0, help="Training seed, held-out prompts and noises (default 0).")
    parser.add_argument("--config", default=str(SHIPPED_CONFIG),
                        help="The fine-tuning config (default: the shipped samples/configs/acflow_jpeg.yaml).")
    parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES),
                        help="RLG scales w (must include 0 and 1; default 0 0.25 0.5 0.75 1 1.5 2 3).")
    parser.add_argument("--prompts", type=int, default=None, help="Held-out prompts (default 30, 5 per shapes family; 4 with --quick).")
    parser.add_argument("--images-per-prompt", type=int, default=None,
                        help="Images (initial noises) per prompt, >= 2 for diversity (default 4; 2 with --quick).")


def run(args: argparse.Namespace) -> int:
    try:
        result = demo(out=args.out, quick=args.quick, seed=args.seed, config=args.config, scales=args.scales,
                      n_prompts=args.prompts, images_per_prompt=args.images_per_prompt)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"flowalign demo: {err}") from None
    print(result["table"])
    print("\n" + describe_reading(result["reading"]))
    print(f"\nWrote {result['out']}/report.md, results.csv, grid.png, plot.png, per_image.csv, per_prompt.csv")
    return 0


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------
def training_config(config: str | os.PathLike, out: Path, seed: int, quick: bool) -> ACFlowConfig:
    """The config file as shipped, with the demo's own output folder and seed, its evaluation off (the demo
    evaluates at every w itself) and, with ``quick``, :data:`QUICK_TRAINING`'s schedule."""
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"No fine-tuning config at {path}; pass --config PATH (a YAML of ACFlowConfig keys).")
    overrides = {"output_dir": str(out / "acflow_run"), "seed": seed, "eval_prompts": 0, "eval_every": 0,
                 "checkpoint_every": 0, "resume": False}
    if quick:
        overrides.update(QUICK_TRAINING)
    return ACFlowConfig.from_yaml(path, overrides)


def demo(out: str | os.PathLike = "samples/demo", quick: bool = False, seed: int = 0,
         config: str | os.PathLike = SHIPPED_CONFIG, scales=SCALES, n_prompts: int | None = None,
         images_per_prompt: int | None = None) -> dict:
    """Run the demo and write its files to ``out``.

    Returns ``{"rows", "table", "reading", "settings", "out", "figure"}``: ``rows`` as in ``results.csv``,
    ``reading`` from :func:`read_sweep`, ``figure`` the matplotlib figure of ``plot.png``.
    """
    scales = sorted({float(w) for w in scales})
    if 0.0 not in scales or 1.0 not in scales:
        raise ValueError(f"scales must include 0 (the base model) and 1 (the fine-tuned model), got {scales}.")
    sizes = QUICK if quick else FULL
    n_prompts = n_prompts or sizes["prompts"]
    k = images_per_prompt or sizes["images_per_prompt"]
    if k < 2:
        raise ValueError(f"images_per_prompt must be >= 2 (diversity compares images of one prompt), got {k}.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    cpu: dict[str, float] = {}  # process CPU seconds per stage: what a quiet machine's wall time is bounded by
    load_before = os.getloadavg()[0]

    # 1. Fine-tune with the config file's setting.
    t0, c0 = time.perf_counter(), time.process_time()
    cfg = training_config(config, out, seed, quick)
    trainer = ACFlowTrainer(cfg)
    print(f"[1/3] {cfg.algorithm} on {cfg.reward}, kl_coef {cfg.kl_coef}: {cfg.iterations} iterations of "
          f"{cfg.prompts_per_iteration * cfg.images_per_prompt} images")
    trainer.train()
    lora_dir = latest_checkpoint(cfg.output_dir)
    train_reward = trainer.reward
    timings["fine-tune"], cpu["fine-tune"] = time.perf_counter() - t0, time.process_time() - c0

    # 2. RLG at every w: the same held-out prompts and initial noises.
    t0, c0 = time.perf_counter(), time.process_time()
    pipe = RLGStableDiffusion3Pipeline.from_pipe(load_base_pipeline())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_finetuned(lora_dir)
    base_prompts = shapes.heldout_prompts(n_prompts, seed=seed)
    prompts = [p for p in base_prompts for _ in range(k)]
    groups = [i for i in range(n_prompts) for _ in range(k)]
    steps, cfg_scale = sizes["steps"], trainer.guidance_scale  # the config's CFG
    images = sweep_images(pipe, prompts, scales, seed, steps, cfg_scale, sizes["batch_size"])
    timings["rlg sweep"], cpu["rlg sweep"] = time.perf_counter() - t0, time.process_time() - c0

    # 3. Scores, diversity and the KL to the base model at every w.
    t0, c0 = time.perf_counter(), time.process_time()
    unseen = rewards.load(UNSEEN_REWARD)
    per_image = {w: {"reward": _score(train_reward, images[w], prompts), "unseen": _score(unseen, images[w], prompts)}
                 for w in scales}
    for w in scales:
        per_image[w]["kl_to_base"] = rlg_kl_to_base(pipe, prompts, w, cfg, cfg_scale, seed, sizes["batch_size"])
    per_prompt = {w: per_prompt_diversity(images[w], groups) for w in scales}
    timings["scores and KL"], cpu["scores and KL"] = time.perf_counter() - t0, time.process_time() - c0

    # 4. Files.
    t0, c0 = time.perf_counter(), time.process_time()
    rows = summarize(per_image, per_prompt)
    reading = read_sweep(per_image, per_prompt)
    _write_csv(out / "results.csv", rows)
    _write_per_image(out / "per_image.csv", per_image, prompts, k)
    _write_csv(out / "per_prompt.csv", [{"rlg_scale": w, "prompt_index": i, "prompt": base_prompts[i],
                                         "diversity": _fmt(d)} for w in scales for i, d in enumerate(per_prompt[w])])
    grid_rows = min(n_prompts, 6)
    draw_grid(images, per_image, base_prompts, k, out / "grid.png", n_rows=grid_rows)
    figure = plot_sweep(rows, out / "plot.png", reward_name=str(cfg.reward))
    table = markdown_table(rows)
    timings["files"], cpu["files"] = time.perf_counter() - t0, time.process_time() - c0
    settings = {
        "quick": quick, "seed": seed, "scales": scales, "held_out_prompts": n_prompts, "images_per_prompt": k,
        "sampling": {"steps": steps, "cfg": cfg_scale, "sampler": "Euler ODE (the stock scheduler)"},
        "kl": {"sde_steps": cfg.sde_steps(cfg.sample_steps), "sample_steps": cfg.sample_steps,
               "noise_level": cfg.noise_level},
        "unseen_reward": UNSEEN_REWARD, "grid_rows": grid_rows, "config_file": str(config),
        "training": asdict(cfg), "lora": str(lora_dir),
        "seconds": {name: round(v, 1) for name, v in timings.items()},
        "cpu_seconds": {name: round(v, 1) for name, v in cpu.items()},
        "threads": torch.get_num_threads(), "load_average_at_start": round(load_before, 2),
        "load_average_at_end": round(os.getloadavg()[0], 2),
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=1))
    write_report(out / "report.md", table, settings, reading)
    return {"rows": rows, "table": table, "reading": reading, "settings": settings, "out": out, "figure": figure}


def sweep_images(pipe, prompts: list[str], scales: list[float], seed: int, steps: int, cfg_scale: float,
                 batch_size: int) -> dict[float, torch.Tensor]:
    """``{w: images [N, 3, H, W] in [0, 1]}``: image ``i`` starts from the noise of generator ``(seed, i)`` at every w
    (``rlg_sweep``: one call per batch, every scale from the same initial noise)."""
    out: dict[float, list[torch.Tensor]] = {w: [] for w in scales}
    for start in tqdm(range(0, len(prompts), batch_size), desc="[2/3] RLG sweep", leave=False):
        chunk = prompts[start : start + batch_size]
        gens = [generator(seed, start + i) for i in range(len(chunk))]
        images = pipe(chunk, rlg_sweep=list(scales), num_inference_steps=steps, guidance_scale=cfg_scale,
                      generator=gens, output_type="pt", max_sequence_length=MAX_SEQUENCE_LENGTH).images.float().cpu()
        for j, w in enumerate(scales):
            out[w].append(images[j * len(chunk) : (j + 1) * len(chunk)])
    return {w: torch.cat(parts) for w, parts in out.items()}


def rlg_kl_to_base(pipe, prompts: list[str], w: float, cfg: ACFlowConfig, cfg_scale: float, seed: int,
                   batch_size: int) -> list[float]:
    """KL (nats per image) of the RLG sampler at scale ``w`` to the base sampler, on the RLG sampler's own paths.

    The SDE rollout sampler of the trainer (``noise_level``, the first ``sde_steps(sample_steps)`` steps of the
    ``sample_steps`` grid), with the CFG-guided RLG velocity ``v_base + w (v_ft - v_base)`` against the CFG-guided
    base velocity, through :func:`flowalign.eval.sde_path_kl`: the units of the trainer's ``kl_to_reference``.
    The same initial noise and SDE noise at every ``w``; ``w = 0`` is exactly 0.
    """
    # the RLG transformer as the policy: its guided field at scale w, the prompt encoding and CFG of the trainer
    tcfg = pipe.transformer.config
    shape = (tcfg.in_channels, tcfg.sample_size, tcfg.sample_size)
    policy = Policy(pipe, pipe.rlg_transformer, cfg_scale, latent_shape=shape, prompt_cache_size=0,
                    sample_steps=cfg.sample_steps, noise_level=cfg.noise_level,
                    sde_steps_fraction=cfg.sde_steps_fraction)
    sigmas = flow_sigmas(pipe.scheduler, policy.sample_steps)[: policy.sde_steps() + 1]
    out: list[float] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        embeds, pooled = policy.encode(chunk)
        neg_embeds, neg_pooled = policy.encode([""] * len(chunk))
        gen = generator(seed, 10**6 + start)
        noise = torch.randn((len(chunk), *shape), generator=gen)

        def guided(scale: float, embeds=embeds, pooled=pooled, neg_embeds=neg_embeds, neg_pooled=neg_pooled):
            def field(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                policy.model.set_rlg_scale(scale)
                return policy.cfg_velocity(policy.model, x, s, embeds, pooled, neg_embeds, neg_pooled)
            return field

        try:
            out += sde_path_kl(guided(w), guided(0.0), noise, sigmas, policy.noise_level, generator=gen).tolist()
        finally:
            policy.model.set_rlg_scale(1.0)
    return out


def _score(reward, images: torch.Tensor, prompts: list[str]) -> list[float]:
    return torch.as_tensor(reward(images, prompts)).float().flatten().tolist()


def per_prompt_diversity(images: torch.Tensor, groups: list[int]) -> list[float]:
    """:func:`flowalign.eval.diversity` of each prompt's images (their mean is ``diversity(images, groups)``)."""
    return [diversity(images[[i for i, g in enumerate(groups) if g == p]], [p] * groups.count(p))
            for p in sorted(set(groups))]


# ---------------------------------------------------------------------------------------------------------
# Numbers: the table and the reading
# ---------------------------------------------------------------------------------------------------------
COLUMNS = ("rlg_scale", "reward", "reward_paired_se", "diversity", "diversity_paired_se", "kl_to_base",
           "kl_to_base_se", UNSEEN_REWARD, f"{UNSEEN_REWARD}_paired_se")


def _fmt(x: float) -> str:
    return f"{x:.6f}"


def summarize(per_image: dict, per_prompt: dict) -> list[dict]:
    """One row per w (the columns of ``results.csv``): means, and standard errors of the difference from w = 0
    paired over images (rewards) or prompts (diversity); the KL's is its plain standard error over images."""
    rows = []
    for w in sorted(per_image):  # values rounded as results.csv writes them
        reward_se = _paired(per_image[w]["reward"], per_image[0.0]["reward"])[1]
        unseen_se = _paired(per_image[w]["unseen"], per_image[0.0]["unseen"])[1]
        div_se = _paired(per_prompt[w], per_prompt[0.0])[1]
        kl, kl_se = mean_se(per_image[w]["kl_to_base"])
        values = {"reward": _mean(per_image[w]["reward"]), "reward_paired_se": reward_se,
                  "diversity": _mean(per_prompt[w]), "diversity_paired_se": div_se, "kl_to_base": kl,
                  "kl_to_base_se": kl_se, UNSEEN_REWARD: _mean(per_image[w]["unseen"]),
                  f"{UNSEEN_REWARD}_paired_se": unseen_se}
        rows.append({"rlg_scale": w, **{key: float(_fmt(v)) for key, v in values.items()}})
    return rows


def _mean(values) -> float:
    return sum(values) / len(values)


def _paired(a, b) -> tuple[float, float]:
    """(mean of a - b, its paired SE): 0 and 0 for a scale against itself."""
    return paired_difference(a, b)


def read_sweep(per_image: dict, per_prompt: dict) -> dict:
    """What the sweep says, with paired standard errors (the same images at every w).

    - ``gain``: the training reward at w = 1 minus w = 0 (``delta``, ``se``, ``n``, ``in_se`` = delta / se,
      ``clear`` = delta >= :data:`GAIN_IN_SE` se);
    - ``steps``: each step between consecutive scales in [0, 1] (``from``, ``to``, ``delta``, ``se``), and
      ``monotone``: no step falls by more than its own standard error;
    - ``beyond``: for each w > 1, reward, unseen reward and diversity against w = 1 (``delta``, ``se``);
    - ``kl``: the mean KL to the base model at each w, and its ratio to w^2 KL(w = 1) (1 where the KL grows as w^2,
      the RLG velocity gap ``w (v_ft - v_base)`` measured at the same states).

    Example: ``read_sweep({0.0: {"reward": [0, 0], ...}, 1.0: {"reward": [1, 2], ...}}, ...)["gain"]["delta"]`` is 1.5.
    """
    scales = sorted(per_image)
    reading: dict = {"scales": scales}
    r = {w: per_image[w]["reward"] for w in scales}
    delta, se = paired_difference(r[1.0], r[0.0])
    reading["gain"] = {"delta": delta, "se": se, "n": len(r[0.0]), "in_se": delta / se if se > 0 else math.inf,
                       "clear": delta >= GAIN_IN_SE * se}
    inside = [w for w in scales if 0.0 <= w <= 1.0]
    reading["steps"] = []
    for a, b in itertools.pairwise(inside):
        d, s = paired_difference(r[b], r[a])
        reading["steps"].append({"from": a, "to": b, "delta": d, "se": s})
    reading["monotone"] = all(step["delta"] >= -step["se"] for step in reading["steps"])
    reading["beyond"] = []
    for w in (w for w in scales if w > 1.0):
        entry = {"w": w}
        for key, values, ref in (("reward", r[w], r[1.0]), ("unseen", per_image[w]["unseen"], per_image[1.0]["unseen"]),
                                 ("diversity", per_prompt[w], per_prompt[1.0])):
            d, s = paired_difference(values, ref)
            entry[key] = {"delta": d, "se": s}
        reading["beyond"].append(entry)
    kl = {w: _mean(per_image[w]["kl_to_base"]) for w in scales}
    reading["kl"] = {"mean": kl, "ratio_to_w2": {w: kl[w] / (w * w * kl[1.0]) for w in scales
                                                 if w > 0 and kl[1.0] > 0}}
    base_div, ft_div = _mean(per_prompt[0.0]), _mean(per_prompt[1.0])
    reading["diversity"] = {"base": base_div, "finetuned": ft_div,
                            "change": paired_difference(per_prompt[1.0], per_prompt[0.0])}
    return reading


def describe_reading(reading: dict) -> str:
    """The reading in words, with its numbers (report.md and the console print it)."""
    g = reading["gain"]
    lines = [
        f"- **Alignment at w = 1.** The training reward changes by {g['delta']:+.4f} ± {g['se']:.4f} from w = 0 (the "
        f"base model) to w = 1 (the fine-tuned model), paired over {g['n']} images: {g['in_se']:.1f} standard errors"
        + (", a clear gain." if g["clear"] else f", short of the {GAIN_IN_SE:g} standard errors this demo asks for."),
    ]
    steps = ", ".join(f"{s['from']:g} -> {s['to']:g}: {s['delta']:+.4f} ± {s['se']:.4f}" for s in reading["steps"])
    lines.append(
        f"- **The dial between 0 and 1.** Step by step ({steps}), the reward "
        + ("never falls by more than one standard error: w interpolates." if reading["monotone"]
           else "falls by more than one standard error at least once: the dial is not monotone here.")
    )
    for b in reading["beyond"]:
        rd, ud, dd = b["reward"], b["unseen"], b["diversity"]
        verdict = ("a further gain" if rd["delta"] > 0 and rd["delta"] >= 2 * rd["se"] else
                   "a loss" if rd["delta"] < 0 and rd["delta"] <= -2 * rd["se"] else
                   "no change beyond two standard errors")
        lines.append(
            f"- **w = {b['w']:g} against w = 1:** reward {rd['delta']:+.4f} ± {rd['se']:.4f} ({verdict}); "
            f"diversity {dd['delta']:+.4f} ± {dd['se']:.4f}; unseen reward ({UNSEEN_REWARD}) {ud['delta']:+.4f} ± "
            f"{ud['se']:.4f}."
        )
    d = reading["diversity"]
    lines.append(f"- **Diversity** goes from {d['base']:.4f} (w = 0) to {d['finetuned']:.4f} (w = 1), "
                 f"{d['change'][0]:+.4f} ± {d['change'][1]:.4f} paired over prompts "
                 f"(ratio {d['finetuned'] / d['base']:.2f}).")
    kl = reading["kl"]
    ratios = ", ".join(f"w = {w:g}: {x:.2f}" for w, x in kl["ratio_to_w2"].items())
    lines.append(
        f"- **KL to the base model** (nats per image, the trainer's units): {kl['mean'][1.0]:.3f} at w = 1. RLG theory "
        "reads w as the KL coefficient beta / w: a larger w is a weaker regulariser, so the KL must grow with w. "
        f"Measured against w^2 KL(w = 1), the growth of a velocity gap scaled by w at the same states: {ratios}."
    )
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:g}" if k == "rlg_scale" else f"{r[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _write_per_image(path: Path, per_image: dict, prompts: list[str], k: int) -> None:
    rows = [{"rlg_scale": w, "image": i, "prompt_index": i // k, "prompt": prompts[i],
             "reward": _fmt(v["reward"][i]), UNSEEN_REWARD: _fmt(v["unseen"][i]), "kl_to_base": _fmt(v["kl_to_base"][i])}
            for w, v in per_image.items() for i in range(len(prompts))]
    _write_csv(path, rows)


def grid_size(n_rows: int, n_cols: int) -> tuple[int, int]:
    """(width, height) of ``grid.png``: a prompt label column, a header row of scales, a caption under each image."""
    return LABEL_W + n_cols * (CELL + PAD) + PAD, HEADER_H + n_rows * (CELL + CAPTION_H + PAD) + PAD


def _wrap(text: str, draw: ImageDraw.ImageDraw, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + [line] if line else lines


def draw_grid(images: dict, per_image: dict, prompts: list[str], k: int, path: Path, n_rows: int = 6) -> None:
    """Rows: the first image of each of the first ``n_rows`` prompts, its prompt on the left; columns: w; under each
    image its training reward. The cells are tiled by diffusers' ``make_image_grid``; the labels are drawn around.

    Example: ``draw_grid({0.0: images, 1.0: images}, per_image, prompts, k=2, path=Path("grid.png"), n_rows=2)`` writes
    a grid of ``grid_size(2, 2)`` pixels."""
    scales = sorted(images)
    grid = Image.new("RGB", grid_size(n_rows, len(scales)), "white")
    font = ImageFont.load_default(size=11)
    cells = [_grid_cell(images[w][i * k], per_image[w]["reward"][i * k], font) for i in range(n_rows) for w in scales]
    grid.paste(make_image_grid(cells, rows=n_rows, cols=len(scales)), (LABEL_W + PAD, HEADER_H))
    draw = ImageDraw.Draw(grid)
    for j, w in enumerate(scales):
        x = LABEL_W + PAD + j * (CELL + PAD)
        draw.text((x + CELL // 2, HEADER_H // 2), f"w = {w:g}" + (" (base)" if w == 0 else " (ft)" if w == 1 else ""),
                  fill="black", font=font, anchor="mm")
    for i in range(n_rows):
        y = HEADER_H + i * (CELL + CAPTION_H + PAD)
        for n, line in enumerate(_wrap(prompts[i], draw, font, LABEL_W - 2 * PAD)[:6]):
            draw.text((PAD, y + 4 + 13 * n), line, fill="black", font=font)
    grid.save(path)


def _grid_cell(image: torch.Tensor, reward: float, font) -> Image.Image:
    """One cell of ``grid.png``: the image ``[3, H, W]`` in [0, 1] scaled to CELL x CELL (nearest), its reward under
    it, and PAD pixels of white to the right and below (the gap to the next cell)."""
    cell = Image.new("RGB", (CELL + PAD, CELL + CAPTION_H + PAD), "white")
    pil = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))  # [0, 1] -> 0 ... 255
    cell.paste(pil.resize((CELL, CELL), Image.NEAREST), (0, 0))
    ImageDraw.Draw(cell).text((CELL // 2, CELL + CAPTION_H // 2), f"{reward:.3f}", fill="black", font=font, anchor="mm")
    return cell


def plot_sweep(rows: list[dict], path: Path, reward_name: str = "reward"):
    """Left: training reward ± paired SE and diversity ± paired SE against w, w = 1 (the fine-tuned model) marked.
    Right: the measured KL to the base model ± SE against w, with w^2 KL(w = 1). Returns the figure."""
    import matplotlib  # optional heavy dependency, only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after the backend is chosen

    ws = [r["rlg_scale"] for r in rows]
    ft = next(r for r in rows if r["rlg_scale"] == 1.0)
    fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax.errorbar(ws, [r["reward"] for r in rows], yerr=[r["reward_paired_se"] for r in rows], fmt="o-", color="C0",
                capsize=3, label=f"{reward_name} (training reward)")
    ax.plot([1.0], [ft["reward"]], marker="*", markersize=16, color="C3", linestyle="none",
            label="fine-tuned model (w = 1)")
    ax.set_xlabel("RLG scale w")
    ax.set_ylabel(f"{reward_name} ± paired SE")
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    div = ax.twinx()
    div.errorbar(ws, [r["diversity"] for r in rows], yerr=[r["diversity_paired_se"] for r in rows], fmt="s--",
                 color="C2", capsize=3, label="diversity")
    div.set_ylabel("diversity ± paired SE", color="C2")
    handles = ax.get_legend_handles_labels()[0] + div.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="best")
    ax.set_title("alignment dial: reward and diversity", fontsize=10)
    ax_kl.errorbar(ws, [r["kl_to_base"] for r in rows], yerr=[r["kl_to_base_se"] for r in rows], fmt="o-",
                   color="C1", capsize=3, label="measured KL to base")
    fine = [i / 50 * max(ws) for i in range(51)]
    ax_kl.plot(fine, [w * w * ft["kl_to_base"] for w in fine], color="grey", ls=":", label="w² · KL(w = 1)")
    ax_kl.set_xlabel("RLG scale w")
    ax_kl.set_ylabel("KL to base (nats / image)")
    ax_kl.set_title("KL to the base model (RLG: coefficient beta / w)", fontsize=10)
    ax_kl.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def write_report(path: Path, table: str, settings: dict, reading: dict) -> None:
    t = settings["training"]
    seconds = settings["seconds"]
    total = sum(seconds.values())
    timing = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    text = f"""# flowalign demo report

**Fine-tuning.** `{t['algorithm']}` on the `{t['reward']}` reward with `kl_coef` {t['kl_coef']} nats per image,
{t['iterations']} iterations of {t['prompts_per_iteration']} prompts x {t['images_per_prompt']} images, from
`{settings['config_file']}`{' (shrunk by --quick)' if settings['quick'] else ''}.

**The dial.** RLG sampled {settings['held_out_prompts']} held-out prompts x {settings['images_per_prompt']} initial
noises at every w ({settings['sampling']['steps']} Euler steps, CFG {settings['sampling']['cfg']}, seed
{settings['seed']}): the same images at every w, so every standard error of a difference is paired. w = 0 is the
base model, w = 1 the fine-tuned one, w > 1 extrapolates. `kl_to_base` is the KL of the RLG sampler to the base
sampler in nats per image, on the trainer's stochastic window (the first {settings['kl']['sde_steps']} of
{settings['kl']['sample_steps']} steps, noise level {settings['kl']['noise_level']}): the units of `kl_coef`.
The unseen reward `{settings['unseen_reward']}` is the shapes verifier (the fraction of the prompt's constraints the
image satisfies), never trained on.

## Reading

{describe_reading(reading)}

## Results

{table}

`reward_paired_se` and `{settings['unseen_reward']}_paired_se`: standard errors of the difference from w = 0 over
the same images; `diversity_paired_se`: over prompts; `kl_to_base_se`: over images. Per-image values:
`per_image.csv`; per-prompt diversity: `per_prompt.csv`.

![grid: prompts in rows, w in columns, each image's training reward under it](grid.png)

![reward and diversity against w; KL to the base model against w](plot.png)

Timings: {timing} ({total / 60:.1f} minutes of wall time, {sum(settings['cpu_seconds'].values()) / 60:.1f} minutes of
CPU time, {settings['threads']} threads; load average {settings['load_average_at_start']} at the start,
{settings['load_average_at_end']} at the end).
Reproduce: `flowalign demo{' --quick' if settings['quick'] else ''} --seed {settings['seed']}`.
"""
    path.write_text(text)
