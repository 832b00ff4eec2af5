"""Fixtures shared by the test files: the tiny SD3 pipeline and a LoRA of it on disk, a tiny training config, a
trainer of it and a copy of its LoRA, a launcher of scripts on several CPU processes, tiny reward checkpoints, a cheap
reward, image conversion, and a fake clock for the benchmarks.

Markers (registered in pyproject.toml): ``slow``; ``docs`` for tests that read README.md or docs/; ``committed`` for
tests that check committed outputs (``samples/``, the embedded base model's card) against the code. Everything but
those two::

    python -m pytest -m "not docs and not committed"
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def redness() -> Callable:
    """A cheap differentiable reward of ``(images, prompts)``: mean red minus half the mean of green and blue.

    Example: a pure red image scores 1, a white one 1 - 0.5 = 0.5, a blue one -0.25.
    """

    def redness(images: torch.Tensor, prompts) -> torch.Tensor:
        return images[:, 0].mean((1, 2)) - 0.5 * images[:, 1:].mean((1, 2, 3))  # r - (g + b) / 4

    return redness


@pytest.fixture(scope="session")
def tiny_pipeline() -> Callable:
    """``tiny_pipeline(seed=0, num_layers=None, **kwargs)``: a fresh random tiny ``StableDiffusion3Pipeline``
    (``flowalign.tiny.build_tiny_sd3_pipeline``) on every call, so a test may change it freely."""
    # diffusers is heavy: imported only by the tests that use the fixture
    from flowalign.tiny import build_tiny_sd3_pipeline

    def build(seed: int = 0, num_layers: int | None = None, **kwargs):
        if num_layers is not None:
            kwargs["num_layers"] = num_layers
        return build_tiny_sd3_pipeline(seed=seed, **kwargs)

    return build


# The tiny training run the trainer tests start from: 2 prompts x 2 images, 3 steps, one minibatch of 4, one epoch,
# no evaluation, a rank-4 LoRA at scale alpha / r = 1 (a few seconds an iteration on one CPU core).
TINY_TRAINING = {
    "prompts_per_iteration": 2, "images_per_prompt": 2, "sample_steps": 3, "minibatch_size": 4, "inner_epochs": 1,
    "noise_draws": 1, "eval_prompts": 0, "progress": False, "lora_rank": 4, "lora_alpha": 4.0,
}


@pytest.fixture(scope="session")
def tiny_config() -> Callable:
    """``tiny_config(output_dir, **overrides)``: an ``ACFlowConfig`` of the tiny training run (``TINY_TRAINING``) with
    ``overrides`` on top. Example: ``tiny_config(tmp_path, algorithm="orw").minibatch_size`` is 4."""
    # flowalign.config pulls in the method registry: imported only by the tests that use the fixture
    from flowalign.config import ACFlowConfig

    def make(output_dir: str | Path, **overrides) -> ACFlowConfig:
        return ACFlowConfig(output_dir=str(output_dir), **{**TINY_TRAINING, **overrides})

    return make


@pytest.fixture(scope="session")
def make_trainer(tiny_config, tiny_pipeline, redness) -> Callable:
    """``make_trainer(output_dir, reward=None, pipeline=None, accelerator=None, prompt_source=None, **overrides)``:
    an ``ACFlowTrainer`` of ``tiny_config(output_dir, **overrides)`` (config keys, ``prompts`` included) on a fresh
    1-layer seed-0 ``tiny_pipeline`` (or ``pipeline``), rewarded by ``redness`` (or ``reward``); ``prompt_source`` is
    the trainer's ``prompts`` argument (a list of prompts in place of the config's). Example:
    ``make_trainer(tmp_path, algorithm="orw").step()``."""
    # the trainer imports diffusers, peft and accelerate: imported only by the tests that use the fixture
    from flowalign.trainer import ACFlowTrainer

    def make(output_dir: str | Path, reward: Callable | None = None, pipeline=None, accelerator=None,
             prompt_source=None, **overrides):
        return ACFlowTrainer(tiny_config(output_dir, **overrides), reward=reward if reward is not None else redness,
                             pipeline=pipeline if pipeline is not None else tiny_pipeline(seed=0, num_layers=1),
                             accelerator=accelerator, prompts=prompt_source)

    return make


@pytest.fixture(scope="session")
def lora_state() -> Callable:
    """``lora_state(trainer)``: a detached copy of the trainer's LoRA weights, ``{peft key: tensor}``, to compare
    before and after an update."""
    # peft is heavy: imported only by the tests that use the fixture
    from peft.utils import get_peft_model_state_dict

    def copy(trainer) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.unwrapped).items()}

    return copy


@pytest.fixture(scope="session")
def accelerate_launch() -> Callable:
    """``accelerate_launch(script, *args, processes=2, port=29500)``: run the Python file ``script`` with ``args``
    under ``accelerate launch`` on ``processes`` CPU processes of one thread each (``--multi_gpu`` with no GPU starts
    torch.distributed on the CPU over gloo: what a user of 2 CPU processes types). A non-zero exit fails the test with
    the end of its stderr. Example: ``accelerate_launch(tmp_path / "dist.py", tmp_path, processes=2, port=29533)``."""

    def launch(script: Path, *args, processes: int = 2, port: int = 29500) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *(["--multi_gpu"] if processes > 1 else []),
               "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
               "no", "--main_process_port", str(port), str(script), *map(str, args)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    return launch


@pytest.fixture(scope="session")
def tiny_base_and_lora(tmp_path_factory, tiny_pipeline) -> tuple[Path, Path]:
    """``(base_dir, lora_dir)``: the seed-0 tiny pipeline saved with ``save_pretrained`` and a random PEFT LoRA of
    its transformer (adapter "ft", rank 4, seed 1, std 0.1, so the fine-tuned model differs from the base), saved
    as Flow-GRPO publishes LoRAs. Written once per session; read-only for the tests."""
    # peft / diffusers are heavy: imported only by the tests that use the fixture
    from flowalign.pipelines.lora_utils import add_random_lora, save_peft_adapter

    root = tmp_path_factory.mktemp("tiny-base-and-lora")
    pipe = tiny_pipeline(seed=0)
    pipe.save_pretrained(root / "base")
    add_random_lora(pipe.transformer, "ft", rank=4, seed=1, std=0.1)
    save_peft_adapter(pipe.transformer, "ft", root / "lora")
    return root / "base", root / "lora"


@pytest.fixture(scope="session")
def tiny_reward_checkpoints(tmp_path_factory) -> Callable:
    """``tiny_reward_checkpoints(*names)`` -> ``{name: load() kwargs}``: tiny checkpoints in the official layouts
    (``flowalign.rewards.testing.save_tiny_checkpoints``), each written once per session; no names: every
    model-based reward. Example: ``rewards.load("pickscore", **tiny_reward_checkpoints("pickscore")["pickscore"])``."""
    # transformers / open_clip are heavy: imported only by the tests that use the fixture
    from flowalign.rewards.testing import TINY_BUILDERS, save_tiny_checkpoints

    root = tmp_path_factory.mktemp("tiny-rewards")
    saved: dict[str, dict[str, str]] = {}

    def get(*names: str) -> dict[str, dict[str, str]]:
        wanted = list(names) or [n for n in TINY_BUILDERS if n != "hpsv2"]
        missing = [n for n in wanted if n not in saved]
        if missing:
            saved.update(save_tiny_checkpoints(root, names=missing))
        return {n: saved[n] for n in wanted if n in saved}

    return get


@pytest.fixture(scope="session")
def as_tensor() -> Callable:
    """``as_tensor(images)``: uint8 ``[H, W, 3]`` arrays, PIL images or image file paths -> a float ``[B, 3, H, W]``
    tensor in [0, 1] (the rewards' input convention)."""

    def convert(images: Iterable) -> torch.Tensor:
        arrays = []
        for image in images:
            if isinstance(image, (str, Path)):
                image = Image.open(image)
            arrays.append(np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image))
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255  # uint8 -> [0, 1]

    return convert


class FakeClock:
    """A stand-in for the ``time`` module of a benchmark: ``perf_counter()`` reads ``now``, which advances by
    ``tick`` at every read and by whatever the code under test adds with ``advance``. Timings taken with it are
    exact, so a benchmark's figures can be checked against hand-computed values."""

    def __init__(self, tick: float = 0.0):
        self.now, self.tick, self.reads = 0.0, tick, 0

    def perf_counter(self) -> float:
        self.now += self.tick
        self.reads += 1
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_clock() -> FakeClock:
    """A :class:`FakeClock` at 0 with no tick; set ``fake_clock.tick`` and patch it in for a module's ``time``:
    ``monkeypatch.setattr(module, "time", fake_clock)``."""
    return FakeClock()
