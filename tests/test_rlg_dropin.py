"""RLG as diffusers sees it: free w = 0 / w = 1, the sweep, the call signature, save/load, detaching, early errors.

Every equality is against the stock ``StableDiffusion3Pipeline`` (fp32, tiny, CPU) or against single-scale calls.
Run: nice -n 10 env OMP_NUM_THREADS=1 python -m pytest tests/test_rlg_dropin.py -q -x
"""

from __future__ import annotations

import contextlib
import inspect
import json
import warnings

import pytest
import test_rlg
import torch
from diffusers import StableDiffusion3Pipeline
from flowalign.pipelines import (
    FlowMatchSDEScheduler,
    RLGSchedule,
    RLGStableDiffusion3Pipeline,
    check_rlg_sweep,
    finetuned_first_schedule,
    linear_schedule,
)
from test_rlg import PROMPTS, STEPS, max_diff, rlg_pipeline, sd3_kwargs

from flowalign.tiny import MAX_SEQUENCE_LENGTH

world = test_rlg.world  # the shared fixture: tiny pipeline, one random LoRA saved in every format

SWEEP = [0.0, 0.5, 1.0, 1.5, 2.0]
SWEEP_TOL = 1e-5  # sweep vs one call per scale: float rounding of other batch sizes only (measured: 0 to 5e-6)


@contextlib.contextmanager
def forward_rows(module):
    """Record the number of rows of every forward of ``module`` (the base transformer)."""
    rows: list[int] = []
    handle = module.register_forward_pre_hook(lambda m, args, kw: rows.append((args[0] if args else kw["hidden_states"]).shape[0]), with_kwargs=True)
    try:
        yield rows
    finally:
        handle.remove()


@contextlib.contextmanager
def lora_calls(transformer):
    """Count the rows the LoRA branch is computed for (one lora_A module of the adapter)."""
    module = next(m for name, m in transformer.named_modules() if name.endswith("transformer_blocks.0.attn.to_q.lora_A.rlg"))
    rows: list[int] = []
    handle = module.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        yield rows
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------
# Zero-weight shortcuts: w = 0 is the stock base pipeline, w = 1 the stock fine-tuned pipeline, at the stock cost
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "exact_two_pass", "lora_scaled"])
def test_w0_w1_are_bit_identical_to_stock_at_stock_cost(world, mode):
    n = 2 * len(PROMPTS)  # CFG rows
    with rlg_pipeline(world, mode=mode) as pipe:
        with forward_rows(world.pipe.transformer) as rows, lora_calls(world.pipe.transformer) as lora:
            w0 = pipe(**sd3_kwargs(), rlg_scale=0.0).images
        assert rows == [n] * STEPS and lora == []  # the base model alone, the LoRA never computed
        with forward_rows(world.pipe.transformer) as rows, lora_calls(world.pipe.transformer) as lora:
            w1 = pipe(**sd3_kwargs(), rlg_scale=1.0).images
        assert rows == [n] * STEPS and lora == [n] * STEPS  # the fine-tuned model alone
    # fp32: the same operations as the stock pipeline, so the same bits
    assert max_diff(w0, world.base_images) == 0.0
    assert max_diff(w1, world.ft_images) == 0.0


def test_full_finetune_w0_w1_bit_identical_and_one_model_per_step(world):
    n = 2 * len(PROMPTS)
    with rlg_pipeline(world, world.full) as pipe:
        with forward_rows(world.pipe.transformer) as base_rows, forward_rows(world.full) as ft_rows:
            w0 = pipe(**sd3_kwargs(), rlg_scale=0.0).images
        assert base_rows == [n] * STEPS and ft_rows == []
        with forward_rows(world.pipe.transformer) as base_rows, forward_rows(world.full) as ft_rows:
            w1 = pipe(**sd3_kwargs(), rlg_scale=1.0).images
        assert base_rows == [] and ft_rows == [n] * STEPS
    assert max_diff(w0, world.base_images) == 0.0
    assert max_diff(w1, world.ft_images) <= 1e-4  # the merged copy (W + BA) vs the LoRA (W x + B A x): rounding


def test_schedules_get_the_shortcut_per_step(world):
    n = 2 * len(PROMPTS)
    with rlg_pipeline(world) as pipe:
        with forward_rows(world.pipe.transformer) as rows, lora_calls(world.pipe.transformer) as lora:
            pipe(**sd3_kwargs(), rlg_scale=finetuned_first_schedule(2, 1.5))
        assert rows == [n, n, 2 * n, 2 * n]  # w = 1, 1 (fine-tuned only), then both models in one pass
        assert lora == [n, n, n, n]
        with forward_rows(world.pipe.transformer) as rows, lora_calls(world.pipe.transformer) as lora:
            pipe(**sd3_kwargs(), rlg_scale=[0.0, 0.0, 1.0, 0.5])
        assert rows == [n, n, n, 2 * n] and lora == [n, n]


# ------------------------------------------------------------------------------------------------
# One call, many scales
# ------------------------------------------------------------------------------------------------
def per_scale(pipe, entries, **kw):
    return [pipe(**sd3_kwargs(**kw), rlg_scale=w).images for w in entries]


def blocks(images, k):
    n = len(images) // k
    return [images[j * n : (j + 1) * n] for j in range(k)]


@pytest.mark.parametrize("source", ["lora", "full"])
def test_sweep_equals_one_call_per_scale(world, source):
    entries = [*SWEEP, linear_schedule(0.0, 2.0)]  # a schedule is a scale of the sweep too
    with rlg_pipeline(world, None if source == "lora" else world.full) as pipe:
        singles = per_scale(pipe, entries)
        sweep = pipe(**sd3_kwargs(), rlg_sweep=entries).images
        assert sweep.shape[0] == len(entries) * len(PROMPTS)
        for j, block in enumerate(blocks(sweep, len(entries))):
            assert max_diff(block, singles[j]) <= SWEEP_TOL, entries[j]
        # the scales really differ (the sweep is not one image repeated)
        assert max_diff(singles[0], singles[-2]) > 1e-2
        assert max_diff(singles[0], world.base_images) == 0.0


def test_sweep_batches_each_model_once_per_step_and_respects_max_rows(world):
    n = 2 * len(PROMPTS)  # CFG rows per scale
    with rlg_pipeline(world) as pipe:
        with forward_rows(world.pipe.transformer) as rows, lora_calls(world.pipe.transformer) as lora:
            pipe(**sd3_kwargs(), rlg_sweep=SWEEP)
        # base rows: every scale but 1 (4 n), fine-tuned rows: every scale but 0 (4 n), in ONE forward per step;
        # at the first step all scales share x_T: each model once per image (n + n rows)
        assert rows == [2 * n] + [8 * n] * (STEPS - 1) and lora == [n] + [4 * n] * (STEPS - 1)
        singles = per_scale(pipe, SWEEP)
        with forward_rows(world.pipe.transformer) as rows:
            bounded = pipe(**sd3_kwargs(), rlg_sweep=SWEEP, rlg_max_rows=5).images
        assert max(rows) <= 5 and sum(rows) == 2 * n + 8 * n * (STEPS - 1)
    for j, block in enumerate(blocks(bounded, len(SWEEP))):
        assert max_diff(block, singles[j]) <= SWEEP_TOL


def test_sweep_with_images_per_prompt_latents_and_sde(world):
    with rlg_pipeline(world) as pipe:
        # num_images_per_prompt: blocks of 2 prompts x 2 images
        singles = per_scale(pipe, [0.5, 2.0], num_images_per_prompt=2)
        sweep = pipe(**sd3_kwargs(num_images_per_prompt=2), rlg_sweep=[0.5, 2.0]).images
        for j, block in enumerate(blocks(sweep, 2)):
            assert max_diff(block, singles[j]) <= SWEEP_TOL
        # user latents: reused at every scale
        latents = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
        singles = per_scale(pipe, [0.0, 1.5], latents=latents)
        sweep = pipe(**sd3_kwargs(latents=latents), rlg_sweep=[0.0, 1.5]).images
        for j, block in enumerate(blocks(sweep, 2)):
            assert max_diff(block, singles[j]) <= SWEEP_TOL
        # SDE: the copies of an image share its step noise, so the sweep equals SDE calls per scale
        singles = [pipe(**sd3_kwargs(), rlg_scale=w, sampler="sde").images for w in (0.5, 2.0)]
        sweep = pipe(**sd3_kwargs(), rlg_sweep=[0.5, 2.0], sampler="sde").images
        euler = pipe(**sd3_kwargs(), rlg_scale=0.5).images
    for j, block in enumerate(blocks(sweep, 2)):
        assert max_diff(block, singles[j]) <= SWEEP_TOL
    assert max_diff(singles[0], euler) > 1e-3  # the SDE really added noise


def test_sweep_output_latents_and_tuple(world):
    with rlg_pipeline(world) as pipe:
        out = pipe(**sd3_kwargs(output_type="latent", return_dict=False), rlg_sweep=[0.0, 2.0])
        single = pipe(**sd3_kwargs(output_type="latent", return_dict=False), rlg_scale=2.0)
    assert isinstance(out, tuple) and out[0].shape == (4, 3, 32, 32)
    assert torch.allclose(out[0][2:], single[0], atol=1e-5)


# ------------------------------------------------------------------------------------------------
# The call signature, as diffusers' tooling reads it
# ------------------------------------------------------------------------------------------------
RLG_PARAMETERS = {"rlg_scale", "rlg_sweep", "rlg_mode", "rlg_max_rows", "sampler", "sde_noise_level"}


def test_call_signature_has_every_stock_parameter_of_the_installed_diffusers():
    stock = list(inspect.signature(StableDiffusion3Pipeline.__call__).parameters.values())
    ours = list(inspect.signature(RLGStableDiffusion3Pipeline.__call__).parameters.values())
    assert [p.name for p in ours[: len(stock)]] == [p.name for p in stock]  # same names, same order
    for mine, theirs in zip(ours, stock):
        assert mine.kind == theirs.kind, mine.name
        assert mine.default == theirs.default, (mine.name, mine.default, theirs.default)
    extra = ours[len(stock) :]
    assert {p.name for p in extra} == RLG_PARAMETERS
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
    assert not any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in ours)
    # what diffusers' encode_prompt isolation check and editors look for
    for name in ("prompt", "height", "width", "callback_on_step_end", "negative_prompt", "prompt_embeds"):
        assert name in inspect.signature(RLGStableDiffusion3Pipeline.__call__).parameters
    assert "rlg_sweep" in (RLGStableDiffusion3Pipeline.__call__.__doc__ or "")


def test_positional_prompt_and_stock_callbacks(world):
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append((step, kwargs["latents"].shape[0]))
        return kwargs

    with rlg_pipeline(world) as pipe:
        kw = sd3_kwargs()
        prompt = kw.pop("prompt")
        images = pipe(prompt, **kw, rlg_scale=0.0, callback_on_step_end=callback).images
        pipe(**sd3_kwargs(), rlg_sweep=[0.0, 1.0], callback_on_step_end=callback)
    assert max_diff(images, world.base_images) == 0.0
    assert seen == [(i, 2) for i in range(STEPS)] + [(i, 4) for i in range(STEPS)]


# ------------------------------------------------------------------------------------------------
# The fine-tuned component: optional, saved and loaded, None detaches
# ------------------------------------------------------------------------------------------------
LOAD = dict(text_encoder_3=None, tokenizer_3=None)


@pytest.mark.parametrize("source", ["lora", "full", "none"])
def test_save_pretrained_from_pretrained_round_trip(world, tmp_path, source):
    pipe = RLGStableDiffusion3Pipeline.from_pipe(world.pipe)
    pipe.set_progress_bar_config(disable=True)
    if source != "none":
        pipe.load_finetuned(world.peft_dir if source == "lora" else world.full_dir, mode="exact_two_pass")
    try:
        before = pipe(**sd3_kwargs(), rlg_scale=1.5).images if source != "none" else None
        pipe.save_pretrained(tmp_path / "saved")
        if source != "none":  # the pipeline still works after saving
            assert max_diff(pipe(**sd3_kwargs(), rlg_scale=1.5).images, before) == 0.0
    finally:
        pipe.unload_finetuned()
    again = RLGStableDiffusion3Pipeline.from_pretrained(tmp_path / "saved", **LOAD)
    again.set_progress_bar_config(disable=True)
    index = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    if source == "none":
        assert again.rlg_transformer is None and again.finetuned_transformer is None
        # no fine-tune (diffusers' optional-component round trip): the default call samples the base model, warned
        with pytest.warns(UserWarning, match=r"No fine-tuned model attached: sampling the base model \(w = 0\)"):
            assert max_diff(again(**sd3_kwargs()).images, world.base_images) == 0.0
        with pytest.raises(RuntimeError, match=r"No fine-tuned model attached: RLG at w != 0 needs one"):
            again(**sd3_kwargs(), rlg_scale=1.5)
        again.load_finetuned(world.peft_dir)
        before = None
    else:
        assert again.rlg_transformer is not None and again.rlg_transformer.mode == "exact_two_pass"
        assert (again.rlg_transformer.adapter_name is None) == (source == "full")
        assert index["finetuned_transformer"] == ([None, None] if source == "lora" else ["diffusers", "SD3Transformer2DModel"])
        assert max_diff(again(**sd3_kwargs(), rlg_scale=1.5).images, before) <= 1e-6
    assert max_diff(again(**sd3_kwargs(), rlg_scale=0.0).images, world.base_images) == 0.0
    # the saved base transformer is the plain base model: the stock pipeline loads it and gives the base images
    stock = StableDiffusion3Pipeline.from_pretrained(tmp_path / "saved", **LOAD)
    stock.set_progress_bar_config(disable=True)
    assert not any(".lora_" in k or ".base_layer." in k for k in stock.transformer.state_dict())
    assert max_diff(stock(**sd3_kwargs()).images, world.base_images) == 0.0


@pytest.mark.parametrize("source", ["lora", "full"])
def test_setting_finetuned_transformer_to_none_detaches(world, source):
    pipe = RLGStableDiffusion3Pipeline.from_pipe(world.pipe)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_finetuned(world.peft_dir if source == "lora" else world.full)
    assert (pipe.finetuned_transformer is world.full) == (source == "full")
    pipe.finetuned_transformer = None
    assert pipe.rlg_transformer is None and pipe.finetuned_transformer is None
    assert pipe.config.finetuned_transformer == (None, None)
    assert not getattr(world.pipe.transformer, "peft_config", {})  # the adapter is gone from the base
    with pytest.warns(UserWarning, match="No fine-tuned model attached: sampling the base model"):
        assert max_diff(pipe(**sd3_kwargs()).images, world.base_images) == 0.0  # the stock base pipeline's images
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # w = 0 asked for: the base model, as requested, without a warning
        assert max_diff(pipe(**sd3_kwargs(), rlg_scale=0.0).images, world.base_images) == 0.0
    with pytest.raises(RuntimeError, match=r"No fine-tuned model attached: RLG at w != 0 needs one"):
        pipe(**sd3_kwargs(), rlg_scale=1.0)
    with pytest.raises(RuntimeError, match=r"No fine-tuned model attached: RLG at w != 0 needs one"):
        pipe(**sd3_kwargs(), rlg_sweep=[0.0, 0.5])
    with forward_rows(world.pipe.transformer) as rows, pytest.raises(RuntimeError, match=r"RLG at w != 0 needs one"):
        pipe(**sd3_kwargs(), rlg_scale=linear_schedule(0.0, 1.0))
    assert rows == []  # refused before the first step
    assert max_diff(StableDiffusion3Pipeline(**{k: v for k, v in pipe.components.items() if k != "finetuned_transformer"})(
        **sd3_kwargs()).images, world.base_images) == 0.0
    # a module attaches (and is recorded as the component)
    pipe.finetuned_transformer = world.full
    assert pipe.rlg_transformer.finetuned is world.full
    assert pipe.config.finetuned_transformer[1] == "SD3Transformer2DModel"
    assert max_diff(pipe(**sd3_kwargs(), rlg_scale=1.0).images, world.ft_images) <= 1e-4
    pipe.finetuned_transformer = None
    assert pipe.rlg_transformer is None


def test_from_pipe_keeps_a_full_finetune(world):
    pipe = RLGStableDiffusion3Pipeline.from_pipe(world.pipe)
    pipe.set_progress_bar_config(disable=True)
    pipe.finetuned_transformer = world.full
    other = RLGStableDiffusion3Pipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    assert other.rlg_transformer is not None and other.rlg_transformer.finetuned is world.full
    assert max_diff(other(**sd3_kwargs(), rlg_scale=0.0).images, world.base_images) == 0.0


# ------------------------------------------------------------------------------------------------
# Bad input: an error naming the value and the fix, before the first denoising step
# ------------------------------------------------------------------------------------------------
class CountingSchedule(RLGSchedule):
    def __init__(self, count, value=1.5):
        self.count, self.value = count, value

    def scales(self, timesteps):
        return [self.value] * self.count


BAD_SCALES = [
    (CountingSchedule(STEPS - 1), ValueError, r"CountingSchedule.scales\(\) has 3 values but this run has 4 sampling steps"),
    (CountingSchedule(STEPS + 1), ValueError, r"CountingSchedule.scales\(\) has 5 values but this run has 4 sampling steps"),
    (CountingSchedule(STEPS, float("nan")), ValueError, r"CountingSchedule.scales\(\)\[0\] must be finite, got nan"),
    (CountingSchedule(STEPS, "1.5"), TypeError, r"CountingSchedule.scales\(\)\[0\] must be a real number, got '1.5'"),
    (lambda i, t: [1.0, 2.0], TypeError, r"callable's value at step 0\) must be a real number, got \[1.0, 2.0\]"),
    (lambda i, t: None, TypeError, r"must be a real number, got None"),
    (lambda i, t: float("inf") if i == 2 else 1.0, ValueError, r"at step 2\) must be finite, got inf"),
    ([1.0, 1.0, 1.0], ValueError, r"rlg_scale has 3 values but this run has 4 sampling steps"),
    ([1.0] * 5, ValueError, r"rlg_scale has 5 values but this run has 4 sampling steps"),
    ([1.0, "a", 1.0, 1.0], TypeError, r"rlg_scale\[1\] must be a real number, got 'a'"),
    ([1.0, float("-inf"), 1.0, 1.0], ValueError, r"rlg_scale\[1\] must be finite, got -inf"),
    (float("nan"), ValueError, r"rlg_scale must be finite, got nan"),
    ("1.5", TypeError, r"rlg_scale must be a number, a per-step sequence"),
    (object(), TypeError, r"rlg_scale must be a number, a per-step sequence"),
]


@pytest.mark.parametrize("bad,error,message", BAD_SCALES)
def test_bad_rlg_scale_fails_before_the_first_step(world, bad, error, message):
    with rlg_pipeline(world) as pipe:
        with forward_rows(world.pipe.transformer) as rows:
            with pytest.raises(error, match=message):
                pipe(**sd3_kwargs(), rlg_scale=bad)
            with pytest.raises(error, match=r"rlg_sweep\[1\]: .*" + message):
                pipe(**sd3_kwargs(), rlg_sweep=[1.0, bad])
        assert rows == []  # no model evaluation, no denoising step


BAD_SWEEPS = [
    ([], ValueError, r"rlg_sweep is empty"),
    ([0.0, float("nan")], ValueError, r"rlg_sweep\[1\]: rlg_scale must be finite, got nan"),
    ([0.0, float("inf")], ValueError, r"rlg_sweep\[1\]: rlg_scale must be finite, got inf"),
    (1.5, TypeError, r"rlg_sweep must be a list of scales"),
    ("0 1 2", TypeError, r"rlg_sweep must be a list of scales"),
    (linear_schedule(0, 2), TypeError, r"rlg_sweep must be a list of scales"),
]


@pytest.mark.parametrize("bad,error,message", BAD_SWEEPS)
def test_bad_sweep_fails_before_the_first_step(world, bad, error, message):
    with rlg_pipeline(world) as pipe:
        with forward_rows(world.pipe.transformer) as rows:
            with pytest.raises(error, match=message):
                pipe(**sd3_kwargs(), rlg_sweep=bad)
        assert rows == []
    with pytest.raises(error, match=message):
        check_rlg_sweep(bad)


BAD_CALLS = [
    (dict(negative_prompt=["", "", ""]), {}, ValueError, r"negative_prompt has 3 entries but there are 2 prompts"),
    (dict(prompt_2=["x"]), {}, ValueError, r"prompt_2 has 1 entries but there are 2 prompts"),
    (dict(generator=[torch.Generator().manual_seed(0)] * 3), {}, ValueError, r"a list of 3 generators but the call makes 2 images"),
    (dict(latents=torch.zeros(3, 3, 32, 32)), {}, ValueError, r"latents has 3 rows but the call makes 2 images"),
    (dict(num_images_per_prompt=0), {}, ValueError, r"num_images_per_prompt must be an integer >= 1, got 0"),
    (dict(num_inference_steps=0), {}, ValueError, r"num_inference_steps must be an integer >= 1, got 0"),
    (dict(prompt=[]), {}, ValueError, r"prompt must be a string or a non-empty list of strings"),
    ({}, dict(rlg_scale=1.0, rlg_sweep=[0.0, 1.0]), ValueError, r"Give rlg_scale .* or rlg_sweep .*, not both"),
    ({}, dict(rlg_max_rows=0), ValueError, r"rlg_max_rows must be None \(no bound\) or an integer >= 1, got 0"),
    ({}, dict(rlg_mode="fast"), ValueError, r"Unknown RLG mode 'fast'"),
    (dict(guidance_scale=1.0), dict(rlg_mode="shared_uncond"), ValueError, r"guidance_scale=1.0 turns CFG off"),
    ({}, dict(sampler="sde", sde_noise_level=-1.0), ValueError, r"sde_noise_level must be a finite number >= 0 .*got -1.0"),
    ({}, dict(sampler="heun"), ValueError, r"sampler must be 'euler' or 'sde', got 'heun'"),
]


def test_sampler_ode_is_the_deprecated_name_of_euler(world):
    """One sampler vocabulary, the training config's: "euler" (the default) and "sde"; the old "ode" still samples
    Euler, with a FutureWarning that names the replacement and points at the caller's line."""
    with rlg_pipeline(world) as pipe:
        default = pipe(**sd3_kwargs(), rlg_scale=1.5).images
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "euler" itself: no warning
            euler = pipe(**sd3_kwargs(), rlg_scale=1.5, sampler="euler").images
        with pytest.warns(FutureWarning, match=r"sampler='ode' is deprecated.*use sampler='euler'") as record:
            ode = pipe(**sd3_kwargs(), rlg_scale=1.5, sampler="ode").images
        sde = pipe(**sd3_kwargs(), rlg_scale=1.5, sampler="sde").images
    assert [w.filename for w in record if w.category is FutureWarning] == [__file__]
    assert max_diff(euler, default) == 0.0 and max_diff(ode, euler) == 0.0
    assert max_diff(sde, euler) > 1e-3  # the other sampler really is another one


@pytest.mark.parametrize("overrides,options,error,message", BAD_CALLS)
def test_bad_call_arguments_fail_before_the_first_step(world, overrides, options, error, message):
    with rlg_pipeline(world) as pipe:
        with forward_rows(world.pipe.transformer) as rows:
            with pytest.raises(error, match=message):
                pipe(**sd3_kwargs(**overrides), **options)
            if "rlg_sweep" not in options:
                with pytest.raises(error, match=message):
                    pipe(**sd3_kwargs(**overrides), **{"rlg_sweep": [0.0, 2.0], **options})
        assert rows == []


def test_embeddings_of_another_batch_size(world):
    with rlg_pipeline(world) as pipe:
        pe, npe, ppe, nppe = pipe.encode_prompt(PROMPTS, None, None, max_sequence_length=MAX_SEQUENCE_LENGTH)
        kw = sd3_kwargs(prompt=None, prompt_embeds=pe, negative_prompt_embeds=npe, negative_pooled_prompt_embeds=nppe)
        with forward_rows(world.pipe.transformer) as rows:
            with pytest.raises(ValueError, match=r"pooled_prompt_embeds has 1 rows but prompt_embeds has 2"):
                pipe(**kw, pooled_prompt_embeds=ppe[:1])
        assert rows == []
        # and with matching embeddings: the same images as from the prompts, at every scale of a sweep
        images = pipe(**kw, pooled_prompt_embeds=ppe, rlg_sweep=[0.0, 1.0]).images
    assert max_diff(images[:2], world.base_images) <= SWEEP_TOL
    assert max_diff(images[2:], world.ft_images) <= SWEEP_TOL


def test_finetuned_that_does_not_fit_is_rejected_when_set(world):
    from diffusers import SD3Transformer2DModel

    config = {k: v for k, v in world.pipe.transformer.config.items() if not k.startswith("_")}
    smaller = SD3Transformer2DModel(**{**config, "num_layers": 2})
    pipe = RLGStableDiffusion3Pipeline.from_pipe(world.pipe)
    with pytest.raises(ValueError, match=r"num_layers: base=4, fine-tuned=2"):
        pipe.finetuned_transformer = smaller
    assert pipe.rlg_transformer is None
    with pytest.raises(TypeError, match=r"finetuned_transformer must be a transformer module or None.*load_finetuned"):
        pipe.finetuned_transformer = "path/to/model"
    # a fine-tune already attached stays attached when a bad one is set
    pipe.load_finetuned(world.peft_dir)
    try:
        with pytest.raises(ValueError, match=r"num_layers"):
            pipe.finetuned_transformer = smaller
        assert pipe.rlg_transformer is not None and pipe.rlg_transformer.adapter_name == "rlg"
        assert "rlg" in world.pipe.transformer.peft_config
    finally:
        pipe.unload_finetuned()


# ------------------------------------------------------------------------------------------------
# The SDE scheduler keeps its noise level in its config (#15)
# ------------------------------------------------------------------------------------------------
def test_sde_scheduler_noise_level_is_saved_and_loaded(world, tmp_path):
    sde = FlowMatchSDEScheduler.from_scheduler(world.pipe.scheduler, noise_level=0.35)
    assert sde.config.noise_level == 0.35 and sde.config.shift == world.pipe.scheduler.config.shift
    sde.save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())
    assert saved["noise_level"] == 0.35 and saved["_class_name"] == "FlowMatchSDEScheduler"
    again = FlowMatchSDEScheduler.from_pretrained(tmp_path / "scheduler")
    assert again.noise_level == 0.35 and again.config.shift == sde.config.shift
    assert FlowMatchSDEScheduler.from_config(again.config).noise_level == 0.35
    assert FlowMatchSDEScheduler().noise_level == 0.7
    again.noise_level = 0.0
    assert again.config.noise_level == 0.0
    with pytest.raises(ValueError, match=r"noise_level must be a finite number >= 0.*got -0.5"):
        FlowMatchSDEScheduler(noise_level=-0.5)
