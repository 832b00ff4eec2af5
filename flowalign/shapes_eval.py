"""The shapes world's evaluation of a model: per-family verifier accuracies on held-out prompts, and ``flowalign eval``.

``generate`` samples a pipeline with one seeded generator per prompt (image ``i`` depends only on
``(seed, i, prompts[i])``); ``evaluate`` scores held-out shapes prompts with the exact verifier, per family.

Example::

    from flowalign.shapes_eval import evaluate, format_accuracy_table
    from flowalign.tiny import load_base_pipeline

    print(format_accuracy_table(evaluate(load_base_pipeline(), n_prompts=60)))

    flowalign eval --n-prompts 600 --lora runs/acflow_jpeg      # the same from the command line
"""

from __future__ import annotations

import json

import torch
from tqdm.auto import tqdm

from flowalign import shapes
from flowalign.checkpoints import resolve_checkpoint
from flowalign.seeding import generator
from flowalign.tiny import EVAL_CFG, EVAL_STEPS, MAX_SEQUENCE_LENGTH, load_base_pipeline


@torch.no_grad()
def generate(pipe, prompts: list[str], seed: int = 0, steps: int = EVAL_STEPS, cfg: float = EVAL_CFG, batch_size: int = 64,
             progress: bool = True, **call_kwargs) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] for ``prompts``, one seeded generator per prompt.

    Image ``i`` depends only on ``(seed, i, prompts[i])``, never on the batch size.
    ``call_kwargs`` go to the pipeline call (e.g. ``rlg_scale`` for an RLG pipeline).
    """
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sample", disable=not progress, leave=False):
        chunk = prompts[start : start + batch_size]
        gens = [generator(seed, start + i) for i in range(len(chunk))]
        images = pipe(
            chunk, num_inference_steps=steps, guidance_scale=cfg, generator=gens, output_type="pt",
            max_sequence_length=MAX_SEQUENCE_LENGTH, **call_kwargs,
        ).images
        out.append(images.float().cpu())
    return torch.cat(out)


def evaluate(pipe, n_prompts: int = 300, seed: int = 0, steps: int = EVAL_STEPS, cfg: float = EVAL_CFG, batch_size: int = 64,
             progress: bool = True, **call_kwargs) -> dict:
    """Per-family verifier accuracies of ``pipe`` on ``n_prompts`` held-out shapes prompts.

    Returns ``{"families": {family: {"n", "all_satisfied", "fraction"}}, "overall": {...}, settings}``
    where ``all_satisfied`` is the fraction of images whose every constraint holds and
    ``fraction`` the mean fraction of constraints satisfied.

    >>> evaluate(load_base_pipeline(), n_prompts=60)["families"]["single_object"]  # doctest: +SKIP
    """
    prompts = shapes.heldout_prompts(n_prompts, seed=seed)
    images = generate(pipe, prompts, seed=seed, steps=steps, cfg=cfg, batch_size=batch_size,
                      progress=progress, **call_kwargs)
    fraction, ok = shapes.verify_batch(images, prompts)
    families = [shapes.family_of(p) for p in prompts]
    result = {"n_prompts": n_prompts, "seed": seed, "steps": steps, "cfg": cfg, "families": {}}
    for fam in shapes.FAMILIES:
        idx = [i for i, f in enumerate(families) if f == fam]
        if idx:
            result["families"][fam] = {
                "n": len(idx),
                "all_satisfied": round(ok[idx].mean().item(), 4),
                "fraction": round(fraction[idx].mean().item(), 4),
            }
    result["overall"] = {"n": len(prompts), "all_satisfied": round(ok.mean().item(), 4),
                         "fraction": round(fraction.mean().item(), 4)}
    return result


def format_accuracy_table(result: dict) -> str:
    """A markdown table of an ``evaluate`` result."""
    rows = ["| family | prompts | all satisfied | constraints satisfied |", "|---|---:|---:|---:|"]
    for fam, r in list(result["families"].items()) + [("**all**", result["overall"])]:
        rows.append(f"| {fam} | {r['n']} | {100 * r['all_satisfied']:.1f}% | {100 * r['fraction']:.1f}% |")
    return "\n".join(rows)


def add_arguments(parser) -> None:
    """``flowalign eval``: per-family accuracies of a pipeline on held-out shapes prompts."""
    parser.add_argument("--model", default=None, help="Pipeline folder (default: the embedded base model).")
    parser.add_argument("--lora", default=None, help="A LoRA to load on top (diffusers format: a training checkpoint folder, its "
                        "checkpoints/latest pointer or the run's output_dir).")
    parser.add_argument("--n-prompts", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=EVAL_STEPS)
    parser.add_argument("--cfg", type=float, default=EVAL_CFG)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")


def run(args) -> int:
    pipe = load_base_pipeline(args.model)
    if args.lora:
        pipe.load_lora_weights(resolve_checkpoint(args.lora))
    result = evaluate(pipe, n_prompts=args.n_prompts, seed=args.seed, steps=args.steps, cfg=args.cfg,
                      batch_size=args.batch_size)
    print(json.dumps(result, indent=1) if args.json else format_accuracy_table(result))
    return 0
