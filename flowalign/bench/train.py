"""``flowalign bench train``: AC-Flow vs ORW-CFM-W2 vs Flow-GRPO at the same budget of sampled images.

Every algorithm runs with the same prompts per iteration, images per prompt, sampling steps,
reward and seeds, for ``--images`` sampled images; evaluations on held-out prompts every
``--eval-every`` iterations give reward-versus-images curves. The summary reports, per algorithm,
mean and std over seeds of the final held-out reward, unseen rewards, diversity (and its ratio to
the base model's), W2 to the reference samples, and seconds per iteration split into sampling /
reward / critic / actor (update for Flow-GRPO).

    flowalign bench train --json --seeds 0 1 2 --images 1536 --workers 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ALGORITHMS = ("acflow", "orw", "grpo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="samples/configs/acflow_shapes.yaml",
                        help="Base YAML config shared by all algorithms (default: the tiny shapes config).")
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=1536, help="Sampled-image budget per run (default 1536).")
    parser.add_argument("--eval-every", type=int, default=4)
    parser.add_argument("--out", default="runs/bench_train", help="Folder for the runs and bench_train.json.")
    parser.add_argument("--json", action="store_true", help="Print the JSON summary.")
    parser.add_argument("--workers", type=int, default=1,
                        help="Runs trained at once, each in its own process with torch threads = cores / workers "
                             "(default 1: one run at a time with every thread). Timings are then per worker.")


def summarize(runs: list[dict]) -> dict:
    """Mean / std over seeds of each algorithm's final evaluation and timings (pure; tested)."""
    out: dict[str, dict] = {}
    for algo in dict.fromkeys(r["algorithm"] for r in runs):
        rs = [r for r in runs if r["algorithm"] == algo]
        finals = [r["evals"][-1] for r in rs]
        entry: dict[str, object] = {"seeds": [r["seed"] for r in rs]}
        for key in finals[0]:
            if key in ("iteration", "images_seen"):
                continue
            vals = [f[key] for f in finals]
            entry[key] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals)}
        base_div = [r["evals"][0]["diversity"] for r in rs]
        entry["diversity_ratio_to_base"] = statistics.fmean(f["diversity"] / b for f, b in zip(finals, base_div))
        timing_keys = ("time_sampling", "time_reward", "time_critic", "time_actor", "time_update")
        entry["seconds_per_iteration"] = {
            k: statistics.fmean(statistics.fmean(m.get(k, 0.0) for m in r["metrics"]) for r in rs) for k in timing_keys
        }
        entry["curve"] = [  # reward vs images, averaged over seeds (same eval points for every seed)
            {"images_seen": pts[0]["images_seen"], **{k: statistics.fmean(p[k] for p in pts)
                                                      for k in pts[0] if k not in ("iteration", "images_seen")}}
            for pts in zip(*[r["evals"] for r in rs])
        ]
        out[algo] = entry
    return out


def _train_one(config: str, algo: str, seed: int, images: int, eval_every: int, out: str, threads: int) -> dict:
    """Train one (algorithm, seed) run for the image budget; returns its evaluations and metrics."""
    import torch

    from flowalign.trainer import ACFlowConfig, ACFlowTrainer

    if threads:
        torch.set_num_threads(threads)
    base = ACFlowConfig.from_yaml(config)
    iterations = max(1, images // (base.prompts_per_iteration * base.images_per_prompt))
    cfg = ACFlowConfig.from_yaml(config, {
        "algorithm": algo, "seed": seed, "iterations": iterations, "eval_every": eval_every,
        "output_dir": str(Path(out) / f"{algo}-seed{seed}"), "checkpoint_every": 0, "resume": False,
        "progress": threads == 0,
    })
    start = time.perf_counter()
    trainer = ACFlowTrainer(cfg)
    trainer.train()
    return {"algorithm": algo, "seed": seed, "iterations": iterations, "wall_seconds": time.perf_counter() - start,
            "evals": trainer.eval_history, "metrics": trainer.history}


def run(args: argparse.Namespace) -> int:
    import os

    out = Path(args.out)
    jobs = [(args.config, algo, seed, args.images, args.eval_every, str(out)) for algo in args.algorithms for seed in args.seeds]
    if args.workers < 1:
        raise SystemExit(f"flowalign bench train: --workers must be >= 1, got {args.workers}.")
    if args.workers == 1:
        runs = [_train_one(*job, threads=0) for job in jobs]
    else:  # one process per run, threads shared out; results kept in the order of jobs
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from tqdm.auto import tqdm

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // args.workers)
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_train_one, *job, threads=threads) for job in jobs]
            for f in tqdm(futures, desc="bench train runs"):
                f.result()
        runs = [f.result() for f in futures]
    summary = {"images_budget": args.images, "seeds": args.seeds, "config": args.config, "algorithms": summarize(runs)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_train.json").write_text(json.dumps({"summary": summary, "runs": runs}, indent=1))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_table(summary))
    return 0


def format_table(summary: dict) -> str:
    """Markdown table of the final figures (mean ± std over seeds)."""
    algos = summary["algorithms"]
    keys = [k for k in next(iter(algos.values())) if isinstance(next(iter(algos.values()))[k], dict) and "mean" in next(iter(algos.values()))[k]]
    rows = ["| algorithm | " + " | ".join(keys) + " | diversity / base | s/iter (sample, reward, critic, actor) |",
            "|---" * (len(keys) + 3) + "|"]
    for algo, e in algos.items():
        t = e["seconds_per_iteration"]
        actor = t["time_actor"] or t["time_update"]
        rows.append(f"| {algo} | " + " | ".join(f"{e[k]['mean']:.3f} ± {e[k]['std']:.3f}" for k in keys)
                    + f" | {e['diversity_ratio_to_base']:.2f} | {t['time_sampling']:.1f}, {t['time_reward']:.2f}, "
                    f"{t['time_critic']:.1f}, {actor:.1f} |")
    return "\n".join(rows)
