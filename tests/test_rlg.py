"""RLG as a diffusers drop-in: equalities against stock pipelines and a hand-written loop (fp32, tiny, CPU).

Run: nice -n 10 env OMP_NUM_THREADS=1 python -m pytest tests/test_rlg.py -q -x
"""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flowalign.pipelines import (
    FlowMatchSDEScheduler,
    RLGStableDiffusion3Pipeline,
    RLGTransformer,
    check_lora_fits,
    finetuned_first_schedule,
    linear_schedule,
    resolve_rlg_scales,
)
from flowalign.pipelines.lora_utils import (
    add_random_lora,
    merged_copy,
    save_diffusers_lora,
    save_peft_adapter,
)
from flowalign.pipelines.rlg_modes import RLG_MODES, get_rlg_mode

from flowalign.tiny import MAX_SEQUENCE_LENGTH, build_tiny_sd3_pipeline

PROMPTS = ["a red circle", "two blue squares"]
STEPS, CFG, SEED = 4, 4.5, 0
TOL = 1e-4  # max abs pixel difference (images in [0, 1])


def sd3_kwargs(**overrides):
    kw = dict(
        prompt=PROMPTS,
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        output_type="np",
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(SEED),
    )
    kw.update(overrides)
    return kw


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# ------------------------------------------------------------------------------------------------
# Fixtures: one tiny SD3 pipeline, one random LoRA saved in every format, stock reference images
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rlg")
    pipe = build_tiny_sd3_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    transformer = pipe.transformer
    add_random_lora(transformer, "src", rank=4, seed=1, std=0.1)  # lora_B != 0: fine-tuned differs from base
    peft_dir = save_peft_adapter(transformer, "src", tmp / "peft")
    diffusers_dir = save_diffusers_lora(transformer, "src", tmp / "diffusers_lora")
    full = merged_copy(transformer, "src")
    full.save_pretrained(tmp / "full")
    lora_state = {k: v.clone() for k, v in transformer.state_dict().items() if ".src." in k}
    ft_images = pipe(**sd3_kwargs()).images  # stock pipeline with the adapter loaded
    transformer.unload_lora()  # back to the plain base transformer
    base_images = pipe(**sd3_kwargs()).images  # stock pipeline without it
    assert max_diff(ft_images, base_images) > 1e-2, "the random LoRA must change the images"
    return SimpleNamespace(
        pipe=pipe,
        tmp=tmp,
        peft_dir=peft_dir,
        diffusers_dir=diffusers_dir,
        full=full,
        full_dir=tmp / "full",
        lora_state=lora_state,
        ft_images=ft_images,
        base_images=base_images,
    )


@contextlib.contextmanager
def rlg_pipeline(world, source=None, **load_kwargs):
    """An RLG pipeline sharing the world's components, with ``source`` attached (unloaded afterwards)."""
    pipe = RLGStableDiffusion3Pipeline.from_pipe(world.pipe)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_finetuned(world.peft_dir if source is None else source, **load_kwargs)
    try:
        yield pipe
    finally:
        pipe.unload_finetuned()
        assert not getattr(world.pipe.transformer, "peft_config", {}), "adapter left behind"
        assert not any(".base_layer." in k for k in world.pipe.transformer.state_dict()), "LoRA wrappers left behind"


def reference_rlg_images(pipe, scales, shared_uncond=False, lora_scaled=False, adapter="rlg"):
    """The RLG formula written out by hand with stock diffusers calls only (no flowalign.pipelines code).

    v_rlg = v_base + w (v_ft - v_base) per CFG branch (base = LoRA disabled via diffusers' disable_lora),
    then CFG, then the Euler step x <- x + (s_next - s) v.
    """
    transformer = pipe.transformer
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=PROMPTS,
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=True,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    )
    emb, pooled = torch.cat([npe, pe]), torch.cat([nppe, ppe])
    latents = pipe.prepare_latents(
        len(PROMPTS), 3, 32, 32, pe.dtype, torch.device("cpu"), torch.Generator().manual_seed(SEED)
    )
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(STEPS)
    n = len(PROMPTS)

    def velocity(x, t, lora_on: bool, weight: float = 1.0):
        transformer.enable_lora() if lora_on else transformer.disable_lora()
        if lora_on:
            transformer.set_adapters([adapter], weights=[weight])
        out = transformer(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=emb[: x.shape[0]] if x.shape[0] == 2 * n else emb,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        transformer.set_adapters([adapter], weights=[1.0])
        transformer.enable_lora()
        return out

    with torch.no_grad():
        for i, t in enumerate(scheduler.timesteps):
            w = scales[i]
            x2 = torch.cat([latents, latents])
            t2 = t.expand(2 * n)
            if lora_scaled:
                v = velocity(x2, t2, True, weight=w)
            else:
                v_base = velocity(x2, t2, False)
                v_ft = velocity(x2, t2, True)
                v = v_base + w * (v_ft - v_base)
                if shared_uncond:
                    v = torch.cat([v_base[:n], v[n:]])
            v_uncond, v_cond = v.chunk(2)
            guided = v_uncond + CFG * (v_cond - v_uncond)
            latents = latents + (scheduler.sigmas[i + 1] - scheduler.sigmas[i]) * guided
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    return pipe.image_processor.postprocess(image, output_type="np")


# ------------------------------------------------------------------------------------------------
# Equalities with the stock pipeline and with the hand-written loop
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["exact", "exact_batched", "exact_two_pass", "lora_scaled"])
def test_w0_is_base_and_w1_is_finetuned(world, mode):
    with rlg_pipeline(world, mode=mode) as pipe:
        w0 = pipe(**sd3_kwargs(), rlg_scale=0.0).images
        w1 = pipe(**sd3_kwargs(), rlg_scale=1.0).images
    assert max_diff(w0, world.base_images) <= TOL
    assert max_diff(w1, world.ft_images) <= TOL


@pytest.mark.parametrize("w", [0.5, 2.0])
@pytest.mark.parametrize("mode", ["exact_batched", "exact_two_pass"])
def test_exact_modes_match_hand_written_loop(world, w, mode):
    with rlg_pipeline(world, mode=mode) as pipe:
        images = pipe(**sd3_kwargs(), rlg_scale=w).images
        reference = reference_rlg_images(pipe, [w] * STEPS)
    assert max_diff(images, reference) <= TOL
    assert max_diff(images, world.base_images) > 1e-3 and max_diff(images, world.ft_images) > 1e-3


def test_scales_change_images_monotonically_along_the_path(world):
    with rlg_pipeline(world) as pipe:
        images = {w: pipe(**sd3_kwargs(), rlg_scale=w).images for w in (0.0, 0.5, 1.0, 2.0)}
    distances = [max_diff(images[w], world.base_images) for w in (0.0, 0.5, 1.0, 2.0)]
    assert distances[0] <= TOL
    assert distances[1] < distances[2] < distances[3]


def test_approximate_modes_compute_what_they_say(world):
    with rlg_pipeline(world) as pipe:
        shared = pipe(**sd3_kwargs(), rlg_scale=1.5, rlg_mode="shared_uncond").images
        scaled = pipe(**sd3_kwargs(), rlg_scale=1.5, rlg_mode="lora_scaled").images
        exact = pipe(**sd3_kwargs(), rlg_scale=1.5).images
        shared_ref = reference_rlg_images(pipe, [1.5] * STEPS, shared_uncond=True)
        scaled_ref = reference_rlg_images(pipe, [1.5] * STEPS, lora_scaled=True)
    assert max_diff(shared, shared_ref) <= TOL
    assert max_diff(scaled, scaled_ref) <= TOL
    # approximate: they differ from exact RLG at w = 1.5
    assert max_diff(shared, exact) > 1e-3 and max_diff(scaled, exact) > 1e-4


@pytest.mark.parametrize("source", ["peft", "diffusers", "diffusers_file", "state_dict", "full_dir", "full_module"])
def test_every_finetuned_source_gives_the_same_images(world, source):
    sources = {
        "peft": world.peft_dir,
        "diffusers": world.diffusers_dir,
        "diffusers_file": world.diffusers_dir / "pytorch_lora_weights.safetensors",
        "state_dict": {k.replace(".src.", "."): v for k, v in world.lora_state.items()},
        "full_dir": world.full_dir,
        "full_module": world.full,
    }
    src = sources[source]
    if source == "state_dict":  # diffusers naming: "transformer.<module>.lora_A.weight"
        src = {f"transformer.{k}": v for k, v in src.items()}
    with rlg_pipeline(world, src) as pipe:
        images = pipe(**sd3_kwargs(), rlg_scale=1.5).images
    with rlg_pipeline(world) as pipe:  # the PEFT adapter as the reference source
        reference = pipe(**sd3_kwargs(), rlg_scale=1.5).images
    assert max_diff(images, reference) <= TOL
    assert max_diff(images, world.ft_images) > 1e-3


def test_full_finetune_w0_w1(world):
    with rlg_pipeline(world, world.full) as pipe:
        assert pipe.rlg_transformer.resolved_mode == "exact_two_pass"
        assert max_diff(pipe(**sd3_kwargs(), rlg_scale=0.0).images, world.base_images) <= TOL
        assert max_diff(pipe(**sd3_kwargs(), rlg_scale=1.0).images, world.ft_images) <= TOL


# ------------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------------
def test_schedule_values():
    ts = [1000.0, 750.0, 500.0, 250.0, 10.0]
    assert resolve_rlg_scales(1.5, ts) == [1.5] * 5
    assert resolve_rlg_scales(linear_schedule(0.0, 2.0), ts) == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert resolve_rlg_scales(finetuned_first_schedule(2, 1.6), ts) == [1.0, 1.0, 1.6, 1.6, 1.6]
    assert resolve_rlg_scales(lambda i, t: i + t / 1000, ts) == [1.0, 1.75, 2.5, 3.25, 4.01]
    assert resolve_rlg_scales([3, 2, 1, 0, -1], ts) == [3.0, 2.0, 1.0, 0.0, -1.0]
    assert resolve_rlg_scales(linear_schedule(0.5, 2.0), [1000.0]) == [0.5]


def test_per_step_scales_reach_the_right_steps(world):
    scales = [0.0, 2.0, 1.0, 0.5]
    seen = []
    with rlg_pipeline(world) as pipe:
        listed = pipe(**sd3_kwargs(), rlg_scale=scales).images
        called = pipe(**sd3_kwargs(), rlg_scale=lambda i, t: seen.append((i, t)) or scales[i]).images
        reference = reference_rlg_images(pipe, scales)
        timesteps = pipe.scheduler.timesteps.tolist()
        ramp = pipe(**sd3_kwargs(), rlg_scale=linear_schedule(0.0, 1.5)).images
        ramp_ref = reference_rlg_images(pipe, [0.0, 0.5, 1.0, 1.5])
        first = pipe(**sd3_kwargs(), rlg_scale=finetuned_first_schedule(2, 2.0)).images
        first_ref = reference_rlg_images(pipe, [1.0, 1.0, 2.0, 2.0])
    assert max_diff(listed, reference) <= TOL
    assert max_diff(called, reference) <= TOL
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert [t for _, t in seen] == pytest.approx(timesteps)
    assert max_diff(ramp, ramp_ref) <= TOL
    assert max_diff(first, first_ref) <= TOL
    assert max_diff(listed, ramp) > 1e-3


# ------------------------------------------------------------------------------------------------
# Clear errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), [1.0, float("nan"), 1.0, 1.0], lambda i, t: float("inf")])
def test_non_finite_scale_is_rejected(world, bad):
    with rlg_pipeline(world) as pipe, pytest.raises(ValueError, match="finite"):
        pipe(**sd3_kwargs(), rlg_scale=bad)
    with pytest.raises(ValueError, match="finite"):
        RLGTransformer(world.full, finetuned=copy.deepcopy(world.full), rlg_scale=float("nan"))


def test_schedule_of_wrong_length_is_rejected(world):
    with rlg_pipeline(world) as pipe:
        with pytest.raises(ValueError, match=r"rlg_scale has 3 values but this run has 4 sampling steps"):
            pipe(**sd3_kwargs(), rlg_scale=[1.0, 1.0, 1.0])


def test_lora_with_wrong_shapes_names_the_module(world):
    bad = {k: v for k, v in world.lora_state.items()}
    key = next(k for k in bad if "transformer_blocks.1.attn.to_q.lora_A" in k)
    bad[key] = torch.zeros(4, 77)
    state = {f"transformer.{k.replace('.src.', '.')}": v for k, v in bad.items()}
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn\.to_q.*takes 128"):
        check_lora_fits(world.pipe.transformer, state)
    pipe = RLGStableDiffusion3Pipeline.from_pipe(world.pipe)
    with pytest.raises(ValueError, match=r"transformer_blocks\.1\.attn\.to_q"):
        pipe.load_finetuned(state)
    assert pipe.rlg_transformer is None and not getattr(world.pipe.transformer, "peft_config", {})


def test_lora_for_missing_module_names_the_module(world, tmp_path):
    state = {f"transformer.{k.replace('.src.', '.')}": v for k, v in world.lora_state.items()}
    state = {k.replace("transformer_blocks.1.", "transformer_blocks.9."): v for k, v in state.items()}
    pipe = RLGStableDiffusion3Pipeline.from_pipe(world.pipe)
    with pytest.raises(
        ValueError, match=r"transformer_blocks\.9\.attn\.\S+ which does not exist|'transformer_blocks\.9\."
    ):
        pipe.load_finetuned(state)
    # a PEFT config whose target module is missing
    import json
    import shutil

    peft_dir = tmp_path / "peft"
    shutil.copytree(world.peft_dir, peft_dir)
    config = json.loads((peft_dir / "adapter_config.json").read_text())
    config["target_modules"] = ["attn.to_q", "attn.not_a_module"]
    (peft_dir / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="attn.not_a_module"):
        pipe.load_finetuned(peft_dir)
    assert not getattr(world.pipe.transformer, "peft_config", {})


def test_finetuned_transformer_of_another_architecture(world, tmp_path):
    from diffusers import SD3Transformer2DModel

    config = dict(world.pipe.transformer.config)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["num_layers"] = 2
    smaller = SD3Transformer2DModel(**config)
    pipe = RLGStableDiffusion3Pipeline.from_pipe(world.pipe)
    with pytest.raises(ValueError, match=r"num_layers: base=4, fine-tuned=2"):
        pipe.load_finetuned(smaller)
    smaller.save_pretrained(tmp_path / "smaller")
    with pytest.raises(ValueError, match=r"num_layers"):
        pipe.load_finetuned(tmp_path / "smaller")
    flux = _tiny_flux_transformer()
    with pytest.raises(ValueError, match="FluxTransformer2DModel but the base is a SD3Transformer2DModel"):
        pipe.load_finetuned(flux)
    flux.save_pretrained(tmp_path / "flux")
    with pytest.raises(ValueError, match="FluxTransformer2DModel but the base is a SD3Transformer2DModel"):
        pipe.load_finetuned(tmp_path / "flux")


def test_other_errors(world):
    pipe = RLGStableDiffusion3Pipeline.from_pipe(world.pipe)
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(RuntimeError, match="RLG at w != 0 needs one; call pipe.load_finetuned"):
        pipe(**sd3_kwargs(), rlg_scale=2.0)
    with pytest.raises(ValueError, match="Unknown RLG mode"):
        pipe.load_finetuned(world.full, mode="fast")
    pipe.unload_finetuned()
    pipe.load_finetuned(world.full)
    with pytest.raises(ValueError, match="needs a LoRA"):
        pipe(**sd3_kwargs(), rlg_mode="lora_scaled")
    with pytest.raises(RuntimeError, match="already attached"):
        pipe.load_finetuned(world.peft_dir)
    pipe.unload_finetuned()
    with pytest.raises(FileNotFoundError):
        pipe.load_finetuned("/no/such/dir")
    text_lora = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}
    with pytest.raises(ValueError, match="text encoders"):
        pipe.load_finetuned(text_lora)


def test_fused_lora_is_rejected(world):
    with rlg_pipeline(world) as pipe:
        pipe.transformer.fuse_lora(adapter_names=["rlg"])
        try:
            with pytest.raises(RuntimeError, match="fused"):
                pipe(**sd3_kwargs())
        finally:
            pipe.transformer.unfuse_lora()


# ------------------------------------------------------------------------------------------------
# Pipeline construction, SDE sampler
# ------------------------------------------------------------------------------------------------
def test_from_pretrained_and_stock_outputs(world, tmp_path):
    world.pipe.save_pretrained(tmp_path / "base")
    pipe = RLGStableDiffusion3Pipeline.from_pretrained(tmp_path / "base", text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_finetuned(world.peft_dir)
    out = pipe(**sd3_kwargs(), rlg_scale=0.0)
    assert type(out).__name__ == "StableDiffusion3PipelineOutput"
    assert max_diff(out.images, world.base_images) <= TOL
    assert max_diff(pipe(**sd3_kwargs(), rlg_scale=1.0).images, world.ft_images) <= TOL
    latents = pipe(**sd3_kwargs(output_type="latent", return_dict=False), rlg_scale=1.0)
    assert isinstance(latents, tuple) and latents[0].shape == (2, 3, 32, 32)
    assert type(pipe.transformer).__name__ == "SD3Transformer2DModel"  # restored after the call
    # A pipeline with a full fine-tuned transformer saves and loads it as a component.
    pipe.unload_finetuned()
    pipe.load_finetuned(world.full_dir)
    pipe.save_pretrained(tmp_path / "rlg")
    again = RLGStableDiffusion3Pipeline.from_pretrained(tmp_path / "rlg", text_encoder_3=None, tokenizer_3=None)
    again.set_progress_bar_config(disable=True)
    assert type(again.finetuned_transformer).__name__ == "SD3Transformer2DModel"
    assert max_diff(again(**sd3_kwargs(), rlg_scale=1.0).images, world.ft_images) <= TOL


def test_sde_sampler(world):
    with rlg_pipeline(world) as pipe:
        euler = pipe(**sd3_kwargs(), rlg_scale=1.5).images
        a0 = pipe(**sd3_kwargs(), rlg_scale=1.5, sampler="sde", sde_noise_level=0.0).images
        sde1 = pipe(**sd3_kwargs(), rlg_scale=1.5, sampler="sde").images
        sde2 = pipe(**sd3_kwargs(), rlg_scale=1.5, sampler="sde").images
        sde_other = pipe(**sd3_kwargs(generator=torch.Generator().manual_seed(1)), rlg_scale=1.5, sampler="sde").images
        assert isinstance(pipe.scheduler, type(world.pipe.scheduler))  # stock scheduler restored
    assert max_diff(a0, euler) <= TOL  # a = 0 is the Euler ODE
    assert max_diff(sde1, sde2) == 0.0  # seeded
    assert max_diff(sde1, euler) > 1e-3 and max_diff(sde1, sde_other) > 1e-3
    sched = FlowMatchSDEScheduler.from_scheduler(world.pipe.scheduler, 0.7)
    assert sched.config.shift == world.pipe.scheduler.config.shift


# ------------------------------------------------------------------------------------------------
# The wrapper alone: velocity level, and inside a second pipeline class (FLUX)
# ------------------------------------------------------------------------------------------------
def wrapper_inputs():
    """A 4-row transformer input (two timesteps, a CFG-shaped batch) of the tiny world, seeded: ``(x, kwargs)``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    return x, dict(
        encoder_hidden_states=torch.randn(4, 17, 128, generator=g),
        pooled_projections=torch.randn(4, 128, generator=g),
        timestep=torch.tensor([900.0, 400.0, 900.0, 400.0]),
    )


def test_wrapper_velocities_all_modes(world):
    transformer = world.pipe.transformer
    add_random_lora(transformer, "v", rank=4, seed=3, std=0.1)
    try:
        x, kw = wrapper_inputs()
        with torch.no_grad():
            transformer.disable_lora()
            v_base = transformer(x, **kw).sample
            transformer.enable_lora()
            v_ft = transformer(x, **kw).sample
            rlg = RLGTransformer(transformer, adapter_name="v", rlg_scale=0.7)
            expected = v_base + 0.7 * (v_ft - v_base)
            for mode in ("exact", "exact_batched", "exact_two_pass"):
                rlg.mode = mode
                assert torch.allclose(rlg(x, **kw).sample, expected, atol=1e-5)
            rlg.mode, rlg.cfg_batch = "shared_uncond", True
            shared = rlg(x, **kw, return_dict=False)[0]
            assert torch.allclose(shared[:2], v_base[:2], atol=1e-5) and torch.allclose(
                shared[2:], expected[2:], atol=1e-5
            )
            rlg.remove_hooks()
            assert torch.allclose(transformer(x, **kw).sample, v_ft)  # hooks gone, adapter untouched
    finally:
        transformer.unload_lora()


def test_evaluation_modes_one_strategy_each_checked_in_one_place():
    """The modes' table (exact, evaluations per step with CFG) by hand, and every refusal of get_rlg_mode."""
    assert RLG_MODES == ("exact", "exact_batched", "exact_two_pass", "lora_scaled", "shared_uncond")
    assert {name: (get_rlg_mode(name).exact, get_rlg_mode(name).evaluations) for name in RLG_MODES} == {
        "exact": (True, 4),
        "exact_batched": (True, 4),
        "exact_two_pass": (True, 4),
        "lora_scaled": (False, 2),
        "shared_uncond": (False, 3),
    }
    assert get_rlg_mode("exact").resolve(lora=True).name == "exact_batched"
    assert get_rlg_mode("exact").resolve(lora=False).name == "exact_two_pass"
    assert get_rlg_mode("shared_uncond", lora=False, guidance_scale=4.5).name == "shared_uncond"
    with pytest.raises(ValueError, match=r"Unknown RLG mode 'fast'; choose one of \('exact', "):
        get_rlg_mode("fast")
    for name in ("exact_batched", "lora_scaled"):
        with pytest.raises(ValueError, match=rf"rlg_mode='{name}' needs a LoRA fine-tune; .* use 'exact' or"):
            get_rlg_mode(name, lora=False, argument="rlg_mode")
        assert get_rlg_mode(name, lora=None).name == name  # the fine-tune's kind not known yet: not refused
    with pytest.raises(ValueError, match=r"guidance_scale=1.0 turns CFG off"):
        get_rlg_mode("shared_uncond", guidance_scale=1.0)
    with pytest.raises(ValueError, match=r"cannot be combined with skip_guidance_layers"):
        get_rlg_mode("shared_uncond", guidance_scale=4.5, skip_guidance_layers=[1])


def test_tensor_w_runs_the_same_strategy_as_host_w(world):
    """w as a tensor (not read on the host) goes through each mode's own strategy: the same velocity as w given as a
    number, bit for bit, and shared_uncond's rows: the base model on [uncond; cond], the fine-tuned on cond only."""
    transformer = world.pipe.transformer
    add_random_lora(transformer, "v", rank=4, seed=3, std=0.1)
    try:
        x, kw = wrapper_inputs()
        rows = []
        hook = transformer.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
        with torch.no_grad():
            transformer.disable_lora()
            v_base = transformer(x, **kw).sample
            transformer.enable_lora()
            rlg = RLGTransformer(transformer, adapter_name="v")
            rlg.cfg_batch = True
            for mode in RLG_MODES:
                rlg.mode = mode
                rlg.set_rlg_scale(0.7)
                host = rlg(x, **kw).sample
                rlg.set_rlg_scale(torch.tensor(0.7))
                rows.clear()
                tensor = rlg(x, **kw).sample
                assert torch.equal(tensor, host), mode
                if mode == "shared_uncond":
                    assert rows == [4 + 2]  # one pass: base on the 4 rows, the fine-tuned model on the 2 cond rows
                    assert torch.allclose(tensor[:2], v_base[:2], atol=1e-5)  # uncond half: the base model
            rlg.cfg_batch = False
            with pytest.raises(RuntimeError, match=r"mode='shared_uncond' needs the CFG batch layout"):
                rlg(x, **kw)
            rlg.remove_hooks()
        hook.remove()
    finally:
        transformer.unload_lora()


def _tiny_flux_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=12,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )


def _word_tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["a", "an", "one", "two", "three", "red", "green", "blue", "circle", "circles", "square", "squares", "triangle", "of", "the"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


@pytest.fixture(scope="module")
def flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flowalign.tiny import build_lossless_vae

    torch.manual_seed(0)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            projection_dim=32,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=0,
        )
    ).eval()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=32,
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    ).eval()  # eval: no dropout
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=build_lossless_vae(),
        text_encoder=clip,
        tokenizer=_word_tokenizer(8),
        text_encoder_2=t5,
        tokenizer_2=_word_tokenizer(8),
        transformer=_tiny_flux_transformer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_images(pipe, **kw):
    return pipe(
        prompt=PROMPTS,
        num_inference_steps=STEPS,
        height=16,
        width=16,
        max_sequence_length=8,
        output_type="np",
        generator=torch.Generator().manual_seed(SEED),
        **kw,
    ).images


@pytest.mark.parametrize("mode", ["exact_batched", "exact_two_pass"])
def test_flux_pipeline_with_rlg_transformer(flux, mode):
    transformer = flux.transformer
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "proj_mlp"]
    base_images = flux_images(flux)
    add_random_lora(transformer, "ft", rank=4, seed=2, std=0.2, target_modules=targets)
    try:
        ft_images = flux_images(flux)
        assert max_diff(ft_images, base_images) > 1e-2
        rlg = RLGTransformer(transformer, adapter_name="ft", mode=mode)
        flux.transformer = rlg
        try:
            rlg.set_rlg_scale(0.0)
            assert max_diff(flux_images(flux), base_images) <= TOL
            rlg.set_rlg_scale(1.0)
            assert max_diff(flux_images(flux), ft_images) <= TOL
            # w = 2 at the velocity level (the FLUX call signature, with 2-d img_ids / txt_ids)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(2, 64, 12, generator=g)
            kw = dict(
                encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g),
                timestep=torch.tensor([0.9, 0.3]),
                img_ids=torch.zeros(64, 3),
                txt_ids=torch.zeros(8, 3),
                return_dict=False,
            )
            with torch.no_grad():
                rlg.set_rlg_scale(2.0)
                mixed = rlg(x, **kw)[0]
                transformer.disable_lora()
                v_base = transformer(x, **kw)[0]
                transformer.enable_lora()
                v_ft = transformer(x, **kw)[0]
            assert torch.allclose(mixed, v_base + 2.0 * (v_ft - v_base), atol=1e-5)
            # a schedule with the stock FLUX pipeline
            handle = rlg.follow_schedule(flux.scheduler, [0.0] * STEPS)
            assert max_diff(flux_images(flux), base_images) <= TOL
            handle.remove()
            two = flux_images(flux)
            assert max_diff(two, ft_images) > 1e-3
        finally:
            rlg.remove_hooks()
            flux.transformer = transformer
    finally:
        transformer.unload_lora()


def test_float_edge_cases_of_schedule_errors():
    with pytest.raises(TypeError):
        resolve_rlg_scales(True, [1.0])
    with pytest.raises(TypeError):
        resolve_rlg_scales("1.0", [1.0])
    assert resolve_rlg_scales(np.float32(1.25), [1.0, 2.0]) == [1.25, 1.25]
    assert resolve_rlg_scales(torch.tensor(0.5), [1.0]) == [0.5]
    assert resolve_rlg_scales(np.array([0.5, -1e300]), [1.0, 2.0]) == [0.5, -1e300]
    with pytest.raises(ValueError, match=r"rlg_scale must be finite, got inf"):
        resolve_rlg_scales(np.float64("inf"), [1.0])


@pytest.mark.slow
def test_wrapper_compiles_to_one_graph_and_w_changes_do_not_recompile():
    """The per-step combine has no Python branching on tensor values and no host syncs (torch.compile)."""
    from diffusers import SD3Transformer2DModel
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=4,
        in_channels=3,
        num_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        caption_projection_dim=32,
        pooled_projection_dim=32,
        out_channels=3,
        pos_embed_max_size=8,
    )
    add_random_lora(transformer, "rlg", rank=4, seed=1, std=0.1)
    rlg = RLGTransformer(transformer, adapter_name="rlg")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    kw = dict(
        encoder_hidden_states=torch.randn(4, 5, 32, generator=g),
        pooled_projections=torch.randn(4, 32, generator=g),
        timestep=torch.full((4,), 700.0),
        return_dict=False,
    )
    for mode in ("exact_batched", "lora_scaled"):  # (exact_two_pass: the same hooks, two calls)
        torch._dynamo.reset()
        counters.clear()
        rlg.mode = mode
        compiled = torch.compile(rlg, backend="eager", fullgraph=True)
        with torch.no_grad():
            for w in (0.5, 1.0, 2.0):  # w as a tensor: not read on the host, so no shortcut and no recompile
                rlg.set_rlg_scale(torch.tensor(w))
                assert torch.allclose(compiled(x, **kw)[0], rlg(x, **kw)[0], atol=1e-6)
        assert counters["stats"]["unique_graphs"] == 1, (mode, dict(counters["stats"]))
    torch._dynamo.reset()
