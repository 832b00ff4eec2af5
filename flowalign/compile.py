"""``torch.compile`` for the denoising step: the transformer, the SDE step with its log-probability, the RLG mix.

What runs at every sampling step is a transformer forward (a diffusers ``SD3Transformer2DModel``, with or
without a PEFT LoRA), the velocity arithmetic (CFG, the RLG mix) and the scheduler step. Each piece here
compiles to ONE graph (``fullgraph=True``: a graph break raises instead of silently splitting the step),
and nothing that changes from step to step is a Python number baked into a graph: the timestep, the
noise levels and w enter as tensors, so the steps of a run (and the calls after the first) reuse the
graphs compiled at the first step. Measured in ``tests/test_compile.py`` with ``torch._dynamo.explain``
(zero graph breaks) and ``torch._dynamo.config.error_on_recompile`` (no recompilation across steps).

- :func:`compile_transformer`: the diffusers convention (``transformer.compile(fullgraph=True)``,
  in place) or a compiled callable that shares the module's weights (``in_place=False``, the default):
  the module itself stays eager, for gradient steps, while rollouts call the compiled one. A PEFT LoRA
  switched off and on (``disable_adapters()`` / ``enable_adapters()``, the trainer's reference model)
  compiles one graph per state: the first call in each state compiles, every later one reuses it.
- :func:`compile_sde_step`: :func:`flowalign.sampling.sde_step` compiled, with the Gaussian noise drawn
  eagerly from the generator first (a ``torch.Generator`` argument is a graph break in dynamo), exactly
  as ``sde_step`` draws it: the same noise, so compiled and eager steps agree to float rounding; the
  noise level and the sigmas enter as tensors, so an SDE window (a = 0 after it) is still one graph.
- :func:`compile_function`: any pure tensor function (the RLG mix) under the same options.
- :func:`graph_breaks`: the graphs and graph breaks dynamo finds in one call (``torch._dynamo.explain``).

Example::

    from flowalign.compile import compile_transformer, compile_sde_step

    fast = compile_transformer(transformer)            # rollouts: fast(x, timestep=1000 * sigma, ...)
    step = compile_sde_step()                          # step(x, v, sigma, sigma_next, noise_level=0.7, generator=g)
    x_next, log_prob, mean, std = step(x, v, sigmas[0], sigmas[1], noise_level=0.7, generator=g)

The first call of each graph compiles (tens of seconds for the tiny model on a CPU with inductor); the
speed-up is measured by ``flowalign bench rlg --compile`` (docs/benchmarks.md, "Compiled sampling").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch import nn

from flowalign.sampling import sde_step

__all__ = ["GraphReport", "compile_function", "compile_sde_step", "compile_transformer", "graph_breaks"]

BACKENDS = ("inductor", "aot_eager", "eager")


def _options(mode: str | None, fullgraph: bool, dynamic: bool | None, backend: str) -> dict[str, Any]:
    """The keyword arguments of ``torch.compile``, checked (a clear error instead of a late dynamo one)."""
    if backend not in BACKENDS and backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ValueError(f"Unknown torch.compile backend {backend!r}; use one of {BACKENDS} (inductor: the fast one).")
    if mode is not None and backend != "inductor":
        raise ValueError(f"mode={mode!r} is an inductor option; with backend={backend!r} leave mode=None.")
    if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
        raise ValueError(
            f"Unknown torch.compile mode {mode!r}; use None, 'default', 'reduce-overhead' or 'max-autotune'."
        )
    return {"mode": mode, "fullgraph": bool(fullgraph), "dynamic": dynamic, "backend": backend}


def compile_transformer(
    model: nn.Module,
    *,
    mode: str | None = None,
    fullgraph: bool = True,
    dynamic: bool | None = False,
    backend: str = "inductor",
    in_place: bool = False,
) -> nn.Module:
    """Compile a flow transformer's forward (LoRA layers and their hooks included) into one graph.

    Args:
        model: the transformer (e.g. ``SD3Transformer2DModel``, with or without a PEFT adapter).
        mode, backend: ``torch.compile``'s (``None`` / ``"inductor"``: the default, fast kernels; ``"aot_eager"``
            traces the same graph without generating code, for quick checks).
        fullgraph: raise on a graph break (the default) instead of splitting the forward.
        dynamic: ``False`` (default): one static graph per input shape; the batch of a sampling run is the
            same at every step, so a run compiles once.
        in_place: ``True``: ``model.compile(...)`` (the diffusers convention ``pipe.transformer.compile()``):
            every call of ``model`` runs compiled, and ``model`` is returned. ``False``: returns a compiled
            wrapper (``torch.compile(model)``) that shares ``model``'s parameters; ``model`` itself stays eager.

    Example (the trainer's rollout velocity; the reference model is the same module with the LoRA off)::

        fast = compile_transformer(transformer)
        v = fast(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=emb,
                 pooled_projections=pooled, return_dict=False)[0]
        transformer.disable_adapters()   # one more graph on the first call in this state, reused afterwards
        v_ref = fast(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=emb,
                     pooled_projections=pooled, return_dict=False)[0]
        transformer.enable_adapters()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_transformer needs a torch.nn.Module, got {type(model).__name__}.")
    options = _options(mode, fullgraph, dynamic, backend)
    if in_place:
        model.compile(**options)
        return model
    return torch.compile(model, **options)


def compile_function(
    fn: Callable, *, mode: str | None = None, fullgraph: bool = True, dynamic: bool | None = False,
    backend: str = "inductor",
) -> Callable:
    """``torch.compile(fn, ...)`` with this module's checked defaults (one static graph, no graph break).

    Example: ``mix = compile_function(lambda a, b, w: torch.lerp(a, b, w))``; ``w`` a tensor, so a new w
    does not recompile.
    """
    return torch.compile(fn, **_options(mode, fullgraph, dynamic, backend))


def compile_sde_step(
    *, mode: str | None = None, fullgraph: bool = True, dynamic: bool | None = False, backend: str = "inductor"
) -> Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`flowalign.sampling.sde_step` compiled, with the same signature and results.

    The Gaussian ``z`` is drawn eagerly before the compiled part, with the call ``sde_step`` makes
    (``randn_tensor(x.shape, generator, x.device, float32)``): a generator inside a compiled function is a
    graph break, and drawing it here keeps the noise stream identical to the eager step's. ``noise_level``,
    ``sigma`` and ``sigma_next`` are passed to the graph as tensors: every step of a run, an SDE window's
    Euler steps (a = 0) and another noise level reuse one graph (per shape and dtype of ``x``).

    Example::

        step = compile_sde_step()
        for k in range(len(sigmas) - 1):
            x, log_prob, _, _ = step(x, v_fn(x, sigmas[k]), sigmas[k], sigmas[k + 1], noise_level=0.7, generator=g)
    """
    compiled = torch.compile(sde_step, **_options(mode, fullgraph, dynamic, backend))

    def step(
        x: torch.Tensor,
        v: torch.Tensor,
        sigma: float | torch.Tensor,
        sigma_next: float | torch.Tensor,
        noise_level: float = 0.7,
        generator: torch.Generator | list[torch.Generator] | None = None,
        noise: torch.Tensor | None = None,
        prev_sample: torch.Tensor | None = None,
        log_prob_reduction: str = "sum",
    ):
        if noise is None and prev_sample is None:
            # z ~ N(0, I), the draw sde_step makes itself (same generator calls, same numbers)
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        # Numbers as tensors, so a new value is an input, not a new graph (an SDE window's a = 0 steps, the next
        # sigma). sde_step casts sigmas to float32 itself; a as a float64 CPU scalar gives the float's arithmetic.
        sigma, sigma_next = (torch.as_tensor(s, dtype=torch.float32, device=x.device) for s in (sigma, sigma_next))
        level = torch.tensor(noise_level, dtype=torch.float64)
        return compiled(
            x, v, sigma, sigma_next, noise_level=level, noise=noise, prev_sample=prev_sample,
            log_prob_reduction=log_prob_reduction,
        )

    step.__doc__ = sde_step.__doc__
    return step


@dataclass(frozen=True)
class GraphReport:
    """What dynamo makes of one call: ``graphs`` compiled graphs, ``breaks`` graph breaks and their reasons."""

    graphs: int
    breaks: int
    reasons: tuple[str, ...]


def graph_breaks(fn: Callable, *args: Any, **kwargs: Any) -> GraphReport:
    """Trace ``fn(*args, **kwargs)`` with ``torch._dynamo.explain`` (no code generated) and report its graph breaks.

    Example::

        report = graph_breaks(transformer, x, timestep=t, encoder_hidden_states=e, pooled_projections=p)
        assert report.breaks == 0, report.reasons
    """
    explained = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = tuple(
        f"{reason.reason} at {reason.user_stack[-1] if reason.user_stack else '?'}" for reason in explained.break_reasons
    )
    return GraphReport(graphs=explained.graph_count, breaks=explained.graph_break_count, reasons=reasons)
