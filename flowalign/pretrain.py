"""Pretrain the tiny SD3 base model on the shapes world (``flowalign pretrain``).

Plain rectified-flow / flow-matching training of the ``SD3Transformer2DModel`` of
``flowalign.tiny``, the text encoders frozen at their random initialisation (their prompt
embeddings are computed once and cached), the lossless VAE fixed:

    x0 = vae.encode(image)                 # exact, normalised by the VAE's shift / scale
    u  ~ sigmoid(N(mean, std))             # SD3's logit-normal noise levels ...
    s  = k u / (1 + (k - 1) u)             # ... shifted like the sampler's grid (k = noise_shift)
    x_s = (1 - s) x0 + s eps               # eps ~ N(0, I)
    L  = || v_theta(x_s, 1000 s, c) - (eps - x0) ||^2
    c  = "" with probability cfg_dropout   # so classifier-free guidance works

Weights are averaged (EMA) and the EMA copy is what gets saved. The run is budgeted in
wall-clock minutes, checkpoints every few minutes and resumes with ``--resume``; the checkpoint
is a plain state file (``flowalign.checkpoints.save_state``, read back with ``weights_only=True``)
and the output folder is swapped in whole (``flowalign.checkpoints.atomic_write_dir``).
The output is a stock diffusers ``StableDiffusion3Pipeline`` folder plus ``training_log.json``;
unless ``--no-eval``, it is then evaluated with ``flowalign.shapes_eval.evaluate`` and a model card
(``README.md``, ``write_model_card``) with the command, seed and per-family accuracies is written next to it.

Example (the command that made the embedded model is in its model card)::

    flowalign pretrain --out flowalign/assets/tiny-sd3-shapes --seed 0 --threads 2 --minutes 42 --lr 2e-3
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flowalign import shapes
from flowalign.checkpoints import atomic_write_dir, load_state, save_state
from flowalign.objectives import sample_sigmas
from flowalign.shapes_eval import evaluate, format_accuracy_table
from flowalign.tiny import EVAL_CFG, EVAL_STEPS, build_tiny_sd3_pipeline, encode_prompts, load_base_pipeline


@dataclass
class PretrainConfig:
    """Every knob of the pretraining run, with the defaults used for the embedded model."""

    out: str = "flowalign/assets/tiny-sd3-shapes"  # output pipeline folder
    seed: int = 0  # seeds the weights, the data set and the noise
    minutes: float = 40.0  # wall-clock budget of the optimisation loop
    max_steps: int = 1_000_000  # stop earlier if reached
    batch_size: int = 64
    lr: float = 1e-3  # AdamW peak learning rate (linear warm-up, cosine decay to 10% over the budget)
    warmup_steps: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # the saved weights are the EMA
    cfg_dropout: float = 0.1  # probability of training on the empty prompt
    dataset_size: int = 50_000  # images pre-rendered once (re-used across epochs)
    logit_normal_mean: float = 0.0  # s = sigmoid(N(mean, std)); mean > 0 trains more at high noise
    logit_normal_std: float = 1.0
    noise_shift: float = 3.0  # s = k u / (1 + (k-1) u): train where the shift-k sampler spends its steps (1 = off)
    checkpoint_minutes: float = 5.0
    threads: int = 0  # torch threads; 0 = leave torch's default
    eval_prompts: int = 300  # held-out prompts for the model card (0 = skip)
    eval_steps: int = EVAL_STEPS  # the model card's sampling settings (flowalign.tiny)
    eval_cfg: float = EVAL_CFG
    resume: bool = False  # continue from `checkpoint` if it exists
    checkpoint: str = "runs/pretrain/checkpoint.pt"  # optimiser + EMA state, written every few minutes


def _lr_factor(step: int, warmup: int, progress: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def pretrain(cfg: PretrainConfig) -> Path:
    """Run the pretraining that ``cfg`` describes; returns the saved pipeline folder ``cfg.out``.

    Example::

        out = pretrain(PretrainConfig(out="runs/tiny", checkpoint="runs/tiny-ckpt.pt", minutes=1))
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_path = Path(cfg.checkpoint)
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    # 1. Data: pre-render the training images once, measure the latent normalisation.
    print(f"[pretrain] rendering {cfg.dataset_size} training images (seed {cfg.seed}) ...", flush=True)
    ds = shapes.ShapesDataset(cfg.dataset_size, seed=cfg.seed, split="train")
    images, prompt_ids, prompt_list, prompt_index = [], [], [], {}
    for i in tqdm(range(len(ds)), desc="render", mininterval=2.0):
        item = ds[i]
        images.append(item["image"])
        j = prompt_index.setdefault(item["prompt"], len(prompt_list))
        if j == len(prompt_list):
            prompt_list.append(item["prompt"])
        prompt_ids.append(j)
    pixels = torch.stack(images) * 2 - 1  # [-1, 1], as the VAE expects
    prompt_ids = torch.tensor(prompt_ids)
    shift, scale = pixels.mean().item(), 1.0 / pixels.std().item()

    # 2. Model: the tiny SD3 pipeline, its lossless VAE normalised for this data.
    pipe = build_tiny_sd3_pipeline(seed=cfg.seed, vae_shift=shift, vae_scale=scale)
    transformer, vae = pipe.transformer, pipe.vae
    with torch.no_grad():
        latents = torch.cat([
            (vae.encode(pixels[i : i + 1024]).latent_dist.mode() - shift) * scale
            for i in range(0, len(pixels), 1024)
        ])
    del pixels, images
    embeds, pooled = encode_prompts(pipe, prompt_list + [""])
    empty = len(prompt_list)  # index of the empty prompt
    print(
        f"[pretrain] {len(latents)} images, {len(prompt_list)} distinct prompts, latent shift {shift:.4f} "
        f"scale {scale:.4f}; transformer {sum(p.numel() for p in transformer.parameters()) / 1e6:.2f}M params",
        flush=True,
    )

    ema = copy.deepcopy(transformer).requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, elapsed_before, losses = 0, 0.0, []
    if cfg.resume and ckpt_path.exists():
        state = load_state(ckpt_path)
        transformer.load_state_dict(state["transformer"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["generator"])
        step, elapsed_before, losses = state["step"], state["elapsed"], state["losses"]
        print(f"[pretrain] resumed from {ckpt_path} at step {step}", flush=True)

    def save_checkpoint(elapsed: float) -> None:
        state = {
            "transformer": transformer.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "generator": gen.get_state(), "step": step, "elapsed": elapsed, "losses": losses,
            "config": asdict(cfg),
        }
        save_state(ckpt_path, state)

    # 3. Flow-matching training loop, budgeted in wall-clock minutes.
    budget = cfg.minutes * 60.0
    start, last_ckpt = time.time() - elapsed_before, time.time()
    bar = tqdm(total=int(budget), desc="pretrain (s)", unit="s", mininterval=5.0, initial=int(elapsed_before))
    transformer.train()
    running = None
    while step < cfg.max_steps and (elapsed := time.time() - start) < budget:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg.warmup_steps, elapsed / budget)
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        x0 = latents[idx]
        pid = prompt_ids[idx].clone()
        pid[torch.rand(cfg.batch_size, generator=gen) < cfg.cfg_dropout] = empty  # CFG dropout
        s = sample_sigmas(cfg.batch_size, generator=gen, mean=cfg.logit_normal_mean, std=cfg.logit_normal_std,
                          shift=cfg.noise_shift)  # u ~ sigmoid(N(mean, std)); s = k u / (1 + (k-1) u)
        eps = torch.randn(x0.shape, generator=gen)
        x_s = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps  # x_s = (1 - s) x0 + s eps
        v = transformer(
            hidden_states=x_s, timestep=s * 1000, encoder_hidden_states=embeds[pid],
            pooled_projections=pooled[pid], return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(v, eps - x0)  # target velocity eps - x0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), cfg.grad_clip)
        opt.step()
        with torch.no_grad():  # EMA of the weights, warmed up: decay min(d, (1+n)/(10+n))
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            for pe_, p in zip(ema.parameters(), transformer.parameters()):
                pe_.lerp_(p, 1 - d)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            losses.append((step, round(time.time() - start, 1), running))
            bar.set_postfix(step=step, loss=f"{running:.4f}")
        bar.update(int(time.time() - start) - bar.n)
        if time.time() - last_ckpt > cfg.checkpoint_minutes * 60:
            save_checkpoint(time.time() - start)
            last_ckpt = time.time()
    bar.close()
    elapsed = time.time() - start
    save_checkpoint(elapsed)

    # 4. Save the EMA weights as a stock pipeline folder.
    pipe.transformer = ema.eval()
    log = {"config": asdict(cfg), "steps": step, "train_seconds": round(elapsed, 1), "latent_shift": shift,
           "latent_scale": scale, "num_train_prompts": len(prompt_list), "loss_curve": losses}

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp)
        (tmp / "training_log.json").write_text(json.dumps(log, indent=1))

    atomic_write_dir(out, write)
    print(f"[pretrain] {step} steps in {elapsed / 60:.1f} min; saved {out}", flush=True)
    return out


def write_model_card(folder: str | os.PathLike, result: dict, command: str | None = None) -> Path:
    """Write ``README.md`` (the model card) and ``eval.json`` into a pretrained pipeline folder.

    ``result`` is a ``flowalign.shapes_eval.evaluate`` result; the training facts come from the folder's
    ``training_log.json`` (written by ``pretrain``); ``command`` is the command line that made it.

    Example::

        out = pretrain(PretrainConfig(out="runs/tiny", minutes=1))
        write_model_card(out, evaluate(load_base_pipeline(out), n_prompts=60), command="flowalign pretrain ...")
    """
    folder = Path(folder)
    log = json.loads((folder / "training_log.json").read_text()) if (folder / "training_log.json").exists() else {}
    cfg = log.get("config", {})
    text = f"""# tiny-sd3-shapes: the embedded base model of flowalign

A tiny `StableDiffusion3Pipeline` (stock diffusers format) pretrained from scratch on the
procedural shapes world of `flowalign.shapes`, made by `flowalign.pretrain`. It exists so that
every feature of flowalign runs and is tested on a CPU with no download.

- Transformer: `SD3Transformer2DModel`, {log.get('num_params', '2.3M')} parameters (4 joint blocks, width 128,
  patch 4 on 3x32x32 latents). Text: two random, frozen 64-wide CLIP text encoders with the real
  CLIP BPE tokenizer (padded to 16 tokens), no T5. VAE: a lossless hand-set `AutoencoderKL`
  (`flowalign.tiny.build_lossless_vae`), latent shift {log.get('latent_shift', float('nan')):.4f}, scale
  {log.get('latent_scale', float('nan')):.4f}. Scheduler: `FlowMatchEulerDiscreteScheduler`, shift 3.0.
- Training: flow matching, logit-normal noise levels (mean {cfg.get('logit_normal_mean')}, std
  {cfg.get('logit_normal_std')}) shifted like the sampler's grid (shift {cfg.get('noise_shift', 1.0)}), CFG dropout
  {cfg.get('cfg_dropout')}, AdamW lr {cfg.get('lr')} (warm-up, cosine to 10%),
  batch {cfg.get('batch_size')}, EMA {cfg.get('ema_decay')}; {log.get('steps')} steps in
  {log.get('train_seconds', 0) / 60:.1f} minutes, seed {cfg.get('seed')}, on {torch.get_num_threads()} CPU threads.
- Command: `{command or 'flowalign pretrain --out ' + str(cfg.get('out', folder))}`

Load it with stock diffusers (T5 absent, one zero T5 token):

```python
from diffusers import StableDiffusion3Pipeline
pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
image = pipe("a photo of a red circle", guidance_scale={result['cfg']}, num_inference_steps={result['steps']},
             max_sequence_length=1).images[0]
```

## Held-out accuracy (shapes verifier)

{result['n_prompts']} held-out prompts (`flowalign.shapes.heldout_prompts(n, seed={result['seed']})`), one image
each, {result['steps']} Euler steps, CFG {result['cfg']}. Reproduce with
`flowalign eval --n-prompts {result['n_prompts']} --seed {result['seed']} --steps {result['steps']} --cfg {result['cfg']}`.

{format_accuracy_table(result)}
"""
    path = folder / "README.md"
    path.write_text(text)
    (folder / "eval.json").write_text(json.dumps(result, indent=1))
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(PretrainConfig):
        if f.type in ("bool", bool):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", default=f.default)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default, help=f"(default {f.default})")
    parser.add_argument("--no-eval", action="store_true", help="Skip the evaluation and the model card.")


def run(args: argparse.Namespace) -> int:
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    out = pretrain(cfg)
    if not args.no_eval and cfg.eval_prompts:
        pipe = load_base_pipeline(out)
        result = evaluate(pipe, n_prompts=cfg.eval_prompts, seed=0, steps=cfg.eval_steps, cfg=cfg.eval_cfg)
        command = "flowalign pretrain " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["pretrain"] else None
        write_model_card(out, result, command=command)
        print(json.dumps(result, indent=1))
    return 0
