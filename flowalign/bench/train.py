"""``flowalign bench train``: the fine-tuning frontier, held-out reward gain against distance to the base.

Every arm (``--methods``) is trained at every regulariser strength ``--kl`` (``ACFlowConfig.kl_coef``, in
nats per image, mapped by the trainer onto each method's own knob) and every seed, for the same budget of
sampled images. An arm is a method (an ``ACFlowConfig.algorithm`` value: ``acflow``) or a named variant of one,
``NAME=METHOD`` (``acflow_v0=acflow``); ``--set NAME:KEY=VALUE`` reaches that arm's runs only, ``--set
METHOD:KEY=VALUE`` every arm of that method (the arm's own ``NAME:`` setting wins), ``--set KEY=VALUE`` every run
and the control. One no-update control (a fresh trainer's ``evaluate()``: the base model on the same held-out
prompts, seeds and noises, ``ACFlowConfig.eval_seed``) serves every run, so each run's gain is a *paired*
difference over the same images, with its paired standard error. Per run it records::

    reward_gain, reward_gain_se        mean_i (r_run_i - r_control_i) and std(ddof 1) / sqrt(n), same images i
    eval_<name>_gain, eval_<name>_gain_se   the same for each unseen reward
    kl_measured, kl_measured_se        mean_i and SE over images of the window KL(p_run || p_base), nats per image
                                       (per_image "kl_to_reference", flowalign.eval.sde_path_kl)
    coupling_distance, ..._se          mean_i sum_d (x_run(z_i) - x_base(z_i))_d^2: Euler samples of both models
                                       from the same noise z_i, squared latent norm per image (>= W2^2)
    path_kl, path_kl_se                mean_i KL(p_run || p_base) in nats per image on one common SDE sampler
    diversity_ratio                    diversity_run / diversity_control
    w2_to_reference, images, train_seconds, arm, method, kl_coef, seed

(a distance the evaluation does not report is NaN, written null, and left out of the figure and the decision),
and per (arm, kl_coef) the mean ± SE over seeds of each. Written to ``--out``: ``frontier.json``, ``frontier.png``
(gain vs each distance axis, then gain vs diversity ratio) and one ``<arm>-kl<k>-seed<s>/result.json`` per run as
it finishes; a re-run skips runs whose result exists, so a crash loses nothing. ``--compare A`` adds
``comparison`` (A's points on every other arm's frontier at equal window KL and at equal diversity);
``--compare A --baseline B`` adds ``decision``, the rule of issue #23 (:func:`decide`): on each distance axis, A's
gain minus B's frontier interpolated at A's distance, > 3 SE on >= 2 axes without losing > 3 SE at equal diversity
is "helps".

    flowalign bench train --quick --out runs/frontier_quick                 # CI-sized, well under a minute
    flowalign bench train --methods acflow grpo --kl 0 0.1 1 --seeds 0 1 2 --images 1536 --workers 2
    flowalign bench train --methods acflow_latent=acflow acflow_zero=acflow --set acflow:inner_epochs=1 \\
        --set acflow_latent:critic=latent --set acflow_zero:critic=zero --compare acflow_latent \\
        --baseline acflow_zero --kl 0.05 0.15 0.5 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import re
import shlex
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flowalign.checkpoints import strict_json, write_json
from flowalign.config import ALGORITHMS, ACFlowConfig, parse_override
from flowalign.eval import mean_se, paired_difference
from flowalign.probe import probe_reward
from flowalign.trainer import ACFlowTrainer

DEFAULT_METHODS = ("acflow", "orw", "grpo")
DEFAULT_KL = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_IMAGES = 1536

# --quick: a CI-sized sweep on the tiny model (2 methods x 2 kl_coef x 1 seed, 2 iterations of 8 images).
QUICK_METHODS = ("acflow", "grpo")
QUICK_KL = (0.0, 1.0)
QUICK_SEEDS = (0,)
QUICK_ITERATIONS = 2
QUICK_OVERRIDES: dict[str, Any] = {
    "prompts_per_iteration": 2, "images_per_prompt": 4, "sample_steps": 4, "minibatch_size": 8,
    "inner_epochs": 1, "noise_draws": 1, "critic_warmup_iterations": 1,
    "eval_prompts": 4, "eval_images_per_prompt": 2, "eval_steps": 4,
}

# Keys the sweep sets itself for every run (--set may not touch them: use the named flag instead).
SWEEP_KEYS = {"algorithm": "--methods", "kl_coef": "--kl", "seed": "--seeds", "iterations": "--iterations/--images",
              "output_dir": "--out", "eval_every": None, "eval_at_start": None, "checkpoint_every": None,
              "resume": None, "progress": None, "reward": "--reward"}
# The distance axes of issue #23: summary key -> the evaluate() per_image key it is the mean of.
DISTANCE_AXES = {"kl_measured": "kl_to_reference", "coupling_distance": "coupling_distance", "path_kl": "path_kl"}
AXIS_LABELS = {  # axis labels of frontier.png, with units
    "kl_measured": "window KL(fine-tuned || base) (nats per image; symlog)",
    "coupling_distance": "coupling distance sum_d (x_ft - x_base)^2\n(squared latent norm per image; symlog)",
    "path_kl": "path KL(fine-tuned || base), SDE sampler (nats per image; symlog)",
    "diversity_ratio": "diversity ratio (run / control)",
}
AXIS_SHORT = {"kl_measured": "KL", "coupling_distance": "coupling", "path_kl": "path KL",
              "diversity_ratio": "diversity"}
# An arm's name: a run folder's prefix and a --set scope (no ':' or '=', no path separators).
ARM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Config keys that decide the held-out images: a run is paired with the control only if these agree.
EVAL_KEYS = ("eval_seed", "eval_prompts", "eval_prompt_file", "eval_images_per_prompt", "eval_steps", "eval_rewards",
             "eval_kl", "guidance_scale", "noise_level", "sample_steps", "reward", "pretrained", "prompts")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="samples/configs/acflow_shapes.yaml",
                        help="Base YAML config shared by every run (default: the tiny shapes config).")
    parser.add_argument("--methods", "--algorithms", nargs="+", default=None, metavar="[NAME=]METHOD",
                        help="Arms: methods (ACFlowConfig.algorithm values; default "
                             f"{' '.join(DEFAULT_METHODS)}), or NAME=METHOD for a named variant of METHOD (e.g. "
                             "acflow_v0=acflow; its runs are NAME-kl<k>-seed<s>, its settings --set NAME:KEY=VALUE).")
    parser.add_argument("--kl", nargs="+", type=float, default=None,
                        help="Regulariser strengths kl_coef in nats per image (default "
                             f"{' '.join(f'{k:g}' for k in DEFAULT_KL)}).")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="Training seeds (default 0 1 2).")
    parser.add_argument("--reward", default=None, help="Training reward (overrides the config's reward).")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--images", type=int, default=None,
                        help=f"Sampled-image budget per run, the same for every run (default {DEFAULT_IMAGES}).")
    budget.add_argument("--iterations", type=int, default=None, help="Iterations per run (instead of --images).")
    parser.add_argument("--workers", type=int, default=1,
                        help="Runs trained at once, each in its own process with torch threads = cores / workers.")
    parser.add_argument("--out", default="runs/bench_frontier",
                        help="Folder for the runs, frontier.json and frontier.png (re-running skips finished runs).")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="[SCOPE:]KEY=VALUE",
                        help="Extra ACFlowConfig override applied to every run; with METHOD: to every arm of that "
                             "method, with NAME: to that arm only (it wins over METHOD:; repeatable). The control "
                             "gets the unscoped ones.")
    parser.add_argument("--compare", default=None, metavar="ARM",
                        help="Compare this arm's points with every other arm's frontier at equal measured KL "
                             "and at equal diversity (frontier.json 'comparison'; default acflow when swept).")
    parser.add_argument("--baseline", default=None, metavar="ARM",
                        help="With --compare A: the decision rule of issue #23, A against this arm's frontier on "
                             "every distance axis (window KL, coupling distance, path KL) and at equal diversity "
                             "(frontier.json 'decision': helps / hurts / no difference).")
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized sweep: tiny eval set, 2 iterations, 2 methods x 2 kl x 1 seed (flags given "
                             "explicitly still win).")
    parser.add_argument("--probe", action="store_true",
                        help="Also run the reward learnability probe (flowalign probe-reward) on the base model.")
    parser.add_argument("--probe-batch", type=int, default=64, help="Batch of the probe (default 64).")
    parser.add_argument("--json", action="store_true", help="Print frontier.json's summary as JSON, not a table.")
    parser.add_argument("--report-only", action="store_true",
                        help="Train nothing: write frontier.json / frontier.png from the runs already finished under "
                             "--out (a partial or interrupted sweep); the missing runs are listed in the JSON.")


# ----------------------------------------------------------------------------------------------------------
# Pure bookkeeping (tested on constructed results)
# ----------------------------------------------------------------------------------------------------------
def run_name(arm: str, kl_coef: float, seed: int) -> str:
    """Folder of one run: ``run_name("grpo", 0.03, 1) == "grpo-kl0.03-seed1"`` (an arm's name: ``acflow_v0-kl0.15-seed0``)."""
    return f"{arm}-kl{kl_coef:g}-seed{seed}"


def parse_methods(entries: list[str]) -> dict[str, str]:
    """``--methods`` entries -> ``{arm name: method}`` in the order given.

    ``METHOD`` is the arm ``METHOD`` training that method (as before arms existed); ``NAME=METHOD`` names a variant
    of ``METHOD`` (settings through ``--set NAME:KEY=VALUE``). An arm name is unique, made of letters, digits,
    ``_ . -``, and is not another method's name (``--set grpo:...`` would then be ambiguous).
    Example: ``parse_methods(["acflow_v0=acflow", "grpo"]) == {"acflow_v0": "acflow", "grpo": "grpo"}``.
    """
    arms: dict[str, str] = {}
    for entry in entries:
        name, sep, method = (part.strip() for part in entry.partition("="))
        if not sep:
            name = method = entry.strip()
        if not name or not method:
            raise SystemExit(f"flowalign bench train: --methods expects METHOD or NAME=METHOD, got {entry!r}.")
        if not ARM_NAME.fullmatch(name):
            raise SystemExit(f"flowalign bench train: --methods {entry}: the arm name {name!r} names run folders and "
                             "--set scopes: use letters, digits, '_', '.' and '-' (e.g. acflow_v0=acflow).")
        if name in ALGORITHMS and name != method:
            raise SystemExit(f"flowalign bench train: --methods {entry}: {name!r} is a method's own name; give the "
                             f"variant another name (e.g. {method}_{name}={method}).")
        if name in arms:
            raise SystemExit(f"flowalign bench train: --methods names the arm {name!r} twice; give each variant its "
                             "own NAME=METHOD.")
        arms[name] = method
    return arms


def run_measures(control: dict, final: dict) -> dict:
    """A run's paired measures against the control, from the two ``evaluate()`` dicts.

    Both carry ``per_image`` lists in the same image order (same eval settings), so
    ``gain = mean_i (run_i - control_i)`` and ``se = std_i(run_i - control_i, ddof=1) / sqrt(n)``
    (:func:`flowalign.eval.paired_difference`), for the training reward and each ``eval_<name>``.
    ``diversity_ratio = diversity_run / diversity_control``. Each distance axis of :data:`DISTANCE_AXES`
    (``kl_measured`` from per-image ``kl_to_reference``, ``coupling_distance``, ``path_kl``): the run's mean over
    images and its SE over images (``<axis>_se``), NaN where the evaluation did not measure it.

    Example: control per-image rewards ``[0, 1]``, run ``[1, 1]`` -> ``reward_gain 0.5``, ``reward_gain_se 0.5``.
    """
    run_items, control_items = final.get("per_image"), control.get("per_image")
    if not run_items or not control_items:
        raise ValueError("run_measures needs evaluate() results with per_image lists (ACFlowTrainer.evaluate with "
                         "the per-image output); got keys "
                         f"{sorted(final)} and {sorted(control)}.")
    out: dict[str, float] = {}
    for key in [k for k in run_items if k == "reward" or k.startswith("eval_")]:
        if key not in control_items:
            raise ValueError(f"The control has no per-image {key!r}; evaluate both with the same eval_rewards.")
        if len(run_items[key]) != len(control_items[key]):
            raise ValueError(f"per_image[{key!r}] has {len(run_items[key])} images in the run but "
                             f"{len(control_items[key])} in the control: evaluate both with the same eval settings "
                             f"({', '.join(EVAL_KEYS)}).")
        gain, se = paired_difference(run_items[key], control_items[key])
        out[f"{key}_gain"], out[f"{key}_gain_se"] = gain, se
    for axis, per_image_key in DISTANCE_AXES.items():
        values = run_items.get(per_image_key)
        if values:  # a distance of the run to the base itself (the control's is 0): mean and SE over images
            out[axis], out[f"{axis}_se"] = mean_se([float("nan") if v is None else v for v in values])
        else:  # not measured by this evaluation: NaN, skipped by the summary's figure and decision
            out[axis], out[f"{axis}_se"] = float("nan"), float("nan")
    cd = control.get("diversity", float("nan"))
    out["diversity_ratio"] = final["diversity"] / cd if cd and math.isfinite(cd) else float("nan")
    out["diversity"] = final["diversity"]
    out["w2_to_reference"] = final.get("w2_to_reference", float("nan"))
    out["reward"] = final["reward"]
    return out


def _finite_mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return mean_se(values) if values else (float("nan"), float("nan"))


def _arm(row: dict) -> str:
    """A run's or summary row's arm (records written before arms existed carry only the method)."""
    return row.get("arm") or row["method"]


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(x)


def summarize(runs: list[dict]) -> list[dict]:
    """Per (arm, kl_coef), in order of first appearance then kl_coef: mean ± SE over seeds.

    For every ``*_gain`` key, each distance axis (``kl_measured``, ``coupling_distance``, ``path_kl``),
    ``diversity_ratio`` and ``w2_to_reference``: ``{key: mean, key + "_se_seeds": SE over seeds (NaN for one
    seed)}`` over the seeds where it is finite (NaN where no seed has it), plus ``<gain>_paired_se``, the mean of the
    runs' paired standard errors (the held-out evaluation's own noise), and ``arm``, ``method``, ``seeds``,
    ``n_seeds``.

    Example: gains 0.1 and 0.3 over two seeds -> ``reward_gain 0.2``, ``reward_gain_se_seeds 0.1``.
    """
    arms = list(dict.fromkeys(_arm(r) for r in runs))
    rows = []
    for arm in arms:
        for kl in sorted({r["kl_coef"] for r in runs if _arm(r) == arm}):
            rs = [r for r in runs if _arm(r) == arm and r["kl_coef"] == kl]
            row: dict[str, Any] = {"arm": arm, "method": rs[0]["method"], "kl_coef": kl,
                                   "seeds": [r["seed"] for r in rs], "n_seeds": len(rs)}
            gain_keys = [k for k in rs[0] if k.endswith("_gain")]
            for key in gain_keys + list(DISTANCE_AXES) + ["diversity_ratio", "w2_to_reference"]:
                row[key], row[f"{key}_se_seeds"] = _finite_mean_se([r.get(key) for r in rs])
            for key in gain_keys:
                row[f"{key}_paired_se"] = _finite_mean_se([r.get(f"{key}_se") for r in rs])[0]
            rows.append(row)
    return rows


def present_axes(summary: list[dict], arms: list[str] | None = None) -> list[str]:
    """The distance axes measured (finite) at some point of every arm in ``arms`` (default: of any arm).

    Example: before the evaluation reports ``coupling_distance`` and ``path_kl`` -> ``["kl_measured"]``.
    """
    if arms is None:
        return [axis for axis in DISTANCE_AXES if any(_finite(r.get(axis)) for r in summary)]
    return [axis for axis in DISTANCE_AXES
            if arms and all(any(_arm(r) == arm and _finite(r.get(axis)) for r in summary) for arm in arms)]


# The house rule for a difference: under ~3 standard errors it is noise.
VERDICT_SE = 3.0


def compare_at_equal(summary: list[dict], arm: str, other: str, axis: str, log_x: bool | None = None) -> list[dict]:
    """``arm``'s frontier points against ``other``'s frontier at the same ``axis`` value (equal distance or diversity).

    For each (``arm``, kl_coef) point at ``x`` = its mean ``axis`` value (a distance axis of
    :data:`DISTANCE_AXES` or ``"diversity_ratio"``), ``other``'s gain at ``x`` is interpolated linearly between its
    two points that bracket ``x`` in ``axis`` order (in ``log x`` if ``log_x``; default: log for ``kl_measured``,
    the historical ``comparison``, linear otherwise), its standard error likewise. The standard error of each point
    is the SE over seeds (the mean paired SE where a point has one seed: ``se_kind``). The difference
    ``d = gain - other_gain`` with ``se = sqrt(se^2 + se_other^2)`` gives ``verdict``: ``"above"`` if
    ``d > VERDICT_SE se``, ``"below"`` if ``d < -VERDICT_SE se``, else ``"level"`` (noise); ``"outside"`` where ``x``
    is outside ``other``'s measured range or not measured (no extrapolation).

    Example: other's gains 0.1 at KL 1 and 0.3 at KL 4, the arm's 0.5 ± 0.01 at KL 2 -> other's 0.2 at KL 2
    (halfway in log KL), ``d = 0.3``, ``verdict "above"``; with ``log_x=False`` and other's points at 1 and 3, the
    same 0.2 at 2 (halfway linearly).
    """
    if axis not in (*DISTANCE_AXES, "diversity_ratio"):
        raise ValueError(f"axis={axis!r}: choose one of {', '.join((*DISTANCE_AXES, 'diversity_ratio'))}.")
    log_x = axis == "kl_measured" if log_x is None else log_x

    def se_of(row: dict) -> tuple[float, str]:
        seeds = row.get("reward_gain_se_seeds", float("nan"))
        if _finite(seeds):
            return seeds, "seeds"
        return row["reward_gain_paired_se"], "paired"

    def coord(x: float) -> float:
        return math.log(x) if log_x else x

    ref = sorted((r for r in summary if _arm(r) == other and _finite(r.get(axis)) and (not log_x or r[axis] > 0)),
                 key=lambda r: r[axis])
    out = []
    for row in (r for r in summary if _arm(r) == arm):
        x = row.get(axis)
        se, kind = se_of(row)
        item = {"arm": arm, "method": row["method"], "kl_coef": row["kl_coef"], "other": other, "axis": axis,
                axis: x, "gain": row["reward_gain"], "se": se, "se_kind": kind}
        measured = _finite(x) and (not log_x or x > 0)
        lo = [r for r in ref if measured and r[axis] <= x]
        hi = [r for r in ref if measured and r[axis] >= x]
        if not lo or not hi:
            out.append({**item, "verdict": "outside"})
            continue
        a, b = lo[-1], hi[0]
        # t = (x - x_a) / (x_b - x_a): other(x) = (1 - t) other(x_a) + t other(x_b), in log x for log_x
        t = 0.0 if a is b or coord(b[axis]) == coord(a[axis]) else (coord(x) - coord(a[axis])) / (
            coord(b[axis]) - coord(a[axis]))
        (sa, ka), (sb, kb) = se_of(a), se_of(b)
        other_gain = (1 - t) * a["reward_gain"] + t * b["reward_gain"]
        other_se = (1 - t) * sa + t * sb
        diff, diff_se = row["reward_gain"] - other_gain, math.hypot(se, other_se)  # sqrt(se_a^2 + se_b(x)^2)
        z = diff / diff_se if diff_se > 0 else math.copysign(math.inf, diff) if diff else 0.0  # d = 0: level
        verdict = "above" if z > VERDICT_SE else "below" if z < -VERDICT_SE else "level"
        out.append({**item, "other_gain": other_gain, "other_se": other_se,
                    "other_se_kind": ka if ka == kb else "mixed", "difference": diff, "difference_se": diff_se,
                    "z": z, "verdict": verdict})
    return out


def format_comparison(rows: list[dict]) -> str:
    """Markdown table of :func:`compare_at_equal` rows."""
    lines = ["| arm | kl_coef | other | at | gain ± SE | other's gain ± SE | difference ± SE | z | verdict |",
             "|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        x = r[r["axis"]]
        at = f"{AXIS_SHORT[r['axis']]} {x:.3g}" if _finite(x) else f"{AXIS_SHORT[r['axis']]} n/a"
        if r["verdict"] == "outside":
            cells = [_fmt(r["gain"], r["se"]), "outside its range", "", "", "outside"]
        else:
            cells = [_fmt(r["gain"], r["se"]), _fmt(r["other_gain"], r["other_se"]),
                     _fmt(r["difference"], r["difference_se"]), _fmt(r["z"], float("nan"), 1), r["verdict"]]
        lines.append("| " + " | ".join([_arm(r), f"{r['kl_coef']:g}", r["other"], at] + cells) + " |")
    return "\n".join(lines)


DECISION_RULE = (
    "On each distance axis (window KL, coupling distance, path KL) the baseline's frontier (its gain against its "
    "mean distance over kl_coef) is interpolated linearly at each of the arm's points, no extrapolation "
    "('outside'); difference = gain - baseline's gain, SE = sqrt(se_arm^2 + se_baseline^2), SE over seeds, the "
    "baseline's interpolated linearly. The arm beats the baseline on an axis at a point when difference > 3 SE. "
    "'helps': at some kl_coef the arm beats the baseline on >= 2 distance axes and is not below it by > 3 SE at "
    "equal diversity; 'hurts': at some kl_coef the baseline beats the arm by > 3 SE on >= 2 axes; "
    "'mixed': both at different kl_coef; 'undecided': fewer than 2 distance axes measured for both; "
    "else 'no difference'.")


def decide(summary: list[dict], arm: str, baseline: str) -> dict:
    """The decision rule of issue #23: does ``arm`` (AC-Flow with its critic) beat ``baseline``'s frontier?

    Every distance axis measured for both arms (:func:`present_axes`) and the diversity ratio go through
    :func:`compare_at_equal` with linear interpolation. Per ``arm`` point (kl_coef): ``beats`` = the axes with
    verdict ``"above"`` (difference > 3 SE), ``beaten`` = those ``"below"``, ``diversity`` = the verdict at equal
    diversity (``"outside"`` counts as not worse); the point ``helps`` when ``len(beats) >= 2`` and ``diversity !=
    "below"``, ``hurts`` when ``len(beaten) >= 2``. ``verdict``: ``"helps"`` / ``"hurts"`` if some point does (and
    none does the opposite; ``"mixed"`` if both occur), ``"undecided"`` with fewer than two distance axes (the rule
    needs two), else ``"no difference"`` (:data:`DECISION_RULE`).

    Example: the baseline at (distance 1, gain 0.1) and (3, 0.3) on two axes, the arm at distance 2 with gain
    0.5 ± 0.01 -> the baseline's 0.2 there, difference 0.3 > 3 SE on both axes: ``verdict "helps"``.
    """
    for name in (arm, baseline):
        if not any(_arm(r) == name for r in summary):
            raise ValueError(f"decide: no summary rows for the arm {name!r}; arms present: "
                             f"{', '.join(dict.fromkeys(_arm(r) for r in summary))}.")
    axes = present_axes(summary, [arm, baseline])
    rows = {axis: compare_at_equal(summary, arm, baseline, axis, log_x=False) for axis in [*axes, "diversity_ratio"]}
    points = []
    for i, at_div in enumerate(rows["diversity_ratio"]):  # compare_at_equal keeps the arm's row order on every axis
        beats = [axis for axis in axes if rows[axis][i]["verdict"] == "above"]
        beaten = [axis for axis in axes if rows[axis][i]["verdict"] == "below"]
        points.append({"kl_coef": at_div["kl_coef"], "beats": beats, "beaten": beaten,
                       "diversity": at_div["verdict"],
                       "helps": len(beats) >= 2 and at_div["verdict"] != "below", "hurts": len(beaten) >= 2})
    helps = [p["kl_coef"] for p in points if p["helps"]]
    hurts = [p["kl_coef"] for p in points if p["hurts"]]
    if len(axes) < 2:
        verdict = "undecided"
        reason = (f"the rule needs >= 2 distance axes measured for both arms; measured: {', '.join(axes) or 'none'} "
                  "(the evaluation's coupling_distance / path_kl are missing)")
    elif helps and hurts:
        verdict = "mixed"
        reason = f"{arm} beats {baseline} at kl_coef {helps}, {baseline} beats {arm} at kl_coef {hurts}"
    elif helps:
        verdict, reason = "helps", f"{arm} beats {baseline} on >= 2 distance axes at kl_coef {helps}"
    elif hurts:
        verdict, reason = "hurts", f"{baseline} beats {arm} on >= 2 distance axes at kl_coef {hurts}"
    else:
        verdict, reason = "no difference", "no kl_coef where either beats the other on >= 2 distance axes"
    return {"arm": arm, "baseline": baseline, "axes": axes,
            "missing_axes": [axis for axis in DISTANCE_AXES if axis not in axes], "se_rule": VERDICT_SE,
            "rule": DECISION_RULE, "points": points, "rows": [r for axis_rows in rows.values() for r in axis_rows],
            "verdict": verdict, "reason": reason}


def format_decision(decision: dict) -> str:
    """Markdown table of :func:`decide`: per kl_coef, the difference ± SE (z, verdict) on each axis, then the verdict."""
    axes = [*decision["axes"], "diversity_ratio"]
    by = {(r["axis"], r["kl_coef"]): r for r in decision["rows"]}
    lines = ["| kl_coef | " + " | ".join(f"at equal {AXIS_SHORT[a]}" for a in axes) + " | point |",
             "|---:|" + "---:|" * len(axes) + "---|"]
    for p in decision["points"]:
        cells = []
        for axis in axes:
            r = by[(axis, p["kl_coef"])]
            cells.append("outside" if r["verdict"] == "outside" else
                         f"{_fmt(r['difference'], r['difference_se'])} (z {_fmt(r['z'], float('nan'), 1)}, "
                         f"{r['verdict']})")
        point = "helps" if p["helps"] else "hurts" if p["hurts"] else "-"
        lines.append(f"| {p['kl_coef']:g} | " + " | ".join(cells) + f" | {point} |")
    lines.append(f"\nverdict: {decision['verdict']} ({decision['reason']})")
    return "\n".join(lines)


def _fmt(mean: float, se: float, digits: int = 3) -> str:
    if not _finite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if _finite(se) else "")


def format_table(summary: list[dict], reward: str = "reward") -> str:
    """Markdown table of the summary: gain ± SE over seeds, the mean paired SE, each measured distance axis,
    diversity ratio, unseen gains. An arm named apart from its method reads ``name (method)``."""
    unseen = [k for k in (summary[0] if summary else {}) if k.startswith("eval_") and k.endswith("_gain")]
    extra = [axis for axis in present_axes(summary) if axis != "kl_measured"]
    units = {"coupling_distance": "coupling (sq. latent norm)", "path_kl": "path KL (nats/image)"}
    head = (["arm", "kl_coef", "seeds", f"{reward} gain ± SE(seeds)", "paired SE", "KL (nats/image)"]
            + [units[a] for a in extra] + ["diversity / control"]
            + [k.removesuffix("_gain").removeprefix("eval_") + " gain" for k in unseen])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        name = _arm(r) if _arm(r) == r["method"] else f"{_arm(r)} ({r['method']})"
        cells = [name, f"{r['kl_coef']:g}", str(r["n_seeds"]),
                 _fmt(r["reward_gain"], r["reward_gain_se_seeds"]), _fmt(r["reward_gain_paired_se"], float("nan")),
                 _fmt(r["kl_measured"], r["kl_measured_se_seeds"], 4)]
        cells += [_fmt(r.get(a, float("nan")), r.get(f"{a}_se_seeds", float("nan")), 4) for a in extra]
        cells += [_fmt(r["diversity_ratio"], r["diversity_ratio_se_seeds"], 2)]
        cells += [_fmt(r[k], r[f"{k}_se_seeds"]) for k in unseen]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_frontier(summary: list[dict], path: str | os.PathLike, reward: str = "reward") -> list[str]:
    """``frontier.png``: held-out reward gain vs each measured distance axis, then vs the diversity ratio.

    One panel per distance axis of :data:`DISTANCE_AXES` that some arm measured (window KL in nats per image,
    coupling distance in squared latent norm per image, path KL in nats per image), and the diversity panel last.
    One curve per arm through its kl_coef values in order, error bars = SE over seeds (both axes; the paired
    SE over the held-out images for the gain of a single-seed point); the control is the star at zero gain
    (distance 0, diversity ratio 1). Distance axes are symlog: logarithmic above the decade below the smallest
    positive value, linear below it, so the control at 0 is drawn. Returns the panels' axes in order.

    Example: ``plot_frontier(summarize(runs), "frontier.png")`` -> ``["kl_measured", "diversity_ratio"]`` before
    the evaluation reports the other two distances.
    """
    import matplotlib  # heavy, and only needed for the figure

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt  # after use("Agg")

    panels = [*present_axes(summary), "diversity_ratio"]
    nrows = 1 if len(panels) <= 3 else 2
    ncols = math.ceil(len(panels) / nrows)
    fig, grid = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.6 * nrows), constrained_layout=True,
                             squeeze=False)
    axes = dict(zip(panels, grid.flat))
    for unused in list(grid.flat)[len(panels):]:
        unused.set_visible(False)
    for arm in dict.fromkeys(_arm(r) for r in summary):
        rows = sorted((r for r in summary if _arm(r) == arm), key=lambda r: r["kl_coef"])
        y = [r["reward_gain"] for r in rows]
        # SE over seeds; with one seed (no spread to measure) the run's paired SE over the held-out images
        yerr = [_nan0(r["reward_gain_se_seeds"] if r["n_seeds"] > 1 else r["reward_gain_paired_se"]) for r in rows]
        color = None
        for axis, ax in axes.items():
            line = ax.errorbar([_nan(r.get(axis)) for r in rows], y, yerr=yerr,
                               xerr=[_nan0(r.get(f"{axis}_se_seeds")) for r in rows],
                               marker="o", capsize=3, label=arm, color=color)
            color = line[0].get_color()  # one colour per arm on every panel
            if axis != "diversity_ratio":
                for r in rows:
                    if _finite(r.get(axis)):
                        ax.annotate(f"{r['kl_coef']:g}", (r[axis], r["reward_gain"]), textcoords="offset points",
                                    xytext=(4, 4), fontsize=7)
    for axis, ax in axes.items():
        ax.plot([1.0 if axis == "diversity_ratio" else 0.0], [0.0], marker="*", markersize=12, color="black",
                linestyle="none", label="no-update control")
        positive = [r[axis] for r in summary if _finite(r.get(axis)) and r[axis] > 0]
        if axis != "diversity_ratio" and positive:  # log-like, but the control sits at 0: linear below a decade
            ax.set_xscale("symlog", linthresh=10.0 ** math.floor(math.log10(min(positive))))
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_ylabel(f"held-out {reward} gain vs control\n(paired, reward units)")
        ax.set_xlabel(AXIS_LABELS[axis])
        ax.grid(alpha=0.3)
        ax.set_title(f"reward gain vs {AXIS_SHORT[axis]}" + (" kept" if axis == "diversity_ratio" else
                                                               " to the base (labels: kl_coef)"))
    bars = "SE over seeds" if all(r["n_seeds"] > 1 for r in summary) else "SE over seeds; paired SE where one seed"
    fig.suptitle(f"error bars: {bars}", fontsize=8)
    grid.flat[0].legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return panels


def _nan(x: Any) -> float:
    return x if _finite(x) else float("nan")


def _nan0(x: float) -> float:
    return x if x is not None and math.isfinite(x) else 0.0


# ----------------------------------------------------------------------------------------------------------
# Running the sweep
# ----------------------------------------------------------------------------------------------------------
def _eval_signature(cfg) -> dict:
    values = asdict(cfg)
    return {k: values[k] for k in EVAL_KEYS if k in values}


def _control_one(config: str, overrides: dict, out: str, threads: int) -> dict:
    """The no-update control: a fresh trainer's ``evaluate()`` (the base model on the held-out set)."""
    if threads:
        torch.set_num_threads(threads)
    cfg = ACFlowConfig.from_yaml(config, {**overrides, "output_dir": str(Path(out) / "control"), "progress": False})
    start = time.perf_counter()
    result = ACFlowTrainer(cfg).evaluate()
    record = {"control": result, "eval_signature": _eval_signature(cfg), "overrides": overrides,
              "eval_seconds": time.perf_counter() - start}
    write_json(Path(out) / "control" / "result.json", record)
    return record


def _train_one(config: str, overrides: dict, out: str, threads: int, arm: str | None = None) -> dict:
    """Train one (arm, kl_coef, seed) run; writes and returns its ``result.json`` record (with per_image)."""
    if threads:
        torch.set_num_threads(threads)
    cfg = ACFlowConfig.from_yaml(config, overrides)
    start = time.perf_counter()
    trainer = ACFlowTrainer(cfg)
    final = trainer.train()
    wall = time.perf_counter() - start
    # time of the training iterations only (rollout, reward, update), without set-up and evaluation
    train_seconds = sum(m.get("time_sampling", 0.0) + m.get("time_reward", 0.0) + m.get("time_update", 0.0)
                        for m in trainer.history)
    record = {"arm": arm or cfg.algorithm, "method": cfg.algorithm, "kl_coef": cfg.kl_coef, "seed": cfg.seed, "iterations": cfg.iterations,
              "images": trainer.counters["images_seen"], "train_seconds": train_seconds, "wall_seconds": wall,
              "eval_signature": _eval_signature(cfg), "overrides": overrides, "final": final}
    write_json(Path(cfg.output_dir) / "result.json", record)
    return record


def _load_if_done(path: Path, overrides: dict) -> dict | None:
    """A finished run's record, or None; a record made with other settings raises (no silent mixing)."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("overrides") != json.loads(json.dumps(overrides)):
        raise SystemExit(f"flowalign bench train: {path} was made with other settings ({record.get('overrides')}) "
                         f"than this sweep's ({overrides}); use another --out or delete that folder.")
    return record


def _parse_sets(sets: list[str], methods: list[str] | dict[str, str] | None = None) -> tuple[dict, dict[str, dict]]:
    """``--set`` items: ``KEY=VALUE`` for every run, ``SCOPE:KEY=VALUE`` for one scope's runs only.

    Returns ``(common, scoped)``; a scope is an arm's name or a method (every arm of it, :func:`arm_overrides`).
    ``methods`` is the sweep's arms (``{name: method}`` of :func:`parse_methods`) or a list of the allowed scopes:
    a scoped item must name one of them (when given), as a typo would otherwise silently leave that arm on the
    base config.
    Example: ``_parse_sets(["eval_prompts=4", "acflow:inner_epochs=1"])`` ->
    ``({"eval_prompts": 4}, {"acflow": {"inner_epochs": 1}})``.
    """
    if isinstance(methods, dict):  # arms: their names and their methods are scopes
        methods = list(dict.fromkeys([*methods, *methods.values()]))
    common: dict = {}
    per_method: dict[str, dict] = {}
    for item in sets:
        lhs, sep, value = item.partition("=")
        method, colon, key = lhs.rpartition(":")  # ("", "", lhs) without a colon
        key, method = key.strip().replace("-", "_"), method.strip()
        if not sep or not key or (colon and not method):
            raise SystemExit(f"flowalign bench train: --set expects KEY=VALUE or METHOD:KEY=VALUE, got {item!r}.")
        if method and methods is not None and method not in methods:
            raise SystemExit(f"flowalign bench train: --set {item}: {method!r} is not one of this sweep's --methods "
                             f"({' '.join(methods)}: an arm's name or a method).")
        if key in SWEEP_KEYS:
            hint = f"use {SWEEP_KEYS[key]}" if SWEEP_KEYS[key] else "the sweep sets it for every run"
            raise SystemExit(f"flowalign bench train: --set {key}=... is not allowed: {hint}.")
        try:
            parsed = parse_override(key, value)
        except ValueError as err:
            raise SystemExit(f"flowalign bench train: --set {item}: {err}") from None
        (per_method.setdefault(method, {}) if method else common)[key] = parsed
    return common, per_method


def arm_overrides(arms: dict[str, str], scoped: dict[str, dict]) -> dict[str, dict]:
    """Each arm's scoped overrides: its method's (``METHOD:KEY=VALUE``), then its own name's (``NAME:``, winning).

    Example: ``arm_overrides({"v0": "acflow", "v1": "acflow"}, {"acflow": {"critic": "latent", "inner_epochs": 1},
    "v1": {"critic": "zero"}})`` -> ``{"v0": {"critic": "latent", "inner_epochs": 1}, "v1": {"critic": "zero",
    "inner_epochs": 1}}``.
    """
    return {arm: {**scoped.get(method, {}), **scoped.get(arm, {})} for arm, method in arms.items()}


def _command(args, arms, kls, seeds, iterations) -> str:
    """The command line that reproduces this sweep (every setting explicit)."""
    methods = [arm if arm == method else f"{arm}={method}" for arm, method in arms.items()]
    parts = ["flowalign", "bench", "train", "--config", args.config, "--methods", *methods,
             "--kl", *[f"{k:g}" for k in kls], "--seeds", *[str(s) for s in seeds], "--iterations", str(iterations),
             "--workers", str(args.workers), "--out", args.out]
    if args.reward:
        parts += ["--reward", args.reward]
    for item in args.sets:
        parts += ["--set", item]
    if args.compare is not None:
        parts += ["--compare", args.compare]
    if args.baseline is not None:
        parts += ["--baseline", args.baseline]
    if args.quick:
        parts.append("--quick")
    if args.probe:
        parts += ["--probe", "--probe-batch", str(args.probe_batch)]
    if args.json:
        parts.append("--json")
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    arms = parse_methods(list(args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS)))
    kls = list(args.kl if args.kl is not None else (QUICK_KL if args.quick else DEFAULT_KL))
    seeds = list(args.seeds if args.seeds is not None else (QUICK_SEEDS if args.quick else DEFAULT_SEEDS))
    if args.workers < 1:
        raise SystemExit(f"flowalign bench train: --workers must be >= 1, got {args.workers}.")
    bad_kl = [k for k in kls if not (math.isfinite(k) and k >= 0)]
    if bad_kl:
        raise SystemExit(f"flowalign bench train: --kl values must be finite and >= 0 (nats per image), got {bad_kl}.")
    if not Path(args.config).exists():
        raise SystemExit(f"flowalign bench train: --config {args.config} does not exist; pass a YAML of ACFlowConfig "
                         "keys (e.g. samples/configs/acflow_shapes.yaml from the repository root).")

    common = dict(QUICK_OVERRIDES) if args.quick else {}
    sets, method_sets = _parse_sets(args.sets, arms)
    common.update(sets)
    per_arm = arm_overrides(arms, method_sets)
    compare = args.compare if args.compare is not None else ("acflow" if "acflow" in arms else None)
    if compare is not None and compare not in arms:  # checked before training anything
        raise SystemExit(f"flowalign bench train: --compare {compare!r} is not one of --methods ({' '.join(arms)}).")
    if args.baseline is not None and (compare is None or args.baseline not in arms or args.baseline == compare):
        raise SystemExit(f"flowalign bench train: --baseline {args.baseline!r} must be another arm of --methods "
                         f"({' '.join(arms)}) than --compare ({compare}); the decision compares the two.")
    if args.reward:
        common["reward"] = args.reward
    try:
        base = ACFlowConfig.from_yaml(args.config, common)
    except ValueError as err:
        raise SystemExit(f"flowalign bench train: {err}") from None
    if args.images is not None and args.images < 1 or args.iterations is not None and args.iterations < 1:
        raise SystemExit("flowalign bench train: --images and --iterations must be >= 1.")
    per_iteration = base.prompts_per_iteration * base.images_per_prompt
    if args.iterations is not None:
        iterations = args.iterations
    elif args.images is not None:
        iterations = max(1, args.images // per_iteration)
    else:
        iterations = QUICK_ITERATIONS if args.quick else max(1, DEFAULT_IMAGES // per_iteration)

    out = Path(args.out)
    jobs = []
    for arm, method in arms.items():
        for kl in kls:
            for seed in seeds:
                name = run_name(arm, kl, seed)
                overrides = {**common, **per_arm[arm], "algorithm": method, "kl_coef": kl,
                             "seed": seed, "iterations": iterations, "eval_every": 0, "eval_at_start": False,
                             "checkpoint_every": 0, "resume": False, "progress": False, "output_dir": str(out / name)}
                try:  # validate every run's config before training anything (unknown method, bad key)
                    ACFlowConfig.from_yaml(args.config, overrides)
                except ValueError as err:
                    hint = (" (this trainer has no kl_coef yet: it needs ACFlowConfig.kl_coef)"
                            if "kl_coef" in str(err) and "Unknown" in str(err) else "")
                    raise SystemExit(f"flowalign bench train: run {name}: {err}{hint}") from None
                jobs.append((name, arm, overrides))
    control_overrides = dict(common)  # the base config's method and seed: evaluate() does not depend on them

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // args.workers)
    done: dict[str, dict] = {}
    control = _load_if_done(out / "control" / "result.json", control_overrides)
    todo = []
    for name, arm, ov in jobs:  # finished runs (result.json written) are read back, not re-trained
        record = _load_if_done(out / name / "result.json", ov)
        if record is None:
            todo.append((name, arm, ov))
        else:
            done[name] = record
    missing = [name for name, _, _ in todo]
    if args.report_only:  # a partial sweep: report what finished, train nothing
        if control is None:
            raise SystemExit(f"flowalign bench train --report-only: no finished control under {out}; run the sweep "
                             "(without --report-only) first.")
        jobs, todo = [job for job in jobs if job[0] in done], []
    bar = tqdm(total=len(jobs) + 1, initial=len(done) + (control is not None), desc="bench train runs")
    if args.report_only:
        pass
    elif args.workers == 1:
        if control is None:
            control = _control_one(args.config, control_overrides, str(out), threads=0)
            bar.update(1)
        for name, arm, ov in todo:
            done[name] = _train_one(args.config, ov, str(out), threads=0, arm=arm)
            bar.update(1)
    else:  # one process per run, threads shared out
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_one, args.config, ov, str(out), threads, arm): name
                       for name, arm, ov in todo}
            if control is None:
                futures[pool.submit(_control_one, args.config, control_overrides, str(out), threads)] = "control"
            for future in as_completed(futures):
                name = futures[future]
                if name == "control":
                    control = future.result()
                else:
                    done[name] = future.result()
                bar.update(1)
    bar.close()

    signature = control["eval_signature"]
    runs = []
    for name, arm, _ in jobs:
        record = done[name]
        if record["eval_signature"] != signature:
            diff = {k: (record["eval_signature"].get(k), v) for k, v in signature.items()
                    if record["eval_signature"].get(k) != v}
            raise SystemExit(f"flowalign bench train: run {name} was evaluated with other settings than the control "
                             f"(run, control): {diff}; the gains would not be paired.")
        runs.append({"name": name, "arm": arm, "method": record["method"], "kl_coef": record["kl_coef"], "seed": record["seed"],
                     "images": record["images"], "iterations": record["iterations"],
                     "train_seconds": record["train_seconds"],
                     **run_measures(control["control"], record["final"])})
    summary = summarize(runs)
    control_means = {k: v for k, v in control["control"].items() if k != "per_image"}
    result = {
        "reward": base.reward, "command": _command(args, arms, kls, seeds, iterations),
        "config": {"path": args.config, "overrides": common, "method_overrides": method_sets, "arms": arms,
                   "arm_overrides": per_arm, "resolved": asdict(base)},
        "wall_seconds": time.perf_counter() - t_start, "control": control_means, "runs": runs, "summary": summary,
        "missing_runs": missing if args.report_only else [],
        "runs_wall_seconds": sum(done[name].get("wall_seconds", 0.0) for name, _, _ in jobs),
    }
    if compare is not None:
        result["comparison"] = [row for other in arms if other != compare
                                for axis in ("kl_measured", "diversity_ratio")
                                for row in compare_at_equal(summary, compare, other, axis)]
    if args.baseline is not None:
        result["decision"] = decide(summary, compare, args.baseline)
    if args.probe:
        result["probe"] = probe_reward(ACFlowConfig.from_yaml(args.config, {**common, "algorithm": "grpo",
                                                                             "output_dir": str(out / "probe")}),
                                       batch=args.probe_batch)
    result["wall_seconds"] = time.perf_counter() - t_start  # the sweep (runs re-used from result.json cost ~0)
    out.mkdir(parents=True, exist_ok=True)
    result = strict_json(result)  # NaN / inf (e.g. the SE over a single seed) are written as null
    write_json(out / "frontier.json", result)
    plot_frontier(summary, out / "frontier.png", reward=str(base.reward))
    if args.json:
        print(json.dumps({k: result[k] for k in ("reward", "command", "control", "summary", "comparison", "decision")
                          if k in result}, indent=1))
    else:
        print(format_table(summary, reward=str(base.reward)))
        if result.get("comparison"):
            print(f"\n{compare} against the others at equal measured KL and at equal diversity "
                  f"(SE over seeds; verdict at {VERDICT_SE:g} SE):\n" + format_comparison(result["comparison"]))
        if result.get("decision"):
            print(f"\ndecision (issue #23): {compare} against {args.baseline}'s frontier, difference ± SE at equal "
                  f"distance and at equal diversity:\n" + format_decision(result["decision"]))
        print(f"\ncontrol (no update): {json.dumps(control_means)}\nwrote {out / 'frontier.json'} and "
              f"{out / 'frontier.png'}")
    return 0
