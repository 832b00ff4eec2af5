"""Scale-out under the shipped accelerate configs (samples/accelerate/), 2 CPU processes over gloo.

``flowalign train`` is launched the way a user launches it (``accelerate launch --config_file ... -m flowalign.cli
train``) under ``fsdp.yaml`` (FSDP2): 2 iterations uninterrupted, and 1 iteration then a resumed second one. The final
LoRA of the two must agree, and both must agree with the same run under plain DDP (``multi_gpu.yaml``): FSDP
shards the weights, not the arithmetic. accelerate 1.16 drops FSDP silently on a machine without GPUs (its CPU
processes are plain DDP), so the test also asserts from ``model_info.json`` that the run really was FSDP with 2
processes; otherwise the comparisons would hold trivially.

DeepSpeed (``zero2.yaml``) cannot run on a CPU (accelerate starts it as independent single processes); its file is
checked here by accelerate's own config parser.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from flowalign.checkpoints import latest_checkpoint
from flowalign.config import ACFlowConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "samples" / "accelerate"
LORA_FILE = "pytorch_lora_weights.safetensors"
# tiny: 2 prompts x 2 images (one per rank), 2 sampling steps, one minibatch per rank; the critic trains from the first
# iteration (no warm-up), so the actor moves in both iterations
TINY = {"prompts_per_iteration": 2, "images_per_prompt": 2, "sample_steps": 2, "minibatch_size": 2, "inner_epochs": 1,
        "noise_draws": 1, "eval_prompts": 0, "critic_warmup_iterations": 0, "progress": False, "lora_rank": 4,
        "lora_alpha": 8.0, "mixed_precision": "no", "checkpoint_every": 1, "seed": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(accelerate_config: str, train_config: Path, output_dir: Path, iterations: int, resume: bool = False):
    """``accelerate launch --config_file samples/accelerate/<accelerate_config>.yaml --num_processes 2 -m flowalign.cli
    train --config <train_config>`` with the run-control keys on the command line; returns its stdout."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / f"{accelerate_config}.yaml"),
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--main_process_port", str(_free_port()),
           "-m", "flowalign.cli", "train", "--config", str(train_config), "--output_dir", str(output_dir),
           "--iterations", str(iterations), "--resume", "true" if resume else "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def _final_lora(output_dir: Path) -> dict[str, torch.Tensor]:
    folder = latest_checkpoint(output_dir)
    assert folder is not None, f"no checkpoint in {output_dir}"
    return load_file(folder / LORA_FILE)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["acflow", "grpo"])
def test_fsdp_two_processes_resume_equals_uninterrupted_and_ddp(tmp_path, algorithm):
    train_config = tmp_path / "tiny.yaml"
    train_config.write_text(yaml.safe_dump({**TINY, "algorithm": algorithm}))
    whole, split, ddp = tmp_path / "fsdp_whole", tmp_path / "fsdp_split", tmp_path / "ddp"

    _launch("fsdp", train_config, whole, iterations=2)
    _launch("fsdp", train_config, split, iterations=1)
    after_one = _final_lora(split)
    out = _launch("fsdp", train_config, split, iterations=2, resume=True)
    assert "resumed from" in out and "at iteration 1" in out, out[-2000:]  # the second launch continued the first
    _launch("multi_gpu", train_config, ddp, iterations=2)

    # the runs were what they claim: FSDP on 2 processes (not accelerate's silent DDP fallback), and DDP on 2
    for run, engine in ((whole, "FSDP"), (split, "FSDP"), (ddp, "MULTI_CPU")):
        info = json.loads((run / "model_info.json").read_text())
        assert (info.get("distributed_type"), info.get("num_processes")) == (engine, 2), f"{run.name}: {info}"

    final_whole, final_split, final_ddp = _final_lora(whole), _final_lora(split), _final_lora(ddp)
    assert latest_checkpoint(whole).name == latest_checkpoint(split).name == "iter-000002"
    # the second iteration moved the LoRA (else every comparison below would be trivially equal) ...
    assert _max_diff(final_whole, after_one) > 1e-5
    assert max(v.abs().max().item() for k, v in final_whole.items() if "lora_B" in k) > 1e-5
    # ... and 1 + 1 resumed iterations (weights, optimizer state, counters) end where 2 uninterrupted ones do
    assert _max_diff(final_whole, final_split) <= 1e-6
    # sharding changes where the weights live, not the update: FSDP ends where DDP does
    assert _max_diff(final_whole, final_ddp) <= 1e-6


def test_shipped_accelerate_configs_parse():
    """Each shipped file is read by accelerate's own parser as the engine it names, with the settings the trainer
    relies on (FSDP2 with per-block wrapping from the model; ZeRO stage 2 clipping at the trainer's default
    max_grad_norm)."""
    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    # unset on purpose: accelerate then wraps each model's own _no_split_modules (JointTransformerBlock), and does
    # not demand that class in every prepared model
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp.fsdp_config
    zero = load_config_from_file(str(CONFIGS / "zero2.yaml"))
    assert zero.distributed_type == DistributedType.DEEPSPEED
    assert zero.deepspeed_config["zero_stage"] == 2
    assert zero.deepspeed_config["gradient_clipping"] == ACFlowConfig().max_grad_norm
    ddp = load_config_from_file(str(CONFIGS / "multi_gpu.yaml"))
    assert ddp.distributed_type == DistributedType.MULTI_GPU
    for name in ("fsdp", "zero2", "multi_gpu"):  # each file says what it is for and how to launch it
        header = (CONFIGS / f"{name}.yaml").read_text().split("\ncompute_environment")[0]
        assert f"accelerate launch --config_file samples/accelerate/{name}.yaml" in header
