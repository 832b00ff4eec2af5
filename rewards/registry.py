"""Rewards by name: ``load("pickscore")``, ``register("mine", factory)``, ``available()``, and
``as_reward`` (a Reward, a registered name or a plain callable -> a Reward).

Built-ins are registered by import path, so importing :mod:`flowalign.rewards` imports neither
transformers nor open_clip; a reward's module is imported when it is first loaded.

Reward specs (used by ``flowalign score --reward`` and configs) name a reward, optional keyword
arguments for its loader and an optional weight::

    pickscore                              -> load("pickscore"), weight 1
    pickscore=0.5                          -> weight 0.5
    hpsv2.1(checkpoint=/ckpt/hps)=0.25     -> load("hpsv2.1", checkpoint="/ckpt/hps"), weight 0.25
    clipscore(model=ViT-B-32,pretrained=openai)

Example::

    from flowalign import rewards

    rewards.register("mean_red", lambda: rewards.as_reward(lambda images, prompts: images[:, 0].mean((1, 2))))
    reward = rewards.load("mean_red")
    mixture = rewards.load_mixture(["pickscore=0.7", "aesthetic=0.3"], normalize="zscore")
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flowalign.rewards.base import FunctionReward, Reward, RewardLike

# name -> (import path "module:attribute", default keyword arguments)
_BUILTINS: dict[str, tuple[str, dict[str, Any]]] = {
    "pickscore": ("flowalign.rewards.pickscore:PickScore.from_pretrained", {}),
    "hpsv2": ("flowalign.rewards.hps:HPSv2.from_pretrained", {"version": "v2.0"}),
    "hpsv2.1": ("flowalign.rewards.hps:HPSv2.from_pretrained", {"version": "v2.1"}),
    "imagereward": ("flowalign.rewards.image_reward:ImageReward.from_pretrained", {}),
    "aesthetic": ("flowalign.rewards.aesthetic:AestheticScore.from_pretrained", {}),
    "clipscore": ("flowalign.rewards.clip_score:CLIPScore.from_pretrained", {}),
    "jpeg_compressibility": ("flowalign.rewards.jpeg:JpegCompressibility", {}),
    "jpeg_incompressibility": ("flowalign.rewards.jpeg:JpegIncompressibility", {}),
    "shapes": ("flowalign.rewards.shapes:ShapesVerifier", {"binary": False}),
    "shapes_binary": ("flowalign.rewards.shapes:ShapesVerifier", {"binary": True}),
    "redness": ("flowalign.rewards.credit:Redness", {}),
    "png_compressibility": ("flowalign.rewards.credit:PngCompressibility", {}),
    "red_jpeg": ("flowalign.rewards.credit:red_jpeg", {}),
}
_ALIASES = {
    "image_reward": "imagereward",
    "hps": "hpsv2.1",
    "hpsv2.0": "hpsv2",
    "hpsv21": "hpsv2.1",
    "laion_aesthetic": "aesthetic",
    "clip_score": "clipscore",
    "compressibility": "jpeg_compressibility",
    "incompressibility": "jpeg_incompressibility",
    "shapes_dense": "shapes",
}
_USER: dict[str, Callable[..., Any] | Reward] = {}


def _normalize(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    return _ALIASES.get(key, key)


def register(name: str, factory: Callable[..., Any] | Reward, overwrite: bool = False) -> None:
    """Make ``load(name, **kwargs)`` return ``factory(**kwargs)`` (or ``factory`` itself if it is a
    :class:`Reward` instance). The factory may return a :class:`Reward` or any callable
    ``f(images, prompts) -> scores``; plain callables are wrapped with :func:`as_reward`.

    To register a plain scoring function, register a :class:`Reward` made from it:
    ``register("mine", as_reward(my_fn))``.
    """
    key = _normalize(name)
    if not key or not re.fullmatch(r"[\w.]+", key):
        raise ValueError(f"Reward names use letters, digits, '_', '-' and '.'; got {name!r}.")
    if not callable(factory):
        raise TypeError(f"register({name!r}, ...) needs a factory callable or a Reward; got {type(factory).__name__}.")
    if (key in _USER or key in _BUILTINS) and not overwrite:
        raise ValueError(f"A reward named {key!r} is already registered; pass overwrite=True to replace it.")
    _USER[key] = factory


def available() -> list[str]:
    """Names accepted by :func:`load` (built-ins and user registrations), sorted."""
    return sorted(set(_BUILTINS) | set(_USER))


def as_reward(obj: RewardLike, **kwargs: Any) -> Reward:
    """Accept a :class:`Reward`, a registered name (``"pickscore"``), or any callable
    ``f(images, prompts) -> scores`` (wrapped in :class:`FunctionReward` with ``kwargs``).

    Example::

        reward = as_reward(lambda images, prompts: images.mean(dim=(1, 2, 3)), requires_prompts=False)
    """
    if isinstance(obj, Reward):
        if kwargs:
            raise TypeError(f"as_reward: options {sorted(kwargs)} apply to plain callables, not to a Reward.")
        return obj
    if isinstance(obj, str):
        return load(obj, **kwargs)
    if callable(obj):
        return FunctionReward(obj, **kwargs)
    raise TypeError(
        f"Expected a Reward, a registered reward name or a callable f(images, prompts); got {type(obj).__name__}."
    )


def _import(path: str) -> Callable[..., Any]:
    module_name, attribute = path.split(":")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def load(name: str, **kwargs: Any) -> Reward:
    """Build the reward registered as ``name`` with the loader's keyword arguments.

    ``name`` may also be a spec with options, ``"NAME(KEY=VALUE,...)"`` (explicit ``kwargs`` win);
    weights belong to :func:`load_mixture`.

    Example::

        reward = load("pickscore", model="/ckpt/PickScore_v1", processor="/ckpt/clip-h-processor")
        reward = load("jpeg_compressibility(quality=50)")
    """
    if "(" in name or "=" in name:
        spec = parse_reward_spec(name)
        if spec.weight != 1.0:
            raise ValueError(f"load({name!r}) builds one reward: weights belong to load_mixture([...]).")
        name, kwargs = spec.name, {**spec.kwargs, **kwargs}
    key = _normalize(name)
    if key in _USER:
        factory = _USER[key]
        reward = factory if isinstance(factory, Reward) and not kwargs else factory(**kwargs)
    elif key in _BUILTINS:
        path, defaults = _BUILTINS[key]
        reward = _import(path)(**{**defaults, **kwargs})
    else:
        close = difflib.get_close_matches(key, available(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"Unknown reward {name!r}.{hint} Available: {', '.join(available())}.")
    reward = as_reward(reward) if not isinstance(reward, Reward) else reward
    if key in _USER and not isinstance(_USER[key], Reward) and reward.name in ("function", "<lambda>", "reward"):
        reward.name = key
    return reward


@dataclass
class RewardSpec:
    """One parsed ``NAME[(KEY=VALUE,...)][=WEIGHT]`` string."""

    name: str
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)


_SPEC = re.compile(r"^\s*(?P<name>[\w.\-]+)\s*(?:\((?P<args>.*)\))?\s*(?:=\s*(?P<weight>[^=()]+?))?\s*$")


def _parse_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_reward_spec(spec: str) -> RewardSpec:
    """Parse ``NAME[(KEY=VALUE,...)][=WEIGHT]``; see the module docstring.

    Example::

        parse_reward_spec("hpsv2.1(checkpoint=/ckpt/hps)=0.25")
        # RewardSpec(name='hpsv2.1', weight=0.25, kwargs={'checkpoint': '/ckpt/hps'})
    """
    match = _SPEC.match(spec)
    if not match:
        raise ValueError(
            f"Cannot parse reward spec {spec!r}; expected NAME, NAME=WEIGHT or NAME(KEY=VALUE,...)=WEIGHT, "
            "e.g. 'pickscore=0.5' or 'clipscore(model=ViT-B-32,pretrained=openai)'."
        )
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (match["args"] or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Reward spec {spec!r}: option {item!r} is not KEY=VALUE.")
        kwargs[key.strip()] = _parse_value(value.strip())
    weight = 1.0
    if match["weight"] is not None:
        try:
            weight = float(match["weight"])
        except ValueError:
            raise ValueError(f"Reward spec {spec!r}: weight {match['weight']!r} is not a number.") from None
    return RewardSpec(name=match["name"], weight=weight, kwargs=kwargs)
