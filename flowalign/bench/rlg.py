"""``flowalign bench rlg``: the cost of RLG sampling against stock CFG sampling, in one process.

Variants (all: CFG, same prompts, steps and seed; RLG at ``--scale``):

- ``stock_cfg``: the stock ``StableDiffusion3Pipeline`` on the base model (2 evaluations per step): a transformer
  without any LoRA layer (the RLG pipeline holds its own copy, which carries the LoRA).
- ``stock_cfg_finetuned``: the stock pipeline on the fine-tuned model (the RLG pipeline's transformer: base + LoRA,
  the LoRA active as it is outside RLG calls), for reference; its images are RLG's at w = 1.
- ``rlg_exact``: ``RLGStableDiffusion3Pipeline`` in its default exact mode (4 evaluations per step).
- ``rlg_exact_<other>``: the other exact evaluation(s), to show why ``exact`` picks what it picks.
- ``rlg_lora_scaled`` / ``rlg_shared_uncond``: the approximate modes (2 / 3 evaluations per step).
- ``reference_loop``: what the public reference does: the transformer wrapped in a ``PeftModel``, two
  sequential calls per step on the CFG-doubled batch (LoRA on, then off via ``disable_adapter()``),
  and the Flow-GRPO SDE step with its log-probability computed and discarded (noise level 0: the
  deterministic evaluation setting, so its images can be checked against ``rlg_exact``).
- ``rlg_sweep``: the scales of ``--sweep`` (default 0, 0.5, 1, 1.5, 2) in ONE call (``rlg_sweep=``):
  the same initial noise at every scale, w = 0 / w = 1 rows running one model only, all rows batched
  into one forward per step.
- ``reference_loop_sweep``: the same scales with ``reference_loop``, scale by scale (what a user of the
  reference does to pick w). ``sweep_vs_reference`` = median(``rlg_sweep``) / median(this).
- with ``--compile``: ``rlg_exact_compiled`` and ``rlg_sde_compiled``, an RLG pipeline of its own (a copy of
  the transformer with the same LoRA) after ``enable_compile()`` (``--compile-backend``, default inductor),
  against ``rlg_exact`` and ``rlg_sde`` (eager, the Flow-GRPO SDE at noise level 0.7) on the same noise.
  The report's ``compiled`` section gives, per pair, the max abs pixel difference, the speed ratio
  median(eager) / median(compiled) and the seconds of the first compiled call (compilation; the warm-up,
  excluded from the medians).

Variants run round-robin (one call of each per repeat) after a warm-up, so machine noise hits all
alike; the JSON reports median wall times, ratios to ``stock_cfg`` and, for each RLG variant, the
max abs pixel difference to ``rlg_exact`` (0 up to float noise for exact variants; the
approximation error otherwise).

``--model tiny`` (default) uses the embedded tiny base model (a random tiny SD3 if it is absent);
``--model sd3-random`` builds an SD3-medium-sized transformer with random weights (for a GPU, bf16)
and feeds random prompt embeddings (the text encoders are not timed there).

Example: ``flowalign bench rlg --json --repeats 5 --steps 10 --batch 4 --sweep 0 0.5 1 1.5 2``
(``--compile`` adds the compiled pipeline).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import PeftModel

from flowalign import tiny
from flowalign.pipelines import RLGStableDiffusion3Pipeline, check_rlg_sweep
from flowalign.pipelines.guidance import classifier_free_guidance
from flowalign.pipelines.lora_utils import add_random_lora, save_peft_adapter
from flowalign.pipelines.rlg_modes import get_rlg_mode
from flowalign.sampling import sde_step

SWEEP = (0.0, 0.5, 1.0, 1.5, 2.0)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPTS = [
    "a photo of a red circle",
    "a photo of two squares",
    "a photo of a blue triangle and a green square",
    "a photo of a circle above a triangle",
]

# SD3-medium (2B) transformer; latents 16 x 128 x 128 at 1024 px; prompt embeddings 77 CLIP + 256 T5 tokens.
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed calls per variant (default 5).")
    parser.add_argument("--steps", type=int, default=10, help="Sampling steps per call (default 10).")
    parser.add_argument("--batch", type=int, default=4, help="Images per call (default 4).")
    parser.add_argument("--scale", type=float, default=1.5, help="RLG scale w (default 1.5).")
    parser.add_argument("--cfg", type=float, default=4.5, help="CFG scale (default 4.5).")
    parser.add_argument(
        "--sweep",
        type=float,
        nargs="+",
        default=list(SWEEP),
        help="Scales of the sweep variants (default 0 0.5 1 1.5 2).",
    )
    parser.add_argument(
        "--max-rows", type=int, default=None, help="rlg_max_rows of the sweep (rows per forward; default: no bound)."
    )
    parser.add_argument("--lora-rank", type=int, default=32, help="Rank of the random LoRA (Flow-GRPO: 32).")
    parser.add_argument("--model", choices=["tiny", "sd3-random"], default="tiny")
    parser.add_argument("--layers", type=int, default=None, help="sd3-random: override the number of layers.")
    parser.add_argument("--resolution", type=int, default=1024, help="sd3-random: image size (default 1024).")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="Also time RLG under torch.compile (enable_compile) against eager, Euler and SDE: max abs difference, "
        "speed ratio and compile time.",
    )
    parser.add_argument(
        "--compile-backend",
        default="inductor",
        choices=["inductor", "aot_eager", "eager"],
        help="torch.compile backend of --compile (default inductor; aot_eager / eager only trace, for checks).",
    )
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument(
        "--dtype", default=None, choices=sorted(DTYPES), help="Default: bfloat16 on cuda, else float32."
    )


# ------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------
def _tiny_pipeline(device, dtype):
    try:
        return tiny.load_base_pipeline(device=device, dtype=dtype), "embedded tiny base model"
    except FileNotFoundError:
        pipe = tiny.build_tiny_sd3_pipeline(seed=0).to(device=device, dtype=dtype)
        return pipe, "random tiny SD3 (embedded base model not found)"


def _sd3_random_pipeline(device, dtype, layers, resolution):
    """An SD3-medium-sized transformer (random weights) inside a pipeline with tiny text encoders / VAE stand-ins."""
    config = dict(SD3_MEDIUM, num_layers=layers or SD3_MEDIUM["num_layers"])
    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config).to(dtype)
    # A VAE with SD3's latent layout (16 channels, 8x downsampling) at toy width; not timed (latents are returned).
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    components = {
        **tiny.build_tiny_sd3_pipeline(seed=0, num_layers=1).components,
        "transformer": transformer,
        "vae": vae,
    }
    pipe = StableDiffusion3Pipeline(**components).to(device=device, dtype=dtype)
    return pipe, f"SD3-medium-sized transformer ({config['num_layers']} layers), random weights, {resolution}px"


def _call_kwargs(args, pipe, device, dtype, scale_kwargs=True):
    """Inputs shared by all variants; sd3-random feeds random prompt embeddings and returns latents."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.cfg)
    if args.model == "tiny":
        return dict(kw, prompt=prompts, max_sequence_length=tiny.MAX_SEQUENCE_LENGTH, output_type="np")
    g = torch.Generator(device).manual_seed(1)
    emb = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)
    seq, width, pooled = 77 + 256, SD3_MEDIUM["joint_attention_dim"], SD3_MEDIUM["pooled_projection_dim"]
    return dict(
        kw,
        prompt_embeds=emb(args.batch, seq, width),
        negative_prompt_embeds=emb(args.batch, seq, width),
        pooled_prompt_embeds=emb(args.batch, pooled),
        negative_pooled_prompt_embeds=emb(args.batch, pooled),
        height=args.resolution,
        width=args.resolution,
        output_type="latent",
    )


# ------------------------------------------------------------------------------------------------
# The reference-style loop
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_loop(pipe, peft_model, call_kwargs: dict, rlg_scale: float, generator: torch.Generator):
    """Two sequential transformer calls per step (LoRA on, then off), RLG mix, CFG, SDE step with log-prob."""
    device = pipe._execution_device
    cfg = call_kwargs["guidance_scale"]
    if "prompt" in call_kwargs:
        pe, npe, ppe, nppe = pipe.encode_prompt(
            prompt=call_kwargs["prompt"],
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=True,
            max_sequence_length=call_kwargs["max_sequence_length"],
        )
        height = width = pipe.default_sample_size * pipe.vae_scale_factor
    else:
        pe, npe = call_kwargs["prompt_embeds"], call_kwargs["negative_prompt_embeds"]
        ppe, nppe = call_kwargs["pooled_prompt_embeds"], call_kwargs["negative_pooled_prompt_embeds"]
        height, width = call_kwargs["height"], call_kwargs["width"]
    emb, pooled = torch.cat([npe, pe]), torch.cat([nppe, ppe])
    n = pe.shape[0]
    latents = pipe.prepare_latents(n, pipe.transformer.config.in_channels, height, width, pe.dtype, device, generator)
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(call_kwargs["num_inference_steps"], device=device)
    sigmas = scheduler.sigmas
    for i, t in enumerate(scheduler.timesteps):
        x = torch.cat([latents, latents])
        inputs = dict(
            hidden_states=x,
            timestep=t.expand(2 * n),
            encoder_hidden_states=emb,
            pooled_projections=pooled,
            return_dict=False,
        )
        v_ft = peft_model(**inputs)[0]
        with peft_model.disable_adapter():
            v_base = peft_model(**inputs)[0]
        v = v_base + rlg_scale * (v_ft - v_base)  # the reference's RLG formula, written out
        v_uncond, v_cond = v.chunk(2)
        v = classifier_free_guidance(v_uncond, v_cond, cfg)
        latents, log_prob, _, _ = sde_step(latents, v, sigmas[i], sigmas[i + 1], noise_level=0.0)
        del log_prob  # computed and discarded
    if call_kwargs["output_type"] == "latent":
        return latents
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor, return_dict=False)[
        0
    ]
    return pipe.image_processor.postprocess(image, output_type=call_kwargs["output_type"])


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
def _as_numpy(output) -> np.ndarray:
    images = output.images if hasattr(output, "images") else output
    if isinstance(images, torch.Tensor):
        return images.float().cpu().numpy()
    return np.asarray(images, dtype=np.float32)


def _models(args: argparse.Namespace, device: str, dtype: torch.dtype) -> SimpleNamespace:
    """The pipelines every variant runs: the stock one on the base model, the RLG one (its own copy of the base
    transformer, with a random Flow-GRPO-style LoRA: rank r, alpha 2r), the stock one on the fine-tuned model, the
    reference's ``PeftModel`` and, with ``--compile``, a compiled RLG pipeline."""
    if args.model == "tiny":
        pipe, model = _tiny_pipeline(device, dtype)
    else:
        pipe, model = _sd3_random_pipeline(device, dtype, args.layers, args.resolution)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.transformer
    tmp = tempfile.TemporaryDirectory(prefix="flowalign-bench-rlg-")
    lora_dir = Path(tmp.name) / "lora"  # the LoRA as a PEFT folder, as Flow-GRPO publishes it
    add_random_lora(base, "bench", rank=args.lora_rank, alpha=2 * args.lora_rank, seed=0, std=0.02)
    save_peft_adapter(base, "bench", lora_dir)
    base.unload_lora()

    def rlg_pipeline() -> RLGStableDiffusion3Pipeline:
        # A copy of the base transformer takes the LoRA: `pipe` (stock_cfg) keeps the base model itself, with no LoRA
        # layer (sharing it, the stock rows would run base + LoRA, i.e. RLG at w = 1); an in-place compile of the
        # compiled pipeline's copy does not reach the eager variants' modules either.
        rlg = RLGStableDiffusion3Pipeline(**{**pipe.components, "transformer": copy.deepcopy(base)})
        rlg.set_progress_bar_config(disable=True)
        rlg.load_finetuned(lora_dir)
        return rlg

    compiled_rlg = None
    if args.compile:
        compiled_rlg = rlg_pipeline()
        compiled_rlg.enable_compile(backend=args.compile_backend)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(lora_dir)).eval()  # as the reference loads it
    rlg = rlg_pipeline()
    # The stock pipeline on the fine-tuned model: the RLG pipeline's transformer, whose LoRA is active outside RLG calls.
    finetuned_pipe = StableDiffusion3Pipeline(**{**pipe.components, "transformer": rlg.transformer})
    finetuned_pipe.set_progress_bar_config(disable=True)
    tmp.cleanup()  # everything is loaded
    return SimpleNamespace(pipe=pipe, model=model, rlg=rlg, finetuned_pipe=finetuned_pipe, peft_model=peft_model,
                           compiled_rlg=compiled_rlg)  # fmt: skip


def _variants(args: argparse.Namespace, m: SimpleNamespace, call: dict, seed, sweep: list[float]) -> dict:
    """``{name: (call, exact, model evaluations per step)}``, in the order they run."""
    rlg, scale = m.rlg, args.scale
    exact_mode = rlg.rlg_transformer.resolved_mode

    def rlg_mode(mode: str):  # one RLG call in another evaluation mode; exact and evaluations: the mode's own
        run = lambda: rlg(**call, generator=seed(), rlg_scale=scale, rlg_mode=mode)  # noqa: E731
        return run, get_rlg_mode(mode).exact, get_rlg_mode(mode).evaluations

    variants = {
        "stock_cfg": (lambda: m.pipe(**call, generator=seed()), True, 2),
        "stock_cfg_finetuned": (lambda: m.finetuned_pipe(**call, generator=seed()), True, 2),
        "rlg_exact": (lambda: rlg(**call, generator=seed(), rlg_scale=scale), True, 4),
        **{f"rlg_{mode}": rlg_mode(mode) for mode in ("exact_batched", "exact_two_pass") if mode != exact_mode},
        # the approximations: 2 (lora_scaled) and 3 (shared_uncond) evaluations per step
        **{f"rlg_{mode}": rlg_mode(mode) for mode in ("lora_scaled", "shared_uncond")},
        "reference_loop": (lambda: reference_loop(m.pipe, m.peft_model, call, scale, seed()), True, 4),
        # one call for all scales; evaluations per step summed over the scales (2 at w = 0 or 1, else 4)
        "rlg_sweep": (
            lambda: rlg(**call, generator=seed(), rlg_sweep=sweep, rlg_max_rows=args.max_rows),
            True,
            sum(2 if w in (0.0, 1.0) else 4 for w in sweep),
        ),
        "reference_loop_sweep": (
            lambda: np.concatenate([_as_numpy(reference_loop(m.pipe, m.peft_model, call, w, seed())) for w in sweep]),
            True,
            4 * len(sweep),
        ),
    }
    if m.compiled_rlg is not None:  # eager -> compiled pairs (the same call, the same seed): see COMPILED_PAIRS
        sde = {"sampler": "sde", "sde_noise_level": 0.7}
        variants["rlg_sde"] = (lambda: rlg(**call, generator=seed(), rlg_scale=scale, **sde), True, 4)
        variants["rlg_exact_compiled"] = (lambda: m.compiled_rlg(**call, generator=seed(), rlg_scale=scale), True, 4)
        variants["rlg_sde_compiled"] = (lambda: m.compiled_rlg(**call, generator=seed(), rlg_scale=scale, **sde), True, 4)
    return variants


COMPILED_PAIRS = {"rlg_exact_compiled": "rlg_exact", "rlg_sde_compiled": "rlg_sde"}  # compiled variant -> eager one


def _measure(variants: dict, repeats: int, device: str, split: dict) -> tuple[dict, dict, dict]:
    """A warm-up call of every variant (its images; compiled variants compile here), then ``repeats`` rounds of one
    timed call each (round-robin, so machine noise hits all alike). ``split``: variants timed as the sum of their
    parts' calls. Returns ``(times, first-call times, images)``."""

    def timed(fn):
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, out

    outputs, first_call = {}, {}
    for name, (fn, _, _) in variants.items():
        first_call[name], out = timed(fn)
        outputs[name] = _as_numpy(out)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (fn, _, _) in variants.items():
            times[name].append(sum(timed(part)[0] for part in split[name]) if name in split else timed(fn)[0])
    return times, first_call, outputs


def _results(variants: dict, times: dict, outputs: dict) -> dict:
    """Per variant: median / min / all times, ratio to ``stock_cfg``, exactness, evaluations and its max abs pixel
    difference to ``rlg_exact`` (the sweep: to the reference loop run at each scale, the same seeds)."""
    stock = statistics.median(times["stock_cfg"])
    results = {}
    for name, (_, exact, evaluations) in variants.items():
        median = statistics.median(times[name])
        against = "reference_loop_sweep" if name == "rlg_sweep" else "rlg_exact"
        if name.startswith("stock") or name in ("reference_loop_sweep", "rlg_sde") or name in COMPILED_PAIRS:
            diff = None
        else:
            diff = float(np.abs(outputs[name] - outputs[against]).max())
        results[name] = {
            "median_s": round(median, 5),
            "min_s": round(min(times[name]), 5),
            "times_s": [round(t, 5) for t in times[name]],
            "ratio_vs_stock_cfg": round(median / stock, 3),
            "exact": exact,
            "evaluations_per_step": evaluations,
            "max_abs_diff_vs_rlg_exact": diff if against == "rlg_exact" else None,
        }
        if name == "rlg_sweep":
            results[name]["max_abs_diff_vs_reference_loop_sweep"] = diff
    return results


def _compiled_report(backend: str, results: dict, times: dict, first_call: dict, outputs: dict) -> dict:
    """Per eager -> compiled pair: max abs difference, speed ratio, the first (compiling) call's time."""
    pairs = {}
    for name, eager in COMPILED_PAIRS.items():
        pairs[name] = {
            "eager": eager,
            "max_abs_diff": float(np.abs(outputs[name] - outputs[eager]).max()),
            # > 1: compiled is faster; the medians exclude the first (compiling) call
            "speed_ratio_eager_over_compiled": round(statistics.median(times[eager]) / statistics.median(times[name]), 3),
            "eager_median_s": results[eager]["median_s"],
            "compiled_median_s": results[name]["median_s"],
            "first_call_s": round(first_call[name], 3),
            # compilation: the first compiled call's time beyond a compiled call's median
            "compile_s": round(first_call[name] - statistics.median(times[name]), 3),
        }
    return {"backend": backend, "pairs": pairs}


def run_benchmark(args: argparse.Namespace, images: dict | None = None) -> dict:
    """Run all variants and return the report (a JSON-ready dict); ``run`` prints it.

    ``images``: a dict that receives each variant's output of its first call (numpy), to check what it computes.

    Example: ``report = run_benchmark(parser.parse_args(["--repeats", "1", "--steps", "2"]))``.
    """
    sweep = [float(w) for w in check_rlg_sweep(args.sweep)]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[args.dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")]
    m = _models(args, device, dtype)
    call = _call_kwargs(args, m.pipe, device, dtype)
    seed = lambda: torch.Generator(device).manual_seed(0)
    variants = _variants(args, m, call, seed, sweep)
    # the reference loop's sweep: each scale timed on its own; the sweep costs their sum
    split = {"reference_loop_sweep": [lambda w=w: reference_loop(m.pipe, m.peft_model, call, w, seed()) for w in sweep]}
    times, first_call, outputs = _measure(variants, args.repeats, device, split)
    if images is not None:
        images.update(outputs)
    results = _results(variants, times, outputs)
    sweep_vs_reference = round(statistics.median(times["rlg_sweep"]) / statistics.median(times["reference_loop_sweep"]), 3)
    report = {
        "benchmark": "rlg",
        "model": m.model,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(0)
        if str(device).startswith("cuda")
        else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "steps": args.steps,
        "batch": args.batch,
        "repeats": args.repeats,
        "rlg_scale": args.scale,
        "cfg": args.cfg,
        "lora_rank": args.lora_rank,
        "exact_mode": m.rlg.rlg_transformer.resolved_mode,
        "sweep": sweep,
        "max_rows": args.max_rows,
        "results": results,
        "sweep_vs_reference": sweep_vs_reference,
        "targets": {
            "rlg_exact_le_2.05x_stock_cfg": results["rlg_exact"]["ratio_vs_stock_cfg"] <= 2.05,
            "rlg_exact_faster_than_reference_loop": results["rlg_exact"]["median_s"]
            < results["reference_loop"]["median_s"],
            "sweep_vs_reference_le_0.7": sweep_vs_reference <= 0.7,
        },
    }
    if m.compiled_rlg is not None:
        report["compiled"] = _compiled_report(args.compile_backend, results, times, first_call, outputs)
    return report


def run(args: argparse.Namespace) -> int:
    report = run_benchmark(args)
    results, model, device = report["results"], report["model"], report["device"]
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(
            f"RLG benchmark: {model}, {device} {report['dtype']}, {args.batch} images x {args.steps} steps, "
            f"median of {args.repeats}"
        )
        for name, r in results.items():
            label = "exact" if r["exact"] else "approx"
            diff = (
                ""
                if r["max_abs_diff_vs_rlg_exact"] is None
                else f"  max|d| vs exact {r['max_abs_diff_vs_rlg_exact']:.2e}"
            )
            print(f"  {name:22s} {r['median_s']:8.4f} s  {r['ratio_vs_stock_cfg']:5.2f}x  {label:6s}{diff}")
        print(f"  sweep {report['sweep']} in one call vs the reference loop scale by scale: {report['sweep_vs_reference']:.3f}x")
        for name, pair in report.get("compiled", {}).get("pairs", {}).items():
            print(
                f"  {name} ({report['compiled']['backend']}) vs {pair['eager']}: eager/compiled "
                f"{pair['speed_ratio_eager_over_compiled']:.3f}x, max|d| {pair['max_abs_diff']:.2e}, "
                f"compile {pair['compile_s']:.1f} s (first call, excluded)"
            )
    return 0
