"""The shapes world's evaluation of a model: per-family verifier accuracies on held-out prompts, and ``flowalign eval``.

``generate`` samples a pipeline with one seeded generator per prompt (image ``i`` depends only on
``(seed, i, prompts[i])``); ``evaluate`` scores held-out shapes prompts with the exact verifier, per family.

The credit-assignment task's pieces live here too: ``nocolor_prompt_source`` (``prompts: shapes_nocolor``: the
prompts that name no colour, whose held-out images are read out with ``colour_entropy_per_group``, the entropy
of the colours the model picks), and ``reward_statistics`` (the base model's mean and std of rewards on a
config's training rollouts; the constants of ``red_jpeg``).

Example::

    from flowalign.shapes_eval import evaluate, format_accuracy_table
    from flowalign.tiny import load_base_pipeline

    print(format_accuracy_table(evaluate(load_base_pipeline(), n_prompts=60)))

    flowalign eval --n-prompts 600 --lora runs/acflow_jpeg      # the same from the command line
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from flowalign import rewards as R
from flowalign import shapes
from flowalign.checkpoints import resolve_checkpoint
from flowalign.config import ACFlowConfig
from flowalign.prompts import PromptSource
from flowalign.seeding import generator
from flowalign.tiny import EVAL_CFG, EVAL_STEPS, MAX_SEQUENCE_LENGTH, load_base_pipeline
from flowalign.trainer import ACFlowTrainer

# The no-colour source's unseen rewards: prompt faithfulness (the exact verifier, all checks), a JPEG-side
# read-out the task does not train on (lossless PNG size), and the two raw components of red_jpeg (trained on,
# in the mixture), so that an evaluation shows which of them moved.
NOCOLOR_UNSEEN_REWARDS = ["shapes_binary", "png_compressibility", "redness", "jpeg_compressibility"]


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


def colour_entropy_per_group(images, groups: Sequence[Hashable]) -> dict[Hashable, float]:
    """``{group: H}``: the entropy in nats of the dominant colours of each group's images.

    An image's dominant colour is :func:`flowalign.shapes.dominant_colors`'s: the verifier's colour of most of
    its foreground pixels, one of ``shapes.COLORS``, ``"other"`` (off-palette) or ``"none"`` (no foreground);
    ``H = -sum_c p_c log p_c`` with ``p_c`` the fraction of the group's images whose dominant colour is ``c``.
    On prompts that name no colour, the base model picks colours at random (H near log 4 with many images a
    group); a model that paints everything one colour scores 0. ``groups[i]`` is image ``i``'s group (e.g. the
    index of its held-out prompt); a group of one image scores 0.

    Example::

        >>> red = torch.ones(2, 3, 32, 32); red[:, 1:, 8:20, 8:20] = 0      # a red square on white
        >>> blue = torch.ones(2, 3, 32, 32); blue[:, :2, 8:20, 8:20] = 0    # a blue one
        >>> h = colour_entropy_per_group(torch.cat([red, red[:1], blue[:1]]), [0, 0, 1, 1])  # all red; red, blue
        >>> h[0], round(h[1], 4)                                            # 0 and log 2
        (0.0, 0.6931)
    """
    groups = list(groups)
    colours = shapes.dominant_colors(images)
    if len(colours) != len(groups):
        raise ValueError(f"colour_entropy_per_group: {len(colours)} images but {len(groups)} groups; give one group "
                         "per image.")
    members: dict[Hashable, list[str]] = {}
    for colour, group in zip(colours, groups):
        members.setdefault(group, []).append(colour)
    values = {}
    for group, names in members.items():
        n = len(names)
        values[group] = sum(-(k / n) * math.log(k / n) for k in Counter(names).values()) + 0.0  # -sum p log p
    return values


def nocolor_prompt_source() -> PromptSource:
    """The shapes prompts that name no colour (``prompts: shapes_nocolor``): ``shapes.prompt_source`` of
    ``shapes.NOCOLOR_FAMILIES`` (34 train, 17 held-out prompts, the same per-family split as ``shapes``), unseen
    rewards ``NOCOLOR_UNSEEN_REWARDS``, and the read-out ``{"colour_entropy": colour_entropy_per_group}``.

    Example::

        >>> source = nocolor_prompt_source()
        >>> len(source.train), sorted(source.group_readouts)
        (34, ['colour_entropy'])
    """
    source = shapes.prompt_source(shapes.NOCOLOR_FAMILIES, unseen_rewards=NOCOLOR_UNSEEN_REWARDS)
    return replace(source, group_readouts={"colour_entropy": colour_entropy_per_group})


def reward_statistics(config: str | ACFlowConfig, rewards: Sequence[str], n_images: int = 1024, seed: int = 0,
                      progress: bool = False) -> dict[str, dict[str, float]]:
    """``{reward: {"mean", "std", "n"}}`` over ``n_images`` training rollouts of ``config``'s model (a YAML path
    or a config; its base model, prompts, sampler, steps and guidance), before any update.

    The rollouts are iteration 0, 1, ... of a fresh trainer with ``seed``: each iteration's
    ``prompts_per_iteration`` prompts drawn as training draws them, ``images_per_prompt`` SDE rollouts each,
    decoded, until ``n_images`` (a multiple of the iteration's image count) are scored. ``std`` is the
    population std. These are the constants a fixed z-scored mixture (``Mixture(normalize="fixed")``) needs.

    Example::

        reward_statistics("samples/configs/credit_red_jpeg.yaml", ["redness", "jpeg_compressibility"], 1024)
    """
    with tempfile.TemporaryDirectory() as scratch:  # the trainer writes nothing before training; to be safe
        overrides = {"output_dir": scratch, "seed": seed, "progress": False}
        cfg = (ACFlowConfig.from_yaml(config, overrides) if isinstance(config, str)
               else replace(config, **overrides))
        per_iteration = cfg.prompts_per_iteration * cfg.images_per_prompt
        if n_images < per_iteration or n_images % per_iteration:
            raise ValueError(f"n_images={n_images} must be a positive multiple of an iteration's "
                             f"{per_iteration} rollouts (prompts_per_iteration x images_per_prompt).")
        scorers = {name: R.load(name) for name in rewards}
        trainer = ACFlowTrainer(cfg, reward=lambda images, prompts: torch.zeros(len(prompts)))  # scores unused
        values: dict[str, list[torch.Tensor]] = {name: [] for name in rewards}
        for it in tqdm(range(n_images // per_iteration), desc="reward statistics", disable=not progress):
            prompts = [p for p in trainer.iteration_prompts(it) for _ in range(cfg.images_per_prompt)]
            images = trainer.policy.decode(trainer.policy.rollout(prompts, generator(seed, it), "sde").latents).cpu()
            for name, scorer in scorers.items():
                values[name].append(scorer(images, prompts).double())
    out = {}
    for name, chunks in values.items():
        v = torch.cat(chunks)
        out[name] = {"mean": float(v.mean()), "std": float(v.std(unbiased=False)), "n": v.numel()}
    return out


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
