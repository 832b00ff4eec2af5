"""The pretraining script (a few steps) and the committed, pretrained base model."""

import json
from dataclasses import asdict

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.torch import load_file

from flowalign import pretrain as pretrain_module
from flowalign import shapes
from flowalign.checkpoints import load_state
from flowalign.objectives import sample_sigmas
from flowalign.pretrain import PretrainConfig, pretrain, write_model_card
from flowalign.shapes_eval import evaluate, generate
from flowalign.tiny import (BASE_MODEL_DIR, EVAL_CFG, EVAL_STEPS, MAX_SEQUENCE_LENGTH, build_tiny_sd3_pipeline,
                            load_base_pipeline)


def _transformer_weights(folder):
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def test_pretrain_a_few_steps_writes_a_stock_pipeline_and_resumes(tmp_path, monkeypatch):
    cfg = PretrainConfig(out=str(tmp_path / "model"), checkpoint=str(tmp_path / "ckpt.pt"), dataset_size=64,
                         max_steps=3, batch_size=8, minutes=10, eval_prompts=0, ema_decay=0.5)
    out = pretrain(cfg)
    log = json.loads((out / "training_log.json").read_text())
    assert log["steps"] == 3 and log["config"]["seed"] == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    init = build_tiny_sd3_pipeline(seed=0).transformer
    assert not torch.equal(pipe.transformer.proj_out.weight, init.proj_out.weight)  # it trained
    # The VAE normalisation was measured on the data: unit variance latents.
    assert pipe.vae.config.shift_factor == pytest.approx(log["latent_shift"])
    assert 1.0 < pipe.vae.config.scaling_factor < 5.0
    after_3 = _transformer_weights(out)
    assert load_state(cfg.checkpoint)["step"] == 3  # the checkpoint loads with weights_only=True

    # Resume continues from the checkpoint rather than starting over: it runs the 2 remaining steps
    # (one noise-level draw each) and ends where an uninterrupted 5-step run ends.
    draws = []
    monkeypatch.setattr(pretrain_module, "sample_sigmas", lambda *a, **k: draws.append(1) or sample_sigmas(*a, **k))
    cfg.max_steps, cfg.resume = 5, True
    log = json.loads((pretrain(cfg) / "training_log.json").read_text())
    assert log["steps"] == 5 and len(draws) == 2
    resumed = _transformer_weights(out)
    whole = _transformer_weights(pretrain(PretrainConfig(**{**asdict(cfg), "resume": False, "out": str(tmp_path / "whole"),
                                                           "checkpoint": str(tmp_path / "whole.pt")})))
    assert len(draws) == 7  # the uninterrupted run: 5 steps
    assert all(torch.equal(resumed[k], whole[k]) for k in whole), "the resumed run differs from the uninterrupted one"
    assert not torch.equal(resumed["proj_out.weight"], after_3["proj_out.weight"])  # and it did train on


def test_write_model_card_reports_the_training_log_and_the_evaluation(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "training_log.json").write_text(json.dumps({
        "config": {"seed": 4, "lr": 0.002, "batch_size": 64, "out": "x"}, "steps": 1234, "train_seconds": 600.0,
        "latent_shift": 0.25, "latent_scale": 2.5}))
    result = {"n_prompts": 6, "seed": 1, "steps": 28, "cfg": 2.0,
              "families": {"single_object": {"n": 6, "all_satisfied": 0.5, "fraction": 0.75}},
              "overall": {"n": 6, "all_satisfied": 0.5, "fraction": 0.75}}
    path = write_model_card(folder, result, command="flowalign pretrain --seed 4")
    text = path.read_text()
    assert path == folder / "README.md"
    assert "1234 steps in\n  10.0 minutes, seed 4" in text and "latent shift 0.2500" in text
    assert "- Command: `flowalign pretrain --seed 4`" in text
    assert "`flowalign eval --n-prompts 6 --seed 1 --steps 28 --cfg 2.0`" in text
    assert "| single_object | 6 | 50.0% | 75.0% |" in text and "| **all** | 6 | 50.0% | 75.0% |" in text
    assert json.loads((folder / "eval.json").read_text()) == result


def _single_object_sample(pipe, card):
    single = [p for p in shapes.all_prompts() if shapes.family_of(p) == "single_object"]
    prompts = single * 8  # 24 images: every single-object prompt, 8 seeds
    images = generate(pipe, prompts, seed=123, steps=card["steps"], cfg=card["cfg"], progress=False)
    return prompts, images


def test_committed_base_model_loads_with_stock_diffusers():
    assert (BASE_MODEL_DIR / "model_index.json").exists(), "the embedded base model is missing"
    stock = StableDiffusion3Pipeline.from_pretrained(BASE_MODEL_DIR, text_encoder_3=None, tokenizer_3=None)
    stock.set_progress_bar_config(disable=True)
    ours = load_base_pipeline()
    assert type(ours) is StableDiffusion3Pipeline
    card = json.loads((BASE_MODEL_DIR / "eval.json").read_text())
    prompts = ["a photo of a circle", "a photo of a red square"]
    images = generate(ours, prompts, seed=123, steps=card["steps"], cfg=card["cfg"], progress=False)
    again = stock(prompts, num_inference_steps=card["steps"], guidance_scale=card["cfg"], output_type="pt",
                  generator=[torch.Generator().manual_seed(123 * 1_000_003 + i) for i in range(2)],
                  max_sequence_length=MAX_SEQUENCE_LENGTH).images
    torch.testing.assert_close(again, images, atol=1e-5, rtol=0)
    # It is a trained model: its images satisfy more prompt constraints than those of the same
    # architecture at its random initialisation.
    prompts, images = _single_object_sample(ours, card)
    random_init = build_tiny_sd3_pipeline(seed=0, vae_shift=ours.vae.config.shift_factor,
                                          vae_scale=ours.vae.config.scaling_factor)
    _, untrained = _single_object_sample(random_init, card)
    trained_fraction = shapes.verify_batch(images, prompts)[0].mean().item()
    untrained_fraction = shapes.verify_batch(untrained, prompts)[0].mean().item()
    assert trained_fraction > untrained_fraction + 0.05, (trained_fraction, untrained_fraction)


@pytest.mark.slow
@pytest.mark.committed
def test_committed_base_model_reproduces_its_card_and_meets_the_bar():
    """The model card's evaluation, re-run (300 held-out prompts, ~1 min on 2 cores)."""
    card = json.loads((BASE_MODEL_DIR / "eval.json").read_text())
    result = evaluate(load_base_pipeline(), n_prompts=card["n_prompts"], seed=card["seed"], steps=card["steps"],
                      cfg=card["cfg"], progress=False)
    for family, r in card["families"].items():  # at most one image of 50 may flip on another CPU's float order
        assert abs(result["families"][family]["all_satisfied"] - r["all_satisfied"]) <= 0.021, family
    assert result["families"]["single_object"]["all_satisfied"] >= 0.8
    assert 0.2 <= result["overall"]["all_satisfied"] <= 0.7
    assert (card["steps"], card["cfg"]) == (EVAL_STEPS, EVAL_CFG)  # the card's settings are the package defaults


@pytest.mark.committed
def test_model_card_matches_its_evaluation():
    card = json.loads((BASE_MODEL_DIR / "eval.json").read_text())
    text = (BASE_MODEL_DIR / "README.md").read_text()
    assert f"flowalign eval --n-prompts {card['n_prompts']} --seed {card['seed']}" in text
    for family, r in card["families"].items():
        assert f"| {family} | {r['n']} | {100 * r['all_satisfied']:.1f}% |" in text


@pytest.mark.committed
def test_model_card_reports_headroom():
    card = json.loads((BASE_MODEL_DIR / "eval.json").read_text())
    assert card["families"]["single_object"]["all_satisfied"] >= 0.8
    assert 0.2 <= card["overall"]["all_satisfied"] <= 0.7
