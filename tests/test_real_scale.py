"""What a real-model run needs, checked on the tiny model: LoRA checkpoints that reload at their trained strength,
frozen weights in the training dtype, bounded prompt caches with offloadable encoders, micro-batched rollouts,
decodes and evaluations that equal the batched ones, the fp16 gradient-scaler path, a resolution setting,
starting from an existing LoRA, and an evaluation that works on any prompt and on every rank."""

import contextlib
import sys
import textwrap

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import StableDiffusion3Pipeline
from flowalign.pipelines import RLGStableDiffusion3Pipeline
from PIL import Image

from flowalign import sample

# The tiny config, trainer (rewarded by redness), pipeline and LoRA copy are conftest.py's fixtures: tiny_config,
# make_trainer, tiny_pipeline, lora_state. prompt_source=PROMPTS hands the trainer these prompts (not shapes prompts).
PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow star", "a photo of a cat"]


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state: another mixed precision needs it reset (before and after)."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


# --- 1. LoRA checkpoints keep their strength -----------------------------------------------------------------------
def test_a_trained_lora_with_alpha_not_r_reloads_at_its_trained_strength(tmp_path, make_trainer, lora_state,
                                                                          tiny_pipeline):
    """r = 4, alpha = 8 (scale 2): the checkpoint must carry alpha, or every loader scales it by 1."""
    base_dir = tmp_path / "base"
    tiny_pipeline(seed=0, num_layers=1).save_pretrained(base_dir)
    trainer = make_trainer(tmp_path / "run", algorithm="orw", lora_rank=4, lora_alpha=8.0, learning_rate=3e-2,
                           prompt_source=PROMPTS, guidance_scale=2.0)
    trainer.step()
    assert any(v.abs().sum() > 0 for k, v in lora_state(trainer).items() if "lora_B" in k)  # it did train
    checkpoint = trainer.save_checkpoint()
    trained = trainer.pipe  # the trainer's own pipeline: its transformer is the policy
    trained.transformer.eval()
    call = {"prompt": ["a red circle"], "negative_prompt": [""], "num_inference_steps": 3, "guidance_scale": 2.0,
            "max_sequence_length": 1}

    def images(pipe, **extra):
        generator = [torch.Generator().manual_seed(0)]
        return np.asarray(pipe(**call, generator=generator, output_type="np", **extra).images)

    with torch.no_grad():
        expected = images(trained)
        # (a) diffusers' own loader
        stock = StableDiffusion3Pipeline.from_pretrained(base_dir, text_encoder_3=None, tokenizer_3=None)
        stock.set_progress_bar_config(disable=True)
        stock.load_lora_weights(checkpoint)
        np.testing.assert_allclose(images(stock), expected, atol=1e-5)
        # (b) the RLG pipeline at w = 1
        rlg = RLGStableDiffusion3Pipeline.from_pretrained(base_dir, text_encoder_3=None, tokenizer_3=None)
        rlg.set_progress_bar_config(disable=True)
        rlg.load_finetuned(checkpoint)
        np.testing.assert_allclose(images(rlg, rlg_scale=1.0), expected, atol=1e-5)
        base_images = images(stock.__class__.from_pretrained(base_dir, text_encoder_3=None, tokenizer_3=None))
        assert np.abs(base_images - expected).max() > 1e-3  # the LoRA's effect is visible, so (a)/(b) test its scale
    # (c) flowalign sample --finetuned: the PNG of w = 1 is the trainer's image, quantised
    out = tmp_path / "sample"
    parser = __import__("argparse").ArgumentParser()
    sample.add_arguments(parser)
    args = parser.parse_args(["--base", str(base_dir), "--finetuned", str(tmp_path / "run"), "--prompts", "a red circle",
                              "--scales", "1", "--steps", "3", "--cfg", "2", "--seed", "0", "--out", str(out),
                              "--device", "cpu"])
    assert sample.run(args) == 0
    png = np.asarray(Image.open(next((out / "images").glob("*_w1_*.png")))).astype(np.float64) / 255
    assert np.abs(png - expected[0]).max() <= 1.5 / 255


# --- 2. frozen weights in the training dtype, trainable ones in fp32 ------------------------------------------------
def test_frozen_weights_in_the_weight_dtype_and_trainable_ones_in_fp32(tmp_path, fresh_accelerate_state, make_trainer,
                                                                        lora_state):
    trainer = make_trainer(tmp_path, mixed_precision="bf16", algorithm="orw", learning_rate=1e-2)
    model = trainer.unwrapped
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    frozen = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora.values())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen.values())
    for module in (trainer.pipe.vae, trainer.pipe.text_encoder, trainer.pipe.text_encoder_2):
        assert all(p.dtype == torch.bfloat16 for p in module.parameters())
    before = lora_state(trainer)
    trainer.step()
    after = lora_state(trainer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in after.values())
    AcceleratorState._reset_state(True)
    with pytest.raises(ValueError, match="weight_dtype='bf16' with mixed_precision 'no'"):
        make_trainer(tmp_path, mixed_precision="no", weight_dtype="bf16")


def test_precision_and_checkpointing_defaults_follow_the_device(tmp_path, make_trainer):
    trainer = make_trainer(tmp_path)  # on this CPU: "auto" is full precision, checkpointing off (time, not memory)
    assert trainer.accelerator.mixed_precision == "no" and trainer.weight_dtype == torch.float32
    assert not trainer.unwrapped.is_gradient_checkpointing
    assert make_trainer(tmp_path, gradient_checkpointing=True).unwrapped.is_gradient_checkpointing


# --- 3. decode, rollouts and evaluation in micro-batches equal the batched ones ------------------------------------
@pytest.mark.parametrize("sampler", ["sde", "euler"])
def test_rollout_and_decode_do_not_depend_on_the_micro_batch(tmp_path, sampler, make_trainer):
    whole = make_trainer(tmp_path, rollout_batch_size=64, decode_batch_size=64, sampler=sampler,
                         fm_states="noised", sde_steps_fraction=0.67)
    small = make_trainer(tmp_path, rollout_batch_size=2, decode_batch_size=3, sampler=sampler,
                         fm_states="noised", sde_steps_fraction=0.67)
    prompts = PROMPTS * 2
    a = whole.policy.rollout(prompts, torch.Generator().manual_seed(1), sampler)
    b = small.policy.rollout(prompts, torch.Generator().manual_seed(1), sampler)
    for key in ("latents", "trajectory", "log_probs"):  # equal up to float rounding of batched kernels
        if getattr(a, key) is not None:
            torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=1e-6, atol=1e-6, msg=key)
    torch.testing.assert_close(whole.policy.decode(a.latents), small.policy.decode(a.latents), rtol=1e-6, atol=1e-6)
    if sampler == "sde":  # the pre-drawn noise is the generator's stream: the same samples as one batched SDE call
        g = torch.Generator().manual_seed(1)
        noise = torch.randn((len(prompts), *whole.latent_shape), generator=g)
        assert torch.equal(a.trajectory[:, 0], noise)
        assert a.log_probs[:, :2].abs().sum() > 0 and a.log_probs[:, 2:].abs().sum() == 0  # the window


def test_evaluation_does_not_depend_on_the_micro_batch_and_reads_any_prompt(tmp_path, make_trainer):
    """Default unseen rewards read any prompt (the shapes verifier only reads shapes prompts)."""
    evals = []
    for size in (1, 64):
        trainer = make_trainer(tmp_path / str(size), prompt_source=PROMPTS, eval_prompts=3, eval_images_per_prompt=2,
                               eval_steps=2, rollout_batch_size=size, decode_batch_size=size)
        evals.append(trainer.evaluate())
    a, b = evals
    assert list(a["per_image"]) == ["reward", "eval_jpeg_compressibility", "coupling_distance", "kl_to_reference",
                                    "path_kl"]
    assert len(a["per_image"]["reward"]) == 6
    for key, values in a["per_image"].items():  # equal up to float rounding (a 1-row GEMM may round differently)
        np.testing.assert_allclose(b["per_image"][key], values, rtol=1e-6, atol=1e-7, err_msg=key)
    assert b["diversity"] == pytest.approx(a["diversity"], rel=1e-6)


# --- 4. the prompt cache is bounded; the text encoders are needed once ---------------------------------------------
def test_prompt_cache_is_bounded_and_equal_to_fresh_encodes(tmp_path, monkeypatch, make_trainer):
    trainer = make_trainer(tmp_path, prompt_source=PROMPTS, prompt_cache_size=3)
    fresh = make_trainer(tmp_path, prompt_source=PROMPTS, cache_prompt_embeddings=False)
    for _ in range(3):
        embeds, pooled = trainer.policy.encode(PROMPTS)
        assert len(trainer.policy._embed_cache) <= 3
    ref_embeds, ref_pooled = fresh.policy.encode(PROMPTS)
    torch.testing.assert_close(embeds, ref_embeds, rtol=1e-6, atol=1e-6)  # other encoder batches: float rounding
    torch.testing.assert_close(pooled, ref_pooled, rtol=1e-6, atol=1e-6)
    assert len(fresh.policy._embed_cache) == 0


def test_every_prompt_is_encoded_once_when_they_fit(tmp_path, monkeypatch, make_trainer):
    """What the trainer does at start when the text encoders are offloaded (on a GPU)."""
    trainer = make_trainer(tmp_path, prompt_source=PROMPTS, eval_prompts=2, iterations=2)
    assert trainer.policy.encoded_prompts == 0  # on a CPU prompts are encoded as they come
    assert trainer.precompute_embeddings()
    assert trainer.policy.encoded_prompts == len(PROMPTS) + 1  # the training prompts (held-out: their first 2) and ""
    six = make_trainer(tmp_path, prompt_source=PROMPTS, prompt_cache_size=5)
    assert not six.precompute_embeddings()  # 6 do not fit
    calls = []
    monkeypatch.setattr("flowalign.policy.encode_prompts", lambda *a, **k: calls.append(a) or (_ for _ in ()).throw(
        AssertionError("the text encoders ran during training")))
    trainer.train()
    assert calls == [] and trainer.iteration == 2


# --- 5. the fp16 gradient scaler path (Flow-GRPO crashed at its second skipped step) --------------------------------
def _scaled_accelerator(init_scale):
    acc = Accelerator(cpu=True, mixed_precision="fp16")
    # accelerate keeps fp16 off on a CPU; turn on its GPU path (scaler and autocast) to run the scaler logic here
    acc.native_amp = True
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return acc


def test_grpo_under_an_overflowing_fp16_scaler_skips_steps_instead_of_crashing(tmp_path, fresh_accelerate_state,
                                                                                make_trainer, lora_state):
    trainer = make_trainer(tmp_path, algorithm="grpo", minibatch_size=2,
                           accelerator=_scaled_accelerator(init_scale=3e38))  # every scaled gradient is inf
    before = lora_state(trainer)
    trainer.step()
    trainer.step()  # the first skip left the optimizer "already unscaled" on main: this raised
    assert trainer.counters["skipped_updates"] >= 2
    assert all(torch.equal(before[k], v) for k, v in lora_state(trainer).items())  # no inf reached the weights
    assert trainer.accelerator.scaler.get_scale() < 3e38  # the scaler backed off


# --- 6. resolution, starting from an existing LoRA, the optional 8-bit optimizer ----------------------------------
def test_resolution_sets_the_latent_size_and_bad_values_are_named(tmp_path, make_trainer):
    trainer = make_trainer(tmp_path, resolution=16)  # the tiny model's default is 32 px
    down = trainer.pipe.vae_scale_factor
    assert trainer.latent_shape[1:] == (16 // down, 16 // down)
    roll = trainer.policy.rollout(PROMPTS[:2], torch.Generator().manual_seed(0), "sde")
    assert trainer.policy.decode(roll.latents).shape[-2:] == (16, 16)
    trainer.step()  # the critic and the update take the smaller latents
    with pytest.raises(ValueError, match="resolution=30 must be a multiple of"):
        make_trainer(tmp_path, resolution=30)
    with pytest.raises(ValueError, match="resolution=64 is larger than this transformer's positional embedding"):
        make_trainer(tmp_path, resolution=64)


def test_init_lora_starts_from_a_checkpoint_and_refuses_another_alpha(tmp_path, make_trainer, lora_state):
    first = make_trainer(tmp_path / "a", algorithm="orw", learning_rate=3e-2, lora_alpha=8.0)
    first.step()
    checkpoint = first.save_checkpoint()
    second = make_trainer(tmp_path / "b", algorithm="orw", lora_alpha=8.0, init_lora=str(checkpoint))
    trained, loaded = lora_state(first), lora_state(second)
    assert all(torch.equal(trained[k], loaded[k]) for k in trained)
    with pytest.raises(ValueError, match=r"lora_alpha=8.0 \(expected 4.0\)"):
        make_trainer(tmp_path / "c", init_lora=str(checkpoint))


def test_adamw8bit_without_bitsandbytes_says_how_to_install_it(tmp_path, monkeypatch, make_trainer):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        make_trainer(tmp_path, optimizer="adamw8bit")


# --- 7. evaluation shared across ranks -------------------------------------------------------------------------------
EVAL_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from flowalign.tiny import build_tiny_sd3_pipeline
    from flowalign.trainer import ACFlowConfig, ACFlowTrainer

    out, config = sys.argv[1], sys.argv[2]  # the test's tiny_config, written as YAML
    results = {}
    for n_prompts in (3, 1):  # 2 ranks: 2 + 1 prompts (the last share padded), and 1 + 0 (an empty share)
        cfg = ACFlowConfig.from_yaml(config, {"output_dir": out, "eval_prompts": n_prompts})
        reward = lambda images, prompts: images[:, 0].mean((1, 2))
        trainer = ACFlowTrainer(cfg, reward=reward, pipeline=build_tiny_sd3_pipeline(seed=0, num_layers=1),
                                prompts=["a red circle", "a blue square", "two green triangles", "a yellow star"])
        result = trainer.evaluate()
        results[n_prompts] = {k: result[k] for k in ("per_image", "diversity", "w2_to_reference")}
    if trainer.is_main:
        json.dump(results, open(out + "/eval.json", "w"))
    """
)


@pytest.mark.slow
def test_evaluation_on_two_processes_equals_one(tmp_path, tiny_config, accelerate_launch):
    script, config = tmp_path / "eval.py", tmp_path / "tiny.yaml"
    script.write_text(EVAL_SCRIPT)
    tiny_config(tmp_path, algorithm="orw", iterations=1, sample_steps=2, minibatch_size=2, eval_images_per_prompt=2,
                eval_steps=2).to_yaml(config)
    results = []
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        out.mkdir()
        accelerate_launch(script, out, config, processes=n, port=29541)
        results.append(__import__("json").loads((out / "eval.json").read_text()))
    for n_prompts in ("3", "1"):
        one, two = results[0][n_prompts], results[1][n_prompts]
        assert len(one["per_image"]["reward"]) == 2 * int(n_prompts)  # rank 1 holds 1 prompt of 3, or none of 1
        for key, values in one["per_image"].items():
            np.testing.assert_allclose(two["per_image"][key], values, rtol=1e-6, atol=1e-7, err_msg=key)
        assert two["diversity"] == pytest.approx(one["diversity"], rel=1e-6)
        assert two["w2_to_reference"] == pytest.approx(one["w2_to_reference"], rel=1e-5, abs=1e-7)


# --- 8. compiled rollouts ----------------------------------------------------------------------------------------------
def test_compiled_rollouts_equal_eager_ones_and_the_reference_still_switches(tmp_path, make_trainer):
    eager = make_trainer(tmp_path / "eager", sampler="sde", sample_steps=2)
    fast = make_trainer(tmp_path / "fast", sampler="sde", sample_steps=2, compile=True)
    for trainer in (eager, fast):  # a non-zero LoRA, so policy and reference differ
        with torch.no_grad():
            for name, p in trainer.unwrapped.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    assert fast.policy.compiled is not None and eager.policy.compiled is None
    prompts = PROMPTS[:4]
    for model in ("policy", "reference"):
        rolls = []
        for trainer in (eager, fast):
            with contextlib.ExitStack() as stack:
                ref = stack.enter_context(trainer.policy.reference_model()) if model == "reference" else None
                rolls.append(trainer.policy.rollout(prompts, torch.Generator().manual_seed(3), "sde", model=ref))
        torch.testing.assert_close(rolls[1].latents, rolls[0].latents, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rolls[1].log_probs, rolls[0].log_probs, rtol=1e-4, atol=1e-4)
        if model == "policy":
            policy_latents = rolls[0].latents
        else:
            assert (rolls[0].latents - policy_latents).abs().max() > 1e-3  # the adapters really were off
