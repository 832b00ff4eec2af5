"""``flowalign bench train``: the fine-tuning frontier, held-out reward gain against measured KL to the base.

Every method (``--methods``) is trained at every regulariser strength ``--kl`` (``ACFlowConfig.kl_coef``, in
nats per image, mapped by the trainer onto each method's own knob) and every seed, for the same budget of
sampled images. One no-update control (a fresh trainer's ``evaluate()``: the base model on the same held-out
prompts, seeds and noises, ``ACFlowConfig.eval_seed``) serves every run, so each run's gain is a *paired*
difference over the same images, with its paired standard error. Per run it records::

    reward_gain, reward_gain_se        mean_i (r_run_i - r_control_i) and std(ddof 1) / sqrt(n), same images i
    eval_<name>_gain, eval_<name>_gain_se   the same for each unseen reward
    kl_measured                        mean_i KL(p_run || p_base) in nats per image (flowalign.eval.sde_path_kl)
    diversity_ratio                    diversity_run / diversity_control
    w2_to_reference, images, train_seconds, method, kl_coef, seed

and per (method, kl_coef) the mean ± SE over seeds. Written to ``--out``: ``frontier.json``, ``frontier.png``
(gain vs KL and gain vs diversity ratio) and one ``<method>-kl<k>-seed<s>/result.json`` per run as it
finishes; a re-run skips runs whose result exists, so a crash loses nothing.

    flowalign bench train --quick --out runs/frontier_quick                 # CI-sized, well under a minute
    flowalign bench train --methods acflow grpo --kl 0 0.1 1 --seeds 0 1 2 --images 1536 --workers 2
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shlex
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from flowalign.checkpoints import strict_json, write_json
from flowalign.config import ACFlowConfig, parse_override
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
# Config keys that decide the held-out images: a run is paired with the control only if these agree.
EVAL_KEYS = ("eval_seed", "eval_prompts", "eval_prompt_file", "eval_images_per_prompt", "eval_steps", "eval_rewards",
             "eval_kl", "guidance_scale", "noise_level", "sample_steps", "reward", "pretrained", "prompts")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="samples/configs/acflow_shapes.yaml",
                        help="Base YAML config shared by every run (default: the tiny shapes config).")
    parser.add_argument("--methods", "--algorithms", nargs="+", default=None,
                        help=f"Methods (ACFlowConfig.algorithm values; default {' '.join(DEFAULT_METHODS)}).")
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
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="[METHOD:]KEY=VALUE",
                        help="Extra ACFlowConfig override applied to every run, or with METHOD: to that method's "
                             "runs only (per-method optimiser settings; repeatable). The control gets the "
                             "unscoped ones.")
    parser.add_argument("--compare", default=None, metavar="METHOD",
                        help="Compare this method's points with every other method's frontier at equal measured KL "
                             "and at equal diversity (frontier.json 'comparison'; default acflow when swept).")
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
def run_name(method: str, kl_coef: float, seed: int) -> str:
    """Folder of one run: ``run_name("grpo", 0.03, 1) == "grpo-kl0.03-seed1"``."""
    return f"{method}-kl{kl_coef:g}-seed{seed}"


def run_measures(control: dict, final: dict) -> dict:
    """A run's paired measures against the control, from the two ``evaluate()`` dicts.

    Both carry ``per_image`` lists in the same image order (same eval settings), so
    ``gain = mean_i (run_i - control_i)`` and ``se = std_i(run_i - control_i, ddof=1) / sqrt(n)``
    (:func:`flowalign.eval.paired_difference`), for the training reward and each ``eval_<name>``.
    ``diversity_ratio = diversity_run / diversity_control``; ``kl_measured`` = mean per-image KL (nats).

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
    if "kl_to_reference" in run_items:
        out["kl_measured"], out["kl_measured_se"] = mean_se(run_items["kl_to_reference"])
    else:
        out["kl_measured"], out["kl_measured_se"] = float("nan"), float("nan")
    cd = control.get("diversity", float("nan"))
    out["diversity_ratio"] = final["diversity"] / cd if cd and math.isfinite(cd) else float("nan")
    out["diversity"] = final["diversity"]
    out["w2_to_reference"] = final.get("w2_to_reference", float("nan"))
    out["reward"] = final["reward"]
    return out


def _finite_mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return mean_se(values) if values else (float("nan"), float("nan"))


def summarize(runs: list[dict]) -> list[dict]:
    """Per (method, kl_coef), in order of first appearance then kl_coef: mean ± SE over seeds.

    For every ``*_gain`` key, ``kl_measured`` and ``diversity_ratio``: ``{key: mean, key + "_se_seeds": SE over
    seeds (NaN for one seed)}``, plus ``<gain>_paired_se``, the mean of the runs' paired standard errors (the
    held-out evaluation's own noise), and ``seeds``, ``n_seeds``.

    Example: gains 0.1 and 0.3 over two seeds -> ``reward_gain 0.2``, ``reward_gain_se_seeds 0.1``.
    """
    methods = list(dict.fromkeys(r["method"] for r in runs))
    rows = []
    for method in methods:
        for kl in sorted({r["kl_coef"] for r in runs if r["method"] == method}):
            rs = [r for r in runs if r["method"] == method and r["kl_coef"] == kl]
            row: dict[str, Any] = {"method": method, "kl_coef": kl, "seeds": [r["seed"] for r in rs],
                                   "n_seeds": len(rs)}
            gain_keys = [k for k in rs[0] if k.endswith("_gain")]
            for key in gain_keys + ["kl_measured", "diversity_ratio", "w2_to_reference"]:
                row[key], row[f"{key}_se_seeds"] = _finite_mean_se([r.get(key) for r in rs])
            for key in gain_keys:
                row[f"{key}_paired_se"] = _finite_mean_se([r.get(f"{key}_se") for r in rs])[0]
            rows.append(row)
    return rows


# The house rule for a difference: under ~3 standard errors it is noise.
VERDICT_SE = 3.0


def compare_at_equal(summary: list[dict], method: str, other: str, axis: str) -> list[dict]:
    """``method``'s frontier points against ``other``'s frontier at the same ``axis`` value (equal KL or diversity).

    For each (``method``, kl_coef) point at ``x`` = its mean ``axis`` value (``"kl_measured"`` or
    ``"diversity_ratio"``), ``other``'s gain at ``x`` is interpolated linearly between its two points that bracket
    ``x`` (in ``log x`` for ``kl_measured``), its standard error likewise. The standard error of each point is the
    SE over seeds (the mean paired SE where a point has one seed: ``se_kind``). The difference
    ``d = gain - other_gain`` with ``se = sqrt(se^2 + se_other^2)`` gives ``verdict``: ``"above"`` if
    ``d > VERDICT_SE se``, ``"below"`` if ``d < -VERDICT_SE se``, else ``"level"`` (noise); ``"outside"`` where ``x``
    is outside ``other``'s measured range (no extrapolation).

    Example: other's gains 0.1 at KL 1 and 0.3 at KL 4, method's 0.5 ± 0.01 at KL 2 -> other's 0.2 at KL 2
    (halfway in log KL), ``d = 0.3``, ``verdict "above"``.
    """
    if axis not in ("kl_measured", "diversity_ratio"):
        raise ValueError(f"axis={axis!r}: choose 'kl_measured' or 'diversity_ratio'.")

    def se_of(row: dict) -> tuple[float, str]:
        seeds = row.get("reward_gain_se_seeds", float("nan"))
        if seeds is not None and math.isfinite(seeds):
            return seeds, "seeds"
        return row["reward_gain_paired_se"], "paired"

    def coord(x: float) -> float:
        return math.log(x) if axis == "kl_measured" else x

    ref = sorted((r for r in summary if r["method"] == other and r[axis] is not None and math.isfinite(r[axis])
                  and (axis != "kl_measured" or r[axis] > 0)), key=lambda r: r[axis])
    out = []
    for row in (r for r in summary if r["method"] == method):
        x = row[axis]
        se, kind = se_of(row)
        item = {"method": method, "kl_coef": row["kl_coef"], "other": other, "axis": axis, axis: x,
                "gain": row["reward_gain"], "se": se, "se_kind": kind}
        lo = [r for r in ref if r[axis] <= x]
        hi = [r for r in ref if r[axis] >= x]
        if not lo or not hi or (axis == "kl_measured" and x <= 0):
            out.append({**item, "verdict": "outside"})
            continue
        a, b = lo[-1], hi[0]
        t = 0.0 if a is b or coord(b[axis]) == coord(a[axis]) else (coord(x) - coord(a[axis])) / (
            coord(b[axis]) - coord(a[axis]))
        (sa, ka), (sb, kb) = se_of(a), se_of(b)
        other_gain = (1 - t) * a["reward_gain"] + t * b["reward_gain"]
        other_se = (1 - t) * sa + t * sb
        diff, diff_se = row["reward_gain"] - other_gain, math.hypot(se, other_se)
        z = diff / diff_se if diff_se > 0 else float("inf") * (1 if diff > 0 else -1 if diff < 0 else 0)
        verdict = "above" if z > VERDICT_SE else "below" if z < -VERDICT_SE else "level"
        out.append({**item, "other_gain": other_gain, "other_se": other_se,
                    "other_se_kind": ka if ka == kb else "mixed", "difference": diff, "difference_se": diff_se,
                    "z": z, "verdict": verdict})
    return out


def format_comparison(rows: list[dict]) -> str:
    """Markdown table of :func:`compare_at_equal` rows."""
    lines = ["| method | kl_coef | other | at | gain ± SE | other's gain ± SE | difference ± SE | z | verdict |",
             "|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        at = f"{'KL' if r['axis'] == 'kl_measured' else 'diversity'} {r[r['axis']]:.3g}"
        if r["verdict"] == "outside":
            cells = [_fmt(r["gain"], r["se"]), "outside its range", "", "", "outside"]
        else:
            cells = [_fmt(r["gain"], r["se"]), _fmt(r["other_gain"], r["other_se"]),
                     _fmt(r["difference"], r["difference_se"]), f"{r['z']:.1f}", r["verdict"]]
        lines.append("| " + " | ".join([r["method"], f"{r['kl_coef']:g}", r["other"], at] + cells) + " |")
    return "\n".join(lines)


def _fmt(mean: float, se: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if math.isfinite(se) else "")


def format_table(summary: list[dict], reward: str = "reward") -> str:
    """Markdown table of the summary: gain ± SE over seeds, the mean paired SE, KL, diversity ratio, unseen gains."""
    unseen = [k for k in (summary[0] if summary else {}) if k.startswith("eval_") and k.endswith("_gain")]
    head = (["method", "kl_coef", "seeds", f"{reward} gain ± SE(seeds)", "paired SE", "KL (nats/image)",
             "diversity / control"] + [k.removesuffix("_gain").removeprefix("eval_") + " gain" for k in unseen])
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [r["method"], f"{r['kl_coef']:g}", str(r["n_seeds"]),
                 _fmt(r["reward_gain"], r["reward_gain_se_seeds"]), _fmt(r["reward_gain_paired_se"], float("nan")),
                 _fmt(r["kl_measured"], r["kl_measured_se_seeds"], 4),
                 _fmt(r["diversity_ratio"], r["diversity_ratio_se_seeds"], 2)]
        cells += [_fmt(r[k], r[f"{k}_se_seeds"]) for k in unseen]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot_frontier(summary: list[dict], path: str | os.PathLike, reward: str = "reward") -> None:
    """``frontier.png``: held-out reward gain vs measured KL (left) and vs diversity ratio (right).

    One curve per method through its kl_coef values in order, error bars = SE over seeds (both axes; the paired
    SE over the held-out images for the gain of a single-seed point); the
    control is the star at zero gain (KL 0, diversity ratio 1). The KL axis is symlog: logarithmic above the
    decade below the smallest positive measured KL, linear below it, so the control at KL 0 is drawn.
    """
    import matplotlib  # heavy, and only needed for the figure

    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt  # after use("Agg")

    fig, (ax_kl, ax_div) = plt.subplots(1, 2, figsize=(11, 4.6), constrained_layout=True)
    for method in dict.fromkeys(r["method"] for r in summary):
        rows = sorted((r for r in summary if r["method"] == method), key=lambda r: r["kl_coef"])
        y = [r["reward_gain"] for r in rows]
        # SE over seeds; with one seed (no spread to measure) the run's paired SE over the held-out images
        yerr = [_nan0(r["reward_gain_se_seeds"] if r["n_seeds"] > 1 else r["reward_gain_paired_se"]) for r in rows]
        line = ax_kl.errorbar([r["kl_measured"] for r in rows], y, yerr=yerr,
                              xerr=[_nan0(r["kl_measured_se_seeds"]) for r in rows],
                              marker="o", capsize=3, label=method)
        ax_div.errorbar([r["diversity_ratio"] for r in rows], y, yerr=yerr,
                        xerr=[_nan0(r["diversity_ratio_se_seeds"]) for r in rows],
                        marker="o", capsize=3, label=method, color=line[0].get_color())
        for r in rows:
            ax_kl.annotate(f"{r['kl_coef']:g}", (r["kl_measured"], r["reward_gain"]), textcoords="offset points",
                           xytext=(4, 4), fontsize=7)
    ax_kl.plot([0.0], [0.0], marker="*", markersize=12, color="black", linestyle="none", label="no-update control")
    ax_div.plot([1.0], [0.0], marker="*", markersize=12, color="black", linestyle="none", label="no-update control")
    kls = [r["kl_measured"] for r in summary if math.isfinite(r["kl_measured"])]
    positive = [k for k in kls if k > 0]
    if positive:  # log-like, but the control (and kl_coef 0 runs) sit at KL 0: symlog, linear below a decade
        ax_kl.set_xscale("symlog", linthresh=10.0 ** math.floor(math.log10(min(positive))))
    for ax in (ax_kl, ax_div):
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_ylabel(f"held-out {reward} gain vs control\n(paired, reward units)")
        ax.grid(alpha=0.3)
    ax_kl.set_xlabel("measured KL(fine-tuned || base) (nats per image; symlog)")
    ax_div.set_xlabel("diversity ratio (run / control)")
    bars = "SE over seeds" if all(r["n_seeds"] > 1 for r in summary) else "SE over seeds; paired SE where one seed"
    ax_kl.set_title("reward gain vs KL to the base (labels: kl_coef)")
    fig.suptitle(f"error bars: {bars}", fontsize=8)
    ax_div.set_title("reward gain vs diversity kept")
    ax_kl.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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


def _train_one(config: str, overrides: dict, out: str, threads: int) -> dict:
    """Train one (method, kl_coef, seed) run; writes and returns its ``result.json`` record (with per_image)."""
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
    record = {"method": cfg.algorithm, "kl_coef": cfg.kl_coef, "seed": cfg.seed, "iterations": cfg.iterations,
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


def _parse_sets(sets: list[str], methods: list[str] | None = None) -> tuple[dict, dict[str, dict]]:
    """``--set`` items: ``KEY=VALUE`` for every run, ``METHOD:KEY=VALUE`` for that method's runs only.

    Returns ``(common, per_method)``. A method-scoped item must name one of ``methods`` (when given): a typo would
    otherwise silently leave that method on the base config.
    Example: ``_parse_sets(["eval_prompts=4", "acflow:inner_epochs=1"])`` ->
    ``({"eval_prompts": 4}, {"acflow": {"inner_epochs": 1}})``.
    """
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
                             f"({' '.join(methods)}).")
        if key in SWEEP_KEYS:
            hint = f"use {SWEEP_KEYS[key]}" if SWEEP_KEYS[key] else "the sweep sets it for every run"
            raise SystemExit(f"flowalign bench train: --set {key}=... is not allowed: {hint}.")
        try:
            parsed = parse_override(key, value)
        except ValueError as err:
            raise SystemExit(f"flowalign bench train: --set {item}: {err}") from None
        (per_method.setdefault(method, {}) if method else common)[key] = parsed
    return common, per_method


def _command(args, methods, kls, seeds, iterations) -> str:
    """The command line that reproduces this sweep (every setting explicit)."""
    parts = ["flowalign", "bench", "train", "--config", args.config, "--methods", *methods,
             "--kl", *[f"{k:g}" for k in kls], "--seeds", *[str(s) for s in seeds], "--iterations", str(iterations),
             "--workers", str(args.workers), "--out", args.out]
    if args.reward:
        parts += ["--reward", args.reward]
    for item in args.sets:
        parts += ["--set", item]
    if args.compare is not None:
        parts += ["--compare", args.compare]
    if args.quick:
        parts.append("--quick")
    if args.probe:
        parts += ["--probe", "--probe-batch", str(args.probe_batch)]
    if args.json:
        parts.append("--json")
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    methods = list(args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS))
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
    sets, method_sets = _parse_sets(args.sets, methods)
    common.update(sets)
    compare = args.compare if args.compare is not None else ("acflow" if "acflow" in methods else None)
    if compare is not None and compare not in methods:  # checked before training anything
        raise SystemExit(f"flowalign bench train: --compare {compare!r} is not one of --methods ({' '.join(methods)}).")
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
    for method in methods:
        for kl in kls:
            for seed in seeds:
                name = run_name(method, kl, seed)
                overrides = {**common, **method_sets.get(method, {}), "algorithm": method, "kl_coef": kl,
                             "seed": seed, "iterations": iterations, "eval_every": 0, "eval_at_start": False,
                             "checkpoint_every": 0, "resume": False, "progress": False, "output_dir": str(out / name)}
                try:  # validate every run's config before training anything (unknown method, bad key)
                    ACFlowConfig.from_yaml(args.config, overrides)
                except ValueError as err:
                    hint = (" (this trainer has no kl_coef yet: it needs ACFlowConfig.kl_coef)"
                            if "kl_coef" in str(err) and "Unknown" in str(err) else "")
                    raise SystemExit(f"flowalign bench train: run {name}: {err}{hint}") from None
                jobs.append((name, overrides))
    control_overrides = dict(common)  # the base config's method and seed: evaluate() does not depend on them

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // args.workers)
    done: dict[str, dict] = {}
    control = _load_if_done(out / "control" / "result.json", control_overrides)
    todo = []
    for name, ov in jobs:  # finished runs (result.json written) are read back, not re-trained
        record = _load_if_done(out / name / "result.json", ov)
        if record is None:
            todo.append((name, ov))
        else:
            done[name] = record
    missing = [name for name, _ in todo]
    if args.report_only:  # a partial sweep: report what finished, train nothing
        if control is None:
            raise SystemExit(f"flowalign bench train --report-only: no finished control under {out}; run the sweep "
                             "(without --report-only) first.")
        jobs, todo = [(name, ov) for name, ov in jobs if name in done], []
    bar = tqdm(total=len(jobs) + 1, initial=len(done) + (control is not None), desc="bench train runs")
    if args.report_only:
        pass
    elif args.workers == 1:
        if control is None:
            control = _control_one(args.config, control_overrides, str(out), threads=0)
            bar.update(1)
        for name, ov in todo:
            done[name] = _train_one(args.config, ov, str(out), threads=0)
            bar.update(1)
    else:  # one process per run, threads shared out
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_one, args.config, ov, str(out), threads): name for name, ov in todo}
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
    for name, _ in jobs:
        record = done[name]
        if record["eval_signature"] != signature:
            diff = {k: (record["eval_signature"].get(k), v) for k, v in signature.items()
                    if record["eval_signature"].get(k) != v}
            raise SystemExit(f"flowalign bench train: run {name} was evaluated with other settings than the control "
                             f"(run, control): {diff}; the gains would not be paired.")
        runs.append({"name": name, "method": record["method"], "kl_coef": record["kl_coef"], "seed": record["seed"],
                     "images": record["images"], "iterations": record["iterations"],
                     "train_seconds": record["train_seconds"],
                     **run_measures(control["control"], record["final"])})
    summary = summarize(runs)
    control_means = {k: v for k, v in control["control"].items() if k != "per_image"}
    result = {
        "reward": base.reward, "command": _command(args, methods, kls, seeds, iterations),
        "config": {"path": args.config, "overrides": common, "method_overrides": method_sets,
                   "resolved": asdict(base)},
        "wall_seconds": time.perf_counter() - t_start, "control": control_means, "runs": runs, "summary": summary,
        "missing_runs": missing if args.report_only else [],
        "runs_wall_seconds": sum(done[name].get("wall_seconds", 0.0) for name, _ in jobs),
    }
    if compare is not None:
        result["comparison"] = [row for other in methods if other != compare
                                for axis in ("kl_measured", "diversity_ratio")
                                for row in compare_at_equal(summary, compare, other, axis)]
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
        print(json.dumps({k: result[k] for k in ("reward", "command", "control", "summary", "comparison")
                          if k in result}, indent=1))
    else:
        print(format_table(summary, reward=str(base.reward)))
        if result.get("comparison"):
            print(f"\n{compare} against the others at equal measured KL and at equal diversity "
                  f"(SE over seeds; verdict at {VERDICT_SE:g} SE):\n" + format_comparison(result["comparison"]))
        print(f"\ncontrol (no update): {json.dumps(control_means)}\nwrote {out / 'frontier.json'} and "
              f"{out / 'frontier.png'}")
    return 0
