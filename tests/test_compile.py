"""Compiled sampling: no graph break in the denoising step, no recompilation across steps, outputs equal eager.

The pipeline tests compile with ``backend="aot_eager"``: dynamo traces and AOT-autograd functionalises the very
graphs inductor would compile (graph breaks and recompilations are decided before the backend runs), without
generating C++ kernels, which take ~75 s per graph of the tiny model on this project's loaded 2-core CPU.
Inductor itself (the default of ``enable_compile``) is tested on the SDE step here, and on the whole pipeline
by ``flowalign bench rlg --compile`` (docs/benchmarks.md, "Compiled sampling").

Run: nice -n 10 env OMP_NUM_THREADS=1 python -m pytest tests/test_compile.py -q -x
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flowalign.pipelines import (
    RLGStableDiffusion3Pipeline,
    RLGTransformer,
    linear_schedule,
)
from flowalign.pipelines.lora_utils import (
    add_random_lora,
    merged_copy,
    save_peft_adapter,
)
from flowalign.pipelines.rlg import _mix
from peft import LoraConfig
from torch._dynamo.utils import counters

from flowalign.compile import compile_sde_step, compile_transformer, graph_breaks
from flowalign.sampling import sde_step
from flowalign.tiny import MAX_SEQUENCE_LENGTH, build_tiny_sd3_pipeline

BACKEND = "aot_eager"
PROMPTS = ["a red circle", "two blue squares"]
TOL = 1e-5  # max abs pixel difference (images in [0, 1]); aot_eager runs the same aten ops as eager


def call_kwargs(steps: int = 4, **overrides):
    kw = {
        "prompt": PROMPTS,
        "num_inference_steps": steps,
        "guidance_scale": 4.5,
        "output_type": "np",
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "generator": torch.Generator().manual_seed(0),
    }
    kw.update(overrides)
    return kw


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """An eager and a compiled RLG pipeline on copies of one tiny 2-layer SD3 with the same random LoRA."""
    tmp = tmp_path_factory.mktemp("compile")
    stock = build_tiny_sd3_pipeline(seed=0, num_layers=2)  # 2 layers: one full block + the last (context-free) one
    add_random_lora(stock.transformer, "src", rank=4, seed=1, std=0.1)  # lora_B != 0: fine-tuned differs from base
    lora = save_peft_adapter(stock.transformer, "src", tmp / "lora")
    stock.transformer.unload_lora()
    eager = RLGStableDiffusion3Pipeline(**stock.components)
    compiled = RLGStableDiffusion3Pipeline(**build_tiny_sd3_pipeline(seed=0, num_layers=2).components)
    for pipe in (eager, compiled):
        pipe.set_progress_bar_config(disable=True)
        pipe.load_finetuned(lora)
    compiled.enable_compile(backend=BACKEND)
    torch._dynamo.reset()
    yield eager, compiled
    torch._dynamo.reset()


def transformer_inputs(transformer, n: int = 4):
    g = torch.Generator().manual_seed(0)
    c = transformer.config
    x = torch.randn(n, c.in_channels, c.sample_size, c.sample_size, generator=g)
    return x, {
        "encoder_hidden_states": torch.randn(n, 2, c.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(n, c.pooled_projection_dim, generator=g),
        "timestep": torch.full((n,), 700.0),
        "return_dict": False,
    }


# ------------------------------------------------------------------------------------------------
# Zero graph breaks: the transformer with its LoRA (each RLG gate state), the SDE step, the mix
# ------------------------------------------------------------------------------------------------
def test_graph_breaks_reports_a_break():
    """The helper counts what dynamo splits: a function with a data-dependent branch has one break."""

    def branchy(x):
        if x.sum() > 0:  # a Python branch on a tensor value: a graph break
            return x * 2
        return x - 1

    report = graph_breaks(branchy, torch.ones(3))
    assert report.breaks == 1 and report.graphs == 2 and len(report.reasons) == 1
    assert graph_breaks(lambda x: x * 2, torch.ones(3)).breaks == 0


@pytest.mark.parametrize("gate", ["finetuned", "base", "mixed", "lora_scaled"])
def test_transformer_with_lora_has_no_graph_break(pipes, gate):
    """The RLG gate's states: the LoRA as loaded, skipped on every row, per row (PEFT mixed batch), scaled by w."""
    eager, _ = pipes
    rlg: RLGTransformer = eager.rlg_transformer
    transformer = rlg.base
    x, kw = transformer_inputs(transformer)
    settings = {
        "finetuned": {},
        "base": {"adapter_names": ["__base__"] * 4},
        "mixed": {"adapter_names": ["__base__"] * 2 + ["rlg"] * 2},
        "lora_scaled": {"scale": torch.tensor(1.5)},
    }[gate]
    rlg._gate.set(**settings)
    try:
        report = graph_breaks(transformer, x, **kw)
    finally:
        rlg._gate.set()
    assert report.breaks == 0 and report.graphs == 1, report.reasons


def test_sde_step_and_mix_have_no_graph_break():
    g = torch.Generator().manual_seed(0)
    x, v, z = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(3))
    sigma, sigma_next = torch.tensor(0.8), torch.tensor(0.7)
    sampled = graph_breaks(sde_step, x, v, sigma, sigma_next, 0.7, noise=z)  # the sampler's step
    assert sampled.breaks == 0 and sampled.graphs == 1, sampled.reasons
    x_next = sde_step(x, v, sigma, sigma_next, 0.7, noise=z)[0]
    scored = graph_breaks(sde_step, x, v, sigma, sigma_next, 0.7, prev_sample=x_next)  # Flow-GRPO's log-prob
    assert scored.breaks == 0 and scored.graphs == 1, scored.reasons
    mixed = graph_breaks(_mix, x, v, torch.tensor(1.5))
    assert mixed.breaks == 0 and mixed.graphs == 1, mixed.reasons


# ------------------------------------------------------------------------------------------------
# Compiled equals eager
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["euler", "sde"])
@pytest.mark.parametrize("w", [0.0, 1.0, 1.5])
def test_compiled_pipeline_equals_eager(pipes, sampler, w):
    eager, compiled = pipes
    want = eager(**call_kwargs(), rlg_scale=w, sampler=sampler).images
    got = compiled(**call_kwargs(), rlg_scale=w, sampler=sampler).images
    assert max_diff(got, want) <= TOL
    if w == 1.5:  # the compiled run is a real sample: not the base model's
        assert max_diff(got, eager(**call_kwargs(), rlg_scale=0.0, sampler=sampler).images) > 1e-2


def test_compiled_sweep_equals_eager(pipes):
    """A sweep's rows (w = 0, 1, 2 per image block) in one forward per step; the same images as eager."""
    eager, compiled = pipes
    kw = call_kwargs(steps=3, rlg_sweep=[0.0, 1.0, 2.0], sampler="sde")
    assert max_diff(compiled(**kw).images, eager(**call_kwargs(steps=3, rlg_sweep=[0.0, 1.0, 2.0], sampler="sde")).images) <= TOL


def test_a_full_finetune_attached_after_enable_compile_is_compiled(pipes):
    """A full fine-tuned transformer (two models per step, ``exact_two_pass``) is compiled at the next call."""
    eager, _ = pipes
    pipe = RLGStableDiffusion3Pipeline(**build_tiny_sd3_pipeline(seed=0, num_layers=2).components)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_compile(backend=BACKEND)
    pipe.finetuned_transformer = merged_copy(eager.transformer, "rlg")  # the eager pipeline's LoRA, merged
    assert pipe.finetuned_transformer._compiled_call_impl is None
    got = pipe(**call_kwargs(steps=2), rlg_scale=1.5).images
    assert pipe.finetuned_transformer._compiled_call_impl is not None
    assert max_diff(got, eager(**call_kwargs(steps=2), rlg_scale=1.5).images) <= 1e-4  # LoRA vs merged weights


# ------------------------------------------------------------------------------------------------
# No recompilation across steps, scales and schedules
# ------------------------------------------------------------------------------------------------
def test_no_recompilation_across_steps_scales_and_schedules(pipes):
    """Three graphs (the transformer on [base rows; fine-tuned rows], the mix, the SDE step), compiled at the
    first step; the other steps, another w and a schedule of w reuse them (a recompilation would raise)."""
    _, compiled = pipes
    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(**call_kwargs(), rlg_scale=1.5, sampler="sde")
        assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
        compiled(**call_kwargs(), rlg_scale=2.5, sampler="sde")
        compiled(**call_kwargs(), rlg_scale=linear_schedule(0.5, 2.5), sampler="sde")
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_enable_and_disable_compile(pipes):
    _, compiled = pipes
    assert compiled.compile_options == {"mode": None, "fullgraph": True, "dynamic": False, "backend": BACKEND}
    assert compiled.transformer._compiled_call_impl is not None  # the diffusers convention: compiled in place
    compiled.disable_compile()
    try:
        assert compiled.compile_options is None and compiled.transformer._compiled_call_impl is None
    finally:
        compiled.enable_compile(backend=BACKEND)
    with pytest.raises(ValueError, match="Unknown torch.compile backend 'nope'"):
        compiled.enable_compile(backend="nope")


# ------------------------------------------------------------------------------------------------
# The trainer's use: a compiled rollout forward of a LoRA transformer whose adapters are toggled
# ------------------------------------------------------------------------------------------------
def test_compile_transformer_across_the_adapter_toggle():
    """``disable_adapters()`` / ``enable_adapters()`` (the trainer's reference model): one graph per state,
    compiled on the state's first call and reused afterwards; outputs equal the eager module's in both."""
    transformer = build_tiny_sd3_pipeline(seed=0, num_layers=2).transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():  # a trained-looking LoRA: lora_B != 0
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    x, kw = transformer_inputs(transformer, n=2)
    torch._dynamo.reset()
    counters.clear()
    fast = compile_transformer(transformer, backend=BACKEND)
    assert transformer._compiled_call_impl is None  # the module itself stays eager (for gradient steps)
    with torch.no_grad():
        for _ in range(3):
            for sigma in (0.9, 0.4):
                t = {**kw, "timestep": torch.full((2,), 1000 * sigma)}
                policy = fast(x, **t)[0]
                transformer.disable_adapters()
                reference = fast(x, **t)[0]
                want_reference = transformer(x, **t)[0]
                transformer.enable_adapters()
                want_policy = transformer(x, **t)[0]
                assert torch.allclose(policy, want_policy, atol=1e-6) and torch.allclose(reference, want_reference, atol=1e-6)
                assert (policy - reference).abs().max() > 1e-3  # the toggle took effect inside the compiled forward
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])  # LoRA on, LoRA off
    torch._dynamo.reset()


@pytest.mark.slow
def test_compile_sde_step_with_inductor_equals_eager():
    """The default backend's kernels: the same sample (the noise drawn from the generator as eager draws it) and
    log-probability to float rounding; one graph for every step of a run, the SDE window's a = 0 step included."""
    step = compile_sde_step()
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.0])
    torch._dynamo.reset()
    counters.clear()
    eager_g, compiled_g = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    xe, xc = x, x
    for k, a in enumerate((0.7, 0.7, 0.0)):  # an SDE window of two steps, then Euler (std 0, log-prob 0)
        xe, lpe, _, _ = sde_step(xe, v, sigmas[k], sigmas[k + 1], a, generator=eager_g)
        xc, lpc, _, _ = step(xc, v, sigmas[k], sigmas[k + 1], a, generator=compiled_g)
        torch.testing.assert_close(xc, xe, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lpc, lpe, rtol=1e-5, atol=1e-3)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()
