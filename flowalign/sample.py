"""``flowalign sample``: images at several RLG scales, a grid, and the settings to reproduce each one.

For every (prompt, scale, seed) it writes one PNG, then ``grid.png`` (one row per prompt and seed,
one column per scale, tiled by diffusers' ``make_image_grid``) and ``metadata.jsonl`` (one JSON object
per image: file, prompt, scale, seed, steps, cfg, base, finetuned, sampler, mode, height, width, ...).

Example::

    flowalign sample --base stabilityai/stable-diffusion-3.5-medium --finetuned flow-grpo-lora/ \\
        --prompts prompts.txt --scales 0 0.5 1 1.5 2 --cfg 4.5 --steps 28 --seed 0 --out samples/

With no ``--base`` the embedded tiny base model (``flowalign.tiny.load_base_pipeline``) is used.
All scales of a prompt batch are drawn in ONE pipeline call (``rlg_sweep=scales``): the same initial
noise at every scale, w = 0 and w = 1 at the cost of one model, the rows of every scale batched into
one forward per model and step (``--max-rows`` bounds the rows of one forward).
Each image depends only on its own (prompt, scale, seed), not on the batch it was drawn in:
``pipe(prompt, rlg_scale=scale, generator=torch.Generator(device).manual_seed(seed), ...)`` reproduces it
(to float rounding of the batching).

``--compile`` samples with ``pipe.enable_compile()``: the transformer, the RLG mix and the SDE step under
``torch.compile`` (the first batch compiles; the images equal eager ones to float rounding).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from tqdm.auto import tqdm

from flowalign import tiny
from flowalign.checkpoints import resolve_checkpoint
from flowalign.pipelines import (
    RLG_MODES,
    SAMPLERS,
    RLGStableDiffusion3Pipeline,
    check_rlg_sweep,
    check_sampler,
    get_rlg_mode,
)
from flowalign.prompts import read_prompt_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base", default=None, help="Base SD3 pipeline: a folder or hub id (default: the embedded tiny base model)."
    )
    parser.add_argument(
        "--finetuned",
        required=True,
        help="Fine-tuned model: PEFT adapter folder, diffusers LoRA file/folder, transformer folder, or a flowalign "
        "training run (its output_dir, checkpoints/latest or a checkpoint folder).",
    )
    parser.add_argument(
        "--prompts",
        nargs="+",
        required=True,
        help="Prompt texts, or text files with one prompt per line (blank lines and '#' lines skipped).",
    )
    parser.add_argument(
        "--scales",
        nargs="+",
        type=float,
        default=[0.0, 0.5, 1.0, 1.5, 2.0],
        help="RLG scales w (0 = base, 1 = fine-tuned, >1 extrapolates). Default: 0 0.5 1 1.5 2.",
    )
    parser.add_argument("--cfg", type=float, default=4.5, help="Classifier-free guidance scale (default 4.5).")
    parser.add_argument("--steps", type=int, default=28, help="Sampling steps (default 28).")
    parser.add_argument("--seed", nargs="+", type=int, default=[0], help="One or more seeds (default 0).")
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument(
        "--mode",
        default="exact",
        choices=RLG_MODES,
        help="RLG evaluation mode (default exact; lora_scaled / shared_uncond are approximations).",
    )
    parser.add_argument(
        "--sampler",
        default="euler",
        choices=[*SAMPLERS, "ode"],
        help="euler: the Euler ODE sampler (default); sde: the Flow-GRPO SDE ('ode': deprecated name of euler).",
    )
    parser.add_argument("--sde-noise-level", type=float, default=0.7, help="SDE noise level a (default 0.7).")
    parser.add_argument("--negative-prompt", default="", help="Negative prompt for CFG (default empty).")
    parser.add_argument("--height", type=int, default=None, help="Image height (default: the model's).")
    parser.add_argument("--width", type=int, default=None, help="Image width (default: the model's).")
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        default=None,
        help="T5 tokens; default 256, or 1 when the pipeline has no T5 encoder (the tiny models).",
    )
    parser.add_argument(
        "--batch-size", type=int, default=8, help="Prompts per pipeline call, each at every scale (default 8)."
    )
    parser.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="Memory bound: the most rows (images x CFG branches x models) one transformer forward takes "
        "(default: no bound).",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Run the transformer, the RLG mix and the SDE step under torch.compile (the first batch compiles).",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        choices=["inductor", "aot_eager", "eager"],
        help="torch.compile backend of --compile (default inductor).",
    )
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="Default: bfloat16 on cuda, float32 on cpu."
    )


def read_prompts(items: list[str]) -> list[str]:
    """Each item is a prompt file (one prompt per line) if such a file exists, else a prompt text."""
    prompts: list[str] = []
    for item in items:
        if Path(item).is_file():
            prompts.extend(read_prompt_file(item))
        else:
            prompts.append(item)
    if not prompts:
        raise SystemExit(f"flowalign sample: no prompts found in {items}.")
    return prompts


def _slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:length] or "prompt"


def _load_pipeline(base: str | None, device: str, dtype: torch.dtype):
    stock = (
        tiny.load_base_pipeline(device=device, dtype=dtype) if base is None else tiny.load_pipeline(base, device, dtype)
    )
    pipe = RLGStableDiffusion3Pipeline(**stock.components)  # the same modules, no copy
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _settings(args: argparse.Namespace, pipe, device: str, dtype_name: str) -> dict:
    """What every image of the run shares, as ``metadata.jsonl`` records it (the call's settings included)."""
    return {
        "steps": args.steps,
        "cfg": args.cfg,
        "base": args.base or "flowalign:embedded-tiny-base",
        "finetuned": str(args.finetuned),
        "sampler": args.sampler,
        "mode": args.mode,
        "exact": get_rlg_mode(args.mode).exact,
        "sde_noise_level": args.sde_noise_level if args.sampler == "sde" else None,
        "negative_prompt": args.negative_prompt,
        "height": args.height or pipe.default_sample_size * pipe.vae_scale_factor,
        "width": args.width or pipe.default_sample_size * pipe.vae_scale_factor,
        "max_sequence_length": args.max_sequence_length
        or (tiny.MAX_SEQUENCE_LENGTH if pipe.text_encoder_3 is None else 256),
        "device": str(device),
        "dtype": dtype_name,
        "compile": args.compile_backend if args.compile else None,
    }


def run(args: argparse.Namespace) -> int:
    """``flowalign sample``: check the arguments, load the pipeline, draw every (prompt, scale, seed), write the files.

    Example: ``flowalign sample --finetuned runs/acflow --prompts "a red circle" --scales 0 1 2 --out samples/``.
    """
    args.sampler = check_sampler(args.sampler, argument="--sampler")  # "ode" -> "euler", with a FutureWarning
    try:
        check_rlg_sweep(args.scales)  # the pipeline's own check of a sweep (finite numbers, not empty)
    except (TypeError, ValueError) as error:
        raise SystemExit(f"flowalign sample: --scales: {error}") from None
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit("flowalign sample: --steps and --batch-size must be >= 1.")
    if args.max_rows is not None and args.max_rows < 1:
        raise SystemExit(f"flowalign sample: --max-rows must be >= 1, got {args.max_rows}.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
    prompts = read_prompts(args.prompts)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)

    pipe = _load_pipeline(args.base, device, DTYPES[dtype_name])
    pipe.load_finetuned(resolve_checkpoint(args.finetuned), mode=args.mode)
    if args.compile:
        pipe.enable_compile(backend=args.compile_backend)
    settings = _settings(args, pipe, device, dtype_name)

    images: dict[tuple[int, int, int], object] = {}  # (prompt index, seed index, scale index) -> PIL image
    records = []
    total = len(prompts) * len(args.scales) * len(args.seed)
    with tqdm(total=total, desc="flowalign sample", unit="img") as bar:
        for s, seed in enumerate(args.seed):
            for start in range(0, len(prompts), args.batch_size):
                batch = prompts[start : start + args.batch_size]
                # One generator per image: each image is reproducible on its own; the sweep reuses its noise.
                generators = [torch.Generator(device).manual_seed(seed) for _ in batch]
                result = pipe(
                    prompt=batch,
                    negative_prompt=[args.negative_prompt] * len(batch),
                    rlg_sweep=list(args.scales),
                    rlg_max_rows=args.max_rows,
                    num_inference_steps=args.steps,
                    guidance_scale=args.cfg,
                    height=settings["height"],
                    width=settings["width"],
                    generator=generators,
                    max_sequence_length=settings["max_sequence_length"],
                    sampler=args.sampler,
                    sde_noise_level=args.sde_noise_level,
                )
                for j, scale in enumerate(args.scales):
                    # images of scale j: the j-th block of len(batch) images
                    block = result.images[j * len(batch) : (j + 1) * len(batch)]
                    for k, (prompt, image) in enumerate(zip(batch, block, strict=True)):
                        i = start + k
                        name = f"images/p{i:03d}_{_slug(prompt)}_w{scale:g}_seed{seed}.png"
                        image.save(out / name)
                        images[(i, s, j)] = image
                        position = {"grid_row": i * len(args.seed) + s, "grid_col": j}
                        records.append(
                            {"file": name, "prompt": prompt, "scale": scale, "seed": seed, **settings, **position}
                        )
                bar.update(len(batch) * len(args.scales))

    rows = [(i, s) for i in range(len(prompts)) for s in range(len(args.seed))]
    cells = [images[(i, s, j)] for i, s in rows for j in range(len(args.scales))]
    # every cell is an RGB image of one size and the grid has exactly rows x cols of them: no background shows
    make_image_grid(cells, rows=len(rows), cols=len(args.scales)).save(out / "grid.png")
    records.sort(key=lambda r: (r["grid_row"], r["grid_col"]))
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    print(
        f"Wrote {len(records)} images, grid.png ({len(rows)} rows x {len(args.scales)} scales) and metadata.jsonl to {out}"
    )
    return 0
