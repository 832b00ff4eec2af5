"""``flowalign demo``: the whole promise of flowalign, in minutes, on a CPU.

On the embedded tiny base model and the shapes verifier:

1. fine-tune a LoRA with AC-Flow (dense verifier reward);
2. sample held-out prompts with RLG at several alignment scales w (same seeds for every w);
3. score every image with the training reward and unseen rewards (the binary verifier, JPEG size),
   and measure per-prompt diversity;
4. write ``grid.png`` (rows prompts, columns scales), ``plot.png`` (figures against w),
   ``results.csv`` and ``report.md`` to ``--out``, and print the table.

``--quick`` is a two-minute smoke version (the test suite runs it). The same seed gives the same
numbers.

    flowalign demo                      # ~15 minutes on 2 CPU cores, writes samples/demo/
    flowalign demo --quick --out /tmp/demo
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

SCALES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)

# AC-Flow settings of the demo (the full run); --quick shrinks them.
DEMO_TRAINING = dict(
    algorithm="acflow", prompts="shapes", reward="shapes", prompts_per_iteration=8, images_per_prompt=8,
    sample_steps=16, guidance_scale=2.0, sampler="sde", sde_steps_fraction=0.25, fm_states="trajectory", iterations=48,
    critic_warmup_iterations=3, advantage_clip=2.0, beta=1.0, w2_weight=30.0, learning_rate=3e-3,
    eval_prompts=0, checkpoint_every=0,
)  # = samples/configs/acflow_shapes.yaml, fewer iterations (tests/test_demo.py checks they agree)
QUICK_TRAINING = dict(DEMO_TRAINING, prompts_per_iteration=2, images_per_prompt=4, sample_steps=6, iterations=3,
                      critic_warmup_iterations=1, inner_epochs=1, noise_draws=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="samples/demo", help="Output folder (default samples/demo).")
    parser.add_argument("--quick", action="store_true", help="A ~2-minute smoke version with tiny settings.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES), help="RLG scales w to sweep.")
    parser.add_argument("--prompts", type=int, default=None, help="Held-out prompts (default 48; 6 with --quick).")
    parser.add_argument("--images-per-prompt", type=int, default=None, help="Seeds per prompt (default 4; 2 with --quick).")
    parser.add_argument("--iterations", type=int, default=None, help="AC-Flow iterations (default 48; 3 with --quick).")


def run(args: argparse.Namespace) -> int:
    result = demo(out=args.out, quick=args.quick, seed=args.seed, scales=args.scales, n_prompts=args.prompts,
                  images_per_prompt=args.images_per_prompt, iterations=args.iterations)
    print(result["table"])
    print("\n" + describe_reading(result["reading"]))
    print(f"\nWrote {result['out']}/report.md, grid.png, plot.png, results.csv")
    return 0


def demo(out: str = "samples/demo", quick: bool = False, seed: int = 0, scales=SCALES, n_prompts: int | None = None,
         images_per_prompt: int | None = None, iterations: int | None = None) -> dict:
    """Run the demo; returns ``{"rows": [...], "table": str, "out": Path}``."""
    from flowalign import rewards, shapes
    from flowalign.pipelines import RLGStableDiffusion3Pipeline
    from flowalign.tiny import EVAL_CFG, generate, load_base_pipeline
    from flowalign.eval import diversity
    from flowalign.trainer import ACFlowConfig, ACFlowTrainer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps, cfg_scale = (8, EVAL_CFG) if quick else (20, EVAL_CFG)  # the base model card's CFG
    n_prompts = n_prompts or (6 if quick else 48)
    k = images_per_prompt or (2 if quick else 4)
    timings = {}

    # 1. AC-Flow fine-tuning of a LoRA.
    t0 = time.perf_counter()
    training = dict(QUICK_TRAINING if quick else DEMO_TRAINING, seed=seed, output_dir=str(out / "acflow_run"))
    if iterations:
        training["iterations"] = iterations
    trainer = ACFlowTrainer(ACFlowConfig(**training))
    print(f"[1/3] AC-Flow fine-tuning: {training['iterations']} iterations of "
          f"{training['prompts_per_iteration'] * training['images_per_prompt']} images")
    trainer.train()
    lora_dir = trainer.save_checkpoint()
    timings["fine-tune"] = time.perf_counter() - t0

    # 2. RLG sweep over w, same seeds for every w.
    t0 = time.perf_counter()
    pipe = RLGStableDiffusion3Pipeline.from_pipe(load_base_pipeline())
    pipe.set_progress_bar_config(disable=True)
    pipe.load_finetuned(lora_dir)
    base_prompts = shapes.heldout_prompts(n_prompts, seed=seed)
    prompts = [p for p in base_prompts for _ in range(k)]
    groups = [i for i in range(len(base_prompts)) for _ in range(k)]
    train_reward, unseen = rewards.load("shapes"), {"verifier (binary)": rewards.load("shapes_binary"),
                                                      "JPEG size (kB)": rewards.load("jpeg_incompressibility")}
    rows, images_by_scale, per_image = [], {}, {}
    from tqdm.auto import tqdm

    for w in tqdm(list(scales), desc="[2/3] RLG sweep"):
        images = generate(pipe, prompts, seed=seed, steps=steps, cfg=cfg_scale, progress=False, rlg_scale=float(w))
        images_by_scale[w] = images
        per_image[w] = train_reward(images, prompts).flatten().float()
        row = {"rlg_scale": w, "reward (verifier, dense)": per_image[w].mean().item()}
        for name, r in unseen.items():
            row[name] = r(images, prompts).mean().item()
        row["diversity"] = diversity(images, groups)
        rows.append(row)
    timings["rlg sweep"] = time.perf_counter() - t0

    # 3. Outputs: results.csv, grid.png, plot.png, report.md.
    t0 = time.perf_counter()
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _grid(images_by_scale, base_prompts, k, out / "grid.png")
    _plot(rows, out / "plot.png")
    table = _table(rows)
    timings["report"] = time.perf_counter() - t0
    settings = {"quick": quick, "seed": seed, "scales": list(scales), "held_out_prompts": n_prompts,
                "images_per_prompt": k, "steps": steps, "cfg": cfg_scale, "training": training,
                "seconds": {name: round(v, 1) for name, v in timings.items()}}
    (out / "settings.json").write_text(json.dumps(settings, indent=1))
    reading = trade_off_reading(per_image)
    _report(out / "report.md", table, settings, rows, reading)
    return {"rows": rows, "table": table, "out": out, "settings": settings, "reading": reading}


def trade_off_reading(per_image: dict[float, torch.Tensor]) -> dict:
    """What the sweep says about the training reward between w = 0 and w = 1, noise included.

    ``per_image[w]`` holds the training reward of every image at scale w (the same seeds and prompts at every w,
    so differences are paired). Returns ``non_decreasing`` (over the swept scales in [0, 1]), and the change from
    w = 0 to w = 1: ``n`` (paired images), ``delta`` (mean of the per-image differences), ``se`` (their standard
    error, std / sqrt(n)) and ``beyond_noise`` (|delta| > 2 se).

    Example: ``trade_off_reading({0.0: tensor([0., 0.]), 1.0: tensor([1., 0.])})`` -> delta 0.5, se 0.5.
    """
    inside = sorted(w for w in per_image if 0.0 <= w <= 1.0)
    means = [per_image[w].mean().item() for w in inside]
    reading = {"scales": inside, "non_decreasing": all(b >= a for a, b in zip(means, means[1:]))}
    if 0.0 in per_image and 1.0 in per_image:
        d = (per_image[1.0] - per_image[0.0]).double()
        se = d.std().item() / d.numel() ** 0.5 if d.numel() > 1 else float("nan")
        reading.update(n=d.numel(), delta=d.mean().item(), se=se, beyond_noise=abs(d.mean().item()) > 2 * se)
    return reading


def _grid(images_by_scale: dict, prompts: list[str], k: int, path: Path, max_rows: int = 8) -> None:
    """Rows prompts (first image of each), columns scales, 4x nearest upscaling, scale labels on top."""
    from PIL import Image, ImageDraw

    scales = list(images_by_scale)
    rows = prompts[:max_rows]
    cell, pad, top = 128, 4, 18
    grid = Image.new("RGB", (len(scales) * (cell + pad) + pad, top + len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for j, w in enumerate(scales):
        draw.text((pad + j * (cell + pad) + cell // 2 - 14, 3), f"w = {w:g}", fill="black")
        for i in range(len(rows)):
            img = images_by_scale[w][i * k]
            pil = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
            grid.paste(pil.resize((cell, cell), Image.NEAREST), (pad + j * (cell + pad), top + pad + i * (cell + pad)))
    grid.save(path)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in rows[0] if k != "rlg_scale"]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3))
    xs = [r["rlg_scale"] for r in rows]
    for ax, key in zip(axes, keys):
        ax.plot(xs, [r[key] for r in rows], "o-")
        ax.axvline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("RLG scale w")
        ax.set_title(key, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---:|" * len(keys)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3f}" if k != "rlg_scale" else f"{r[k]:g}" for k in keys) + " |")
    return "\n".join(lines)


def describe_reading(reading: dict) -> str:
    """One sentence for :func:`trade_off_reading`'s result (the report and the console print it)."""
    scales = ", ".join(f"{w:g}" for w in reading["scales"])
    text = f"The training reward is {'' if reading['non_decreasing'] else 'not '}non-decreasing over w = {scales}"
    if "delta" not in reading:
        return text + "."
    return text + (f"; from w = 0 to w = 1 it changes by {reading['delta']:+.3f} ± {reading['se']:.3f} (paired "
                   f"standard error over {reading['n']} images, the same prompts and seeds at every w): "
                   + ("more than two standard errors." if reading["beyond_noise"] else
                      "within two standard errors, so this sweep does not show a real change."))


def _report(path: Path, table: str, settings: dict, rows: list[dict], reading: dict) -> None:
    base, ft = rows[0], next((r for r in rows if r["rlg_scale"] == 1.0), rows[-1])
    trend = describe_reading(reading)
    text = f"""# flowalign demo report

AC-Flow fine-tuned a LoRA of the embedded tiny SD3 base model on the dense shapes-verifier reward
({settings['training']['iterations']} iterations of {settings['training']['prompts_per_iteration']} prompts x
{settings['training']['images_per_prompt']} images). Then RLG sampled {settings['held_out_prompts']} held-out prompts x
{settings['images_per_prompt']} seeds at each scale w ({settings['steps']} Euler steps, CFG {settings['cfg']}, seed
{settings['seed']}): w = 0 is the base model, w = 1 the fine-tuned one, w > 1 extrapolates.

![grid](grid.png)

![plot](plot.png)

{table}

From w = 0 to w = 1 the training reward goes from {base['reward (verifier, dense)']:.3f} to
{ft['reward (verifier, dense)']:.3f} and diversity from {base['diversity']:.3f} to {ft['diversity']:.3f}.
{trend}
"Verifier (binary)" is the fraction of images whose every constraint holds (not trained on);
"JPEG size" is an unseen, prompt-free reward. Timings (s): {settings['seconds']}.
Reproduce: `flowalign demo{' --quick' if settings['quick'] else ''} --seed {settings['seed']}`.
"""
    path.write_text(text)
