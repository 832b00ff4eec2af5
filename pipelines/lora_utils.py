"""Small LoRA utilities around PEFT: random adapters for tests/benchmarks, saving in the two file formats.

- :func:`add_random_lora`: inject a LoRA with non-trivial random weights (``lora_B`` non-zero, so the
  fine-tuned model really differs from the base).
- :func:`save_peft_adapter`: write ``adapter_config.json`` + ``adapter_model.safetensors``, the PEFT
  folder format that ``PeftModel.from_pretrained`` reads (Flow-GRPO and the public RLG release use it).
- :func:`save_diffusers_lora`: write the diffusers LoRA file (``save_lora_weights`` / ``load_lora_weights``).
- :func:`merged_copy`: a full fine-tuned transformer equal to base + LoRA (weights merged, adapter removed).

Example::

    add_random_lora(pipe.transformer, "rlg", rank=4, seed=0)
    save_peft_adapter(pipe.transformer, "rlg", "out/lora")
    pipe.transformer.unload_lora()   # back to the plain base transformer
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "FLOW_GRPO_SD3_TARGET_MODULES",
    "add_random_lora",
    "merged_copy",
    "save_diffusers_lora",
    "save_peft_adapter",
]

FLOW_GRPO_SD3_TARGET_MODULES: tuple[str, ...] = (
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_out.0",
    "attn.to_q",
    "attn.to_v",
)
"""The SD3 attention projections Flow-GRPO trains its LoRA on (rank 32, alpha 64 there)."""


def add_random_lora(
    transformer: nn.Module,
    adapter_name: str = "rlg",
    rank: int = 4,
    alpha: float | None = None,
    target_modules: Sequence[str] = FLOW_GRPO_SD3_TARGET_MODULES,
    seed: int = 0,
    std: float = 0.05,
) -> None:
    """Inject a LoRA adapter with random N(0, std^2) ``lora_A`` *and* ``lora_B`` (deterministic in ``seed``).

    A freshly initialised LoRA has ``lora_B = 0`` (fine-tuned == base); this one does not.
    ``alpha`` defaults to ``rank`` (scaling 1).
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        target_modules=list(target_modules),
        init_lora_weights=True,
    )
    transformer.add_adapter(config, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if f".{adapter_name}." in name and ("lora_A" in name or "lora_B" in name):
                noise = torch.randn(param.shape, generator=generator) * std
                param.copy_(noise.to(param.dtype))


def _adapter_state_dict(transformer: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """``{module.lora_A.weight: tensor, ...}`` of one adapter (adapter name removed from the keys)."""
    from peft.utils import get_peft_model_state_dict

    return {
        k: v.detach().contiguous() for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()
    }


def save_peft_adapter(transformer: nn.Module, adapter_name: str, path: str | os.PathLike) -> Path:
    """Write one adapter as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Keys carry PEFT's ``base_model.model.`` prefix, exactly as ``PeftModel.save_pretrained`` writes them.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(transformer.peft_config[adapter_name])
    config.base_model_name_or_path = getattr(transformer.config, "_name_or_path", None)
    config.save_pretrained(str(path))
    state_dict = {f"base_model.model.{k}": v for k, v in _adapter_state_dict(transformer, adapter_name).items()}
    save_file(state_dict, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


def save_diffusers_lora(transformer: nn.Module, adapter_name: str, path: str | os.PathLike) -> Path:
    """Write one adapter as a diffusers SD3 LoRA (``pytorch_lora_weights.safetensors``) with its config metadata."""
    from diffusers import StableDiffusion3Pipeline

    path = Path(path)
    StableDiffusion3Pipeline.save_lora_weights(
        str(path),
        transformer_lora_layers=_adapter_state_dict(transformer, adapter_name),
        transformer_lora_adapter_metadata=transformer.peft_config[adapter_name].to_dict(),
    )
    return path


def merged_copy(transformer: nn.Module, adapter_name: str) -> nn.Module:
    """A deep copy of ``transformer`` with ``adapter_name`` merged into the weights and all adapters removed.

    The result is a plain transformer equal to base + LoRA: a "full fine-tuned transformer".
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = copy.deepcopy(transformer)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "lora_B", {}):
                module.merge(adapter_names=[adapter_name])
    model.unload_lora()  # diffusers: drop the LoRA layers (keeps the merged base weights)
    return model
