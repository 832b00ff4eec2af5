"""One place for the fine-tuned model of RLG: LoRA adapters (PEFT folders, diffusers LoRA files) and full transformers.

Loading (used by ``RLGStableDiffusion3Pipeline.load_finetuned``):

- :func:`resolve_finetuned_source`: what a source is (module, PEFT folder, diffusers LoRA, transformer
  folder, hub id); a missing local-looking path raises ``FileNotFoundError`` naming it.
- :func:`load_finetuned_model`: load any source onto a base transformer (a LoRA is injected as an
  adapter of the base, a full transformer is returned); checks that it fits first.
- :func:`load_peft_adapter`: a PEFT adapter folder into a diffusers transformer, in place.
- :func:`check_lora_fits` / :func:`check_same_architecture`: errors naming the module / setting that does
  not fit the base transformer.

Making and saving adapters (tests, benchmarks, saved RLG pipelines):

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
    finetuned = load_finetuned_model(pipe.transformer, "out/lora", adapter_name="rlg")  # None: a LoRA, now loaded
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig, PeftConfig, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = [
    "FLOW_GRPO_SD3_TARGET_MODULES",
    "add_random_lora",
    "check_lora_fits",
    "check_same_architecture",
    "load_finetuned_model",
    "load_lora_state",
    "load_peft_adapter",
    "merged_copy",
    "resolve_finetuned_source",
    "save_diffusers_lora",
    "save_peft_adapter",
    "tuner_layers",
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

    return {
        k: v.detach().contiguous() for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()
    }


def save_peft_adapter(transformer: nn.Module, adapter_name: str, path: str | os.PathLike) -> Path:
    """Write one adapter as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Keys carry PEFT's ``base_model.model.`` prefix, exactly as ``PeftModel.save_pretrained`` writes them.
    """

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

    model = copy.deepcopy(transformer)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, BaseTunerLayer) and adapter_name in getattr(module, "lora_B", {}):
                module.merge(adapter_names=[adapter_name])
    model.unload_lora()  # diffusers: drop the LoRA layers (keeps the merged base weights)
    return model


# =============================================================================================
# Loading a fine-tuned model onto a base transformer
# =============================================================================================
def _lora_module_name(key: str) -> tuple[str, str] | None:
    """``'a.b.lora_A.weight'`` -> ``('a.b', 'lora_A')``; ``None`` for keys that are not LoRA A/B weights."""
    for part in (".lora_A.", ".lora_B."):
        if part in key:
            module, _, _ = key.partition(part)
            return module, part.strip(".")
    return None


def _strip_lora_prefix(key: str) -> str:
    """Drop the container prefixes of the two file formats (diffusers ``transformer.``, PEFT ``base_model.model.``)."""
    for prefix in ("base_model.model.", "transformer."):
        key = key.removeprefix(prefix)
    return key


def check_lora_fits(
    transformer: nn.Module, state_dict: dict[str, torch.Tensor], target_modules: Sequence[str] | str | None = None
) -> None:
    """Raise a ``ValueError`` naming the module if a LoRA does not fit ``transformer``.

    Checks every ``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` of ``state_dict`` (keys may
    carry the ``transformer.`` or ``base_model.model.`` prefix): the module must exist, be a
    Linear/Conv layer, and ``lora_A`` must read its ``in_features`` while ``lora_B`` writes its
    ``out_features``. With ``target_modules`` (a PEFT config's list), each name must match a module.

    Example: ``check_lora_fits(pipe.transformer, safetensors.torch.load_file("lora.safetensors"))``.
    """
    cls = type(transformer).__name__
    modules = dict(transformer.named_modules())
    if isinstance(target_modules, (list, tuple, set)):
        for target in target_modules:
            if not any(name == target or name.endswith("." + target) for name in modules):
                raise ValueError(
                    f"The LoRA config targets module {target!r}, which does not exist in {cls}. "
                    "This adapter was trained for another architecture; load it on the matching base model."
                )
    for key, tensor in state_dict.items():
        parsed = _lora_module_name(_strip_lora_prefix(key))
        if parsed is None or not key.endswith(".weight"):
            continue
        name, which = parsed
        if name not in modules:
            raise ValueError(
                f"LoRA weight {key!r} targets module {name!r}, which does not exist in {cls}. "
                "This LoRA was trained for another architecture; load it on the matching base model."
            )
        module = modules[name]
        base = getattr(module, "base_layer", module)  # a module that already carries LoRA layers
        weight = getattr(base, "weight", None)
        if weight is None or weight.ndim < 2:
            raise ValueError(
                f"LoRA weight {key!r} targets module {name!r} ({type(base).__name__}), which has no 2-d weight."
            )
        if which == "lora_A" and tensor.shape[1] != weight.shape[1]:
            raise ValueError(
                f"LoRA weight {key!r} has shape {tuple(tensor.shape)}: it reads {tensor.shape[1]} features, but module "
                f"{name!r} ({type(base).__name__}, weight {tuple(weight.shape)}) takes {weight.shape[1]}. "
                "The LoRA was trained for a base model of another size."
            )
        if which == "lora_B" and tensor.shape[0] != weight.shape[0]:
            raise ValueError(
                f"LoRA weight {key!r} has shape {tuple(tensor.shape)}: it writes {tensor.shape[0]} features, but module "
                f"{name!r} ({type(base).__name__}, weight {tuple(weight.shape)}) outputs {weight.shape[0]}. "
                "The LoRA was trained for a base model of another size."
            )


def load_peft_adapter(transformer: nn.Module, path: str | os.PathLike, adapter_name: str = "rlg") -> None:
    """Load a PEFT LoRA adapter directory into a diffusers transformer, in place.

    The directory holds ``adapter_config.json`` + ``adapter_model.safetensors`` (what
    ``PeftModel.save_pretrained`` writes; the format of Flow-GRPO and the public RLG release). The
    result is what ``PeftModel.from_pretrained(transformer, path)`` injects, without wrapping the
    transformer in a ``PeftModel``: it stays a diffusers model (``enable_lora``/``disable_lora`` work).

    Example: ``load_peft_adapter(pipe.transformer, "flow-grpo-lora/", adapter_name="rlg")``.
    """

    path = Path(path)
    config, state_dict = _read_peft_folder(path)
    check_lora_fits(transformer, state_dict, target_modules=config.target_modules)

    if adapter_name in getattr(transformer, "peft_config", {}):
        raise ValueError(f"The transformer already has an adapter named {adapter_name!r}; pick another adapter_name.")
    transformer.add_adapter(
        config, adapter_name=adapter_name
    )  # diffusers PeftAdapterMixin -> peft.inject_adapter_in_model
    result = set_peft_model_state_dict(transformer, state_dict, adapter_name=adapter_name)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    expected = {
        name
        for name, _ in transformer.named_parameters()
        if f".{adapter_name}." in name and ("lora_A" in name or "lora_B" in name)
    }
    loaded = {f"{k.rsplit('.', 1)[0]}.{adapter_name}.{k.rsplit('.', 1)[1]}" for k in state_dict if _lora_module_name(k)}
    missing = sorted(expected - loaded)
    if unexpected or missing:
        transformer.delete_adapters(adapter_name)
        if not getattr(transformer, "peft_config", None):
            transformer.unload_lora()
        raise ValueError(
            f"The adapter in {path} does not match its own config: "
            f"{len(missing)} LoRA weights missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})."
        )



def _read_peft_folder(path: Path) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA folder's config and weights (keys without PEFT's ``base_model.model.`` prefix)."""
    peft_type = PeftConfig.from_pretrained(str(path)).peft_type
    if str(peft_type) not in ("LORA", "PeftType.LORA"):
        raise ValueError(f"{path} holds a {peft_type} adapter; only LoRA adapters are supported.")
    config = LoraConfig.from_pretrained(str(path))
    if config.use_dora:
        raise ValueError(f"{path} is a DoRA adapter; only plain LoRA is supported (DoRA is not linear in its scale).")
    weights = path / "adapter_model.safetensors"
    if weights.exists():
        state_dict = load_file(str(weights))
    elif (path / "adapter_model.bin").exists():
        state_dict = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} has adapter_config.json but no adapter_model.safetensors (or .bin).")
    return config, {_strip_lora_prefix(k): v for k, v in state_dict.items()}


def load_lora_state(source: Any, expected: LoraConfig | None = None) -> dict[str, torch.Tensor]:
    """The transformer LoRA weights of ``source`` (a flowalign checkpoint, a diffusers LoRA file or folder, a PEFT
    adapter folder, a state dict or a hub id), keys ``<module>.lora_A.weight`` without prefix or adapter name.

    With ``expected`` (the adapter the weights go into), the source's own rank and alpha, where it records them
    (PEFT config, diffusers LoRA metadata), must equal the expected ones: the same weights at another ``alpha / r``
    are another model. Raises ``ValueError`` naming both values.

    Example: ``state = load_lora_state("runs/x/checkpoints/latest", LoraConfig(r=32, lora_alpha=64))``.
    """
    kind, payload = resolve_finetuned_source(source)
    if kind == "peft":
        config, state_dict = _read_peft_folder(payload)
        recorded = {"r": config.r, "lora_alpha": config.lora_alpha}
    elif kind == "lora":
        state_dict, metadata = StableDiffusion3Pipeline.lora_state_dict(
            payload if isinstance(payload, dict) else str(payload), return_lora_metadata=True)
        text_keys = [k for k in state_dict if not k.startswith("transformer.")]
        if text_keys:
            raise ValueError(f"The LoRA of {source} also changes other modules than the transformer ({text_keys[0]!r},"
                             " ...); give a LoRA of the transformer alone.")
        state_dict = {_strip_lora_prefix(k): v for k, v in state_dict.items()}
        metadata = metadata or {}
        recorded = {k: metadata[f"transformer.{k}"] for k in ("r", "lora_alpha") if f"transformer.{k}" in metadata}
    else:
        raise ValueError(f"{source} holds a full transformer, not a LoRA; start from it with pretrained= instead.")
    if expected is not None:
        differ = {k: (v, getattr(expected, k)) for k, v in recorded.items() if float(v) != float(getattr(expected, k))}
        if differ:
            detail = ", ".join(f"{k}={v!r} (expected {e!r})" for k, (v, e) in differ.items())
            raise ValueError(f"The LoRA of {source} has {detail}; set lora_rank / lora_alpha to the LoRA's own values.")
    return state_dict


def tuner_layers(transformer: nn.Module, adapter_name: str) -> list[nn.Module]:
    """The PEFT LoRA layers of ``transformer`` that carry ``adapter_name``."""

    return [
        m for m in transformer.modules() if isinstance(m, BaseTunerLayer) and adapter_name in getattr(m, "lora_B", {})
    ]


def check_same_architecture(base: nn.Module, finetuned: nn.Module) -> None:
    """Raise a ``ValueError`` if ``finetuned`` is not the same architecture as ``base``.

    Same class, same architecture config (keys starting with ``_`` ignored) and same parameter shapes.
    Example: ``check_same_architecture(pipe.transformer, SD3Transformer2DModel.from_pretrained(path))``.
    """
    if type(finetuned) is not type(base):
        raise ValueError(
            f"The fine-tuned transformer is a {type(finetuned).__name__} but the base is a {type(base).__name__}; "
            "RLG mixes two versions of the same model: load a fine-tune of this base."
        )
    base_config, ft_config = getattr(base, "config", {}), getattr(finetuned, "config", {})
    keys = sorted({k for k in list(base_config) + list(ft_config) if not k.startswith("_")})
    as_list = lambda v: list(v) if isinstance(v, tuple) else v
    diffs = [
        f"{k}: base={base_config.get(k)!r}, fine-tuned={ft_config.get(k)!r}"
        for k in keys
        if as_list(base_config.get(k)) != as_list(ft_config.get(k))
    ]
    if diffs:
        raise ValueError(
            f"The fine-tuned {type(base).__name__} has another architecture than the base ({'; '.join(diffs)}); "
            "load a fine-tune of this base."
        )
    ft_shapes = {k: v.shape for k, v in finetuned.state_dict().items()}
    for k, v in base.state_dict().items():
        if ".lora_" in k or ".base_layer." in k:
            continue
        if k in ft_shapes and ft_shapes[k] != v.shape:
            raise ValueError(
                f"Parameter {k!r} has shape {tuple(ft_shapes[k])} in the fine-tuned model, {tuple(v.shape)} in the base."
            )


def _looks_local(text: str) -> bool:
    """A source string that can only mean a path on this machine (never a hub id ``owner/name``)."""
    if text.startswith(("./", "../", ".\\", "..\\", "~")) or text in (".", "..") or os.path.isabs(text):
        return True
    parts = [p for p in text.replace("\\", "/").split("/") if p]
    return len(parts) > 2 or text.endswith((".safetensors", ".bin", ".pt", ".pth", ".json"))


def resolve_finetuned_source(source: Any) -> tuple[str, Any]:
    """Classify a fine-tuned source: ``('module', nn.Module) | ('lora', dict | path) | ('peft', dir) | ('full', dir)``.

    A string or path is a local file or folder when it exists (``~`` is expanded). A missing path that
    can only be local (``./x``, ``../x``, ``~/x``, an absolute path, more than two parts or a file
    suffix) raises ``FileNotFoundError`` naming it; a missing ``owner/name`` is downloaded from the hub
    and, if that fails too, raises ``FileNotFoundError`` naming both readings.

    Example: ``resolve_finetuned_source("runs/x/checkpoints/latest")`` -> ``('lora', PosixPath(...))``.
    """
    if isinstance(source, nn.Module):
        return "module", source
    if isinstance(source, dict):
        return "lora", source
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"A fine-tuned model source must be a path, a hub id, a transformer module or a LoRA state dict; "
            f"got {type(source).__name__}."
        )
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not path.exists():
        if _looks_local(text):
            raise FileNotFoundError(
                f"Fine-tuned model {text!r} not found: no such file or folder ({path.absolute()}). "
                "Check the path (a PEFT adapter folder, a diffusers LoRA file/folder or a transformer folder)."
            )
        parts = [p for p in text.split("/") if p]
        if len(parts) != 2:
            raise FileNotFoundError(
                f"Fine-tuned model {text!r} not found: no such file or folder ({path.absolute()}), and it is not "
                "a hub id of the form 'owner/name'."
            )

        try:
            path = Path(huggingface_hub.snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "transformer/*"]))
        except Exception as error:  # offline, unknown repo, gated, ...: name the source, keep the cause
            raise FileNotFoundError(
                f"Fine-tuned model {text!r} not found: there is no local folder {path.absolute()}, and downloading "
                f"it as the hub repo {text!r} failed ({type(error).__name__}). Fix the local path, or the repo id "
                "and your connection."
            ) from error
    if path.is_file():
        return "lora", path
    if (path / "adapter_config.json").exists():
        return "peft", path
    if (path / "config.json").exists():
        return "full", path
    if (path / "model_index.json").exists() and (path / "transformer" / "config.json").exists():
        return "full", path / "transformer"
    if list(path.glob("*.safetensors")):
        return "lora", path
    raise ValueError(
        f"Cannot tell what {path} holds: expected a PEFT adapter (adapter_config.json), a diffusers LoRA "
        "(*.safetensors from save_lora_weights), or a transformer folder (config.json)."
    )


def load_finetuned_model(
    transformer: nn.Module,
    source: Any,
    adapter_name: str = "rlg",
    pipeline: Any = None,
    **kwargs: Any,
) -> nn.Module | None:
    """Load a fine-tuned model of ``transformer`` from any source; check that it fits before anything changes.

    - a diffusers LoRA (file, folder or state dict, as ``save_lora_weights`` writes it) or a PEFT adapter
      folder: injected into ``transformer`` as the adapter ``adapter_name``; returns ``None``;
    - a full fine-tuned transformer (module, transformer folder, pipeline folder): returned (on the
      base's device and dtype), after :func:`check_same_architecture`.

    ``pipeline`` (optional) is the diffusers pipeline the LoRA is loaded for (offloading hooks);
    ``kwargs`` go to ``lora_state_dict`` (e.g. ``weight_name``) or ``from_pretrained``.

    Example::

        finetuned = load_finetuned_model(pipe.transformer, "flow-grpo-lora/", adapter_name="rlg")
        assert finetuned is None and "rlg" in pipe.transformer.peft_config
    """
    kind, payload = resolve_finetuned_source(source)
    if kind in ("module", "full"):
        if kind == "full":
            config = json.loads((payload / "config.json").read_text())
            class_name = config.get("_class_name")
            if class_name not in (None, type(transformer).__name__):
                raise ValueError(
                    f"{payload} holds a {class_name} but the base is a {type(transformer).__name__}; "
                    "RLG mixes two versions of the same model: load a fine-tune of this base."
                )
            kwargs.setdefault("torch_dtype", transformer.dtype)
            payload = type(transformer).from_pretrained(str(payload), **kwargs).to(transformer.device)
        check_same_architecture(transformer, payload)
        return payload
    if kind == "peft":
        load_peft_adapter(transformer, payload, adapter_name=adapter_name)
        return None

    loader = pipeline if pipeline is not None else StableDiffusion3Pipeline
    state_dict, metadata = loader.lora_state_dict(
        payload if isinstance(payload, dict) else str(payload), return_lora_metadata=True, **kwargs
    )
    text_keys = [k for k in state_dict if k.startswith(("text_encoder", "te_", "lora_te"))]
    if text_keys:
        raise ValueError(
            f"This LoRA also changes the text encoders ({len(text_keys)} weights, e.g. {text_keys[0]!r}); RLG "
            "guides the transformer only. Save a LoRA of the transformer alone (transformer_lora_layers=...)."
        )
    check_lora_fits(transformer, state_dict)
    if adapter_name in (getattr(transformer, "peft_config", None) or {}):
        raise ValueError(f"The transformer already has an adapter named {adapter_name!r}; pick another adapter_name.")
    # What load_lora_weights does for the transformer part (the only part here).
    loader.load_lora_into_transformer(
        state_dict, transformer=transformer, adapter_name=adapter_name, metadata=metadata, _pipeline=pipeline
    )
    return None
