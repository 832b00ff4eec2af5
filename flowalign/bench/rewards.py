"""``flowalign bench rewards``: throughput of every reward and the overhead of the wrapper.

For each reward, on tiny checkpoints saved in the official layouts (``flowalign.rewards.testing``):

- ``images_per_s``: images scored per second through the public call ``reward(images, prompts)``;
- ``overhead``: ``t_wrapper / t_direct - 1``, where ``t_direct`` calls the reward's model computation
  directly (``score_chunk``: torch preprocessing, tokenisation, model forward, score formula) on the
  same batch, and ``t_wrapper`` adds what :class:`~flowalign.rewards.Reward` does around it (input
  range/shape/prompt checks, chunking, ``no_grad``, NaN check, dtype cast). Target: < 5% at batch 32.
- ``overhead_from_wrapper_cost``: the same ratio from ``wrapper_cost_s``, the time the wrapper takes
  around a free model (measured once, many repeats): less noisy than a difference of two timings.

Timings are medians over interleaved repeats (the machine is shared; ratios measured side by side
are what we trust). The tiny models are far cheaper than real ones, so the overhead measured here is
an upper bound on what real checkpoints see. ``max_abs_difference`` checks that both paths give the
same scores.

Example::

    flowalign bench rewards --json
    flowalign bench rewards --batch-size 32 --image-size 256 --device cuda --json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from flowalign.rewards import Reward, load
from flowalign.rewards.testing import save_tiny_checkpoints
from flowalign.shapes import heldout_prompts, render_prompt

DEFAULT_REWARDS = (
    "pickscore",
    "hpsv2.1",
    "imagereward",
    "aesthetic",
    "clipscore",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "shapes",
    "shapes_binary",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    parser.add_argument("--batch-size", type=int, default=32, help="Images per call (default 32).")
    parser.add_argument("--image-size", type=int, default=64, help="Side of the square input images (default 64).")
    parser.add_argument("--repeats", type=int, default=7, help="Timed calls per path and reward (default 7).")
    parser.add_argument("--rewards", nargs="+", default=list(DEFAULT_REWARDS), help="Rewards to time.")
    parser.add_argument("--device", default="cpu", help="Device of images and models (default cpu).")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(batch_size: int, image_size: int, device) -> tuple[Any, list[str]]:
    """Shapes-world renders and their prompts (valid for every reward, verifier included)."""
    prompts = heldout_prompts(batch_size)
    rng = np.random.default_rng(0)
    images = torch.stack([torch.from_numpy(render_prompt(p, rng)).permute(2, 0, 1) for p in prompts]).float() / 255
    if images.shape[-1] != image_size:
        images = F.interpolate(images, size=(image_size, image_size), mode="nearest")
    return images.to(device), prompts


def time_reward(reward, images, prompts, repeats: int) -> dict[str, float]:
    """Median seconds of ``reward(images, prompts)`` and of ``reward.score_chunk`` (same batch, same
    grad mode), interleaved; plus images/s, the overhead ratio and the largest score difference."""

    reward.batch_size = images.shape[0]
    grad = contextlib.nullcontext if reward.differentiable else torch.no_grad

    def wrapper():
        return reward(images, prompts)

    def direct():
        with grad():
            return reward.score_chunk(images, list(prompts))

    difference = (wrapper().double() - direct().double()).abs().max().item()  # also warms both paths up
    times: dict[str, list[float]] = {"wrapper": [], "direct": []}
    for _ in range(repeats):
        for name, call in (("wrapper", wrapper), ("direct", direct)):
            _sync(images.device)
            start = time.perf_counter()
            call()
            _sync(images.device)
            times[name].append(time.perf_counter() - start)
    wrapper_s, direct_s = statistics.median(times["wrapper"]), statistics.median(times["direct"])
    return {
        "images_per_s": images.shape[0] / wrapper_s,
        "wrapper_s": wrapper_s,
        "direct_s": direct_s,
        "overhead": wrapper_s / direct_s - 1.0,
        "overhead_of_fastest": min(times["wrapper"]) / min(times["direct"]) - 1.0,
        "max_abs_difference": difference,
    }


def wrapper_cost(images, prompts, repeats: int = 50) -> float:
    """Median seconds that the :class:`~flowalign.rewards.Reward` machinery alone adds to one call:
    a reward whose model is free (``score_chunk`` returns a slice of the input), so all the time is
    checks, chunking, grad mode, NaN check and dtype cast. Stable where the difference of two noisy
    model timings is not."""

    class Free(Reward):
        name = "free"

        def score_chunk(self, images, prompts):
            return images[:, 0, 0, 0]

    free = Free(batch_size=images.shape[0])
    free(images, prompts)
    times = []
    for _ in range(repeats):
        _sync(images.device)
        start = time.perf_counter()
        free(images, prompts)
        _sync(images.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_benchmark(
    rewards: list[str], batch_size: int = 32, image_size: int = 64, repeats: int = 7, device: str = "cpu"
) -> dict[str, Any]:
    """Time ``rewards`` (registry names) on tiny checkpoints; returns the JSON-able results."""
    device = torch.device(device)
    images, prompts = _inputs(batch_size, image_size, device)
    results: dict[str, Any] = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "image_size": image_size,
        "repeats": repeats,
        "target_overhead": 0.05,
        "rewards": {},
    }
    cost = wrapper_cost(images, prompts)
    results["wrapper_cost_s"] = cost
    with tempfile.TemporaryDirectory() as root:
        checkpoints = save_tiny_checkpoints(root, names=list(rewards))
        for name in rewards:
            reward = load(name, **checkpoints.get(name, {})).to(device)
            result = time_reward(reward, images, prompts, repeats)
            result["overhead_from_wrapper_cost"] = cost / result["direct_s"]
            results["rewards"][name] = result
    return results


def run(args: argparse.Namespace) -> int:
    results = run_benchmark(args.rewards, args.batch_size, args.image_size, args.repeats, args.device)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0

    table = Table(title=f"Rewards at batch {results['batch_size']}, {results['image_size']} px, {results['device']}")
    for column in ("reward", "images/s", "wrapper ms", "direct ms", "overhead", "from wrapper cost"):
        table.add_column(column, justify="right")
    for name, r in results["rewards"].items():
        table.add_row(
            name,
            f"{r['images_per_s']:.1f}",
            f"{1e3 * r['wrapper_s']:.2f}",
            f"{1e3 * r['direct_s']:.2f}",
            f"{100 * r['overhead']:+.1f}%",
            f"{100 * r['overhead_from_wrapper_cost']:.2f}%",
        )
    Console().print(table)
    print(f"wrapper cost per call: {1e6 * results['wrapper_cost_s']:.0f} us")
    return 0
