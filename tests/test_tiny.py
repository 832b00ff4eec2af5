"""The tiny SD3 world: tokenizer, lossless VAE, factory and stock save/load round trip."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from flowalign.tiny import (
    MAX_SEQUENCE_LENGTH,
    build_lossless_vae,
    build_tiny_sd3_pipeline,
    clip_tokenizer,
    encode_prompts,
    load_pipeline,
)


@pytest.mark.parametrize(
    "text",
    ["a photo of a red circle", "Two TRIANGLES above, a blue square!", "héllo wörld 123 to the left of"],
)
def test_clip_tokenizer_matches_open_clip(text):
    import open_clip

    ours = clip_tokenizer()(text, padding="max_length", max_length=77).input_ids
    ref = open_clip.get_tokenizer("ViT-B-32")([text])[0].tolist()
    n = ref.index(49407) + 1  # open_clip pads with 0 after <|endoftext|>, SD3's CLIP tokenizers with 49407
    assert ours[:n] == ref[:n]
    assert ours[0] == 49406 and ours[n - 1] == 49407
    assert all(t == 49407 for t in ours[n:])


def test_clip_tokenizer_specials_and_length():
    tok = clip_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, tok.model_max_length, len(tok)) == (49406, 49407, 77, 49408)
    assert clip_tokenizer(16)("a photo of a red circle to the left of a blue square",
                              padding="max_length", truncation=True).input_ids.__len__() == 16


def test_lossless_vae_roundtrip():
    vae = build_lossless_vae(shift=0.6, scale=1.7)
    x = torch.rand(3, 3, 32, 32) * 2.4 - 1.2  # a bit beyond [-1, 1] too
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(0))
        y = vae.decode(z).sample
    assert torch.allclose(z, x, atol=2e-5)  # the latent is the image, before normalisation
    assert torch.allclose(y, x, atol=2e-5)
    # Through uint8 quantisation the round trip is exact for every pixel.
    img = torch.randint(0, 256, (2, 3, 32, 32)).float() / 255
    with torch.no_grad():
        back = vae.decode(vae.encode(img * 2 - 1).latent_dist.mode()).sample
    assert torch.equal(((back / 2 + 0.5) * 255).round(), img * 255)


def test_factory_is_deterministic_and_configurable():
    a = build_tiny_sd3_pipeline(seed=3, num_layers=1)
    b = build_tiny_sd3_pipeline(seed=3, num_layers=1)
    c = build_tiny_sd3_pipeline(seed=4, num_layers=1)
    wa, wb, wc = (p.transformer.proj_out.weight for p in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.transformer.config.num_layers == 1 and a.vae_scale_factor == 1
    assert a.text_encoder_3 is None and a.tokenizer.model_max_length == 16
    with pytest.raises(TypeError, match="num_layerz"):
        build_tiny_sd3_pipeline(num_layerz=2)


def _images(pipe, seed=0):
    return pipe(
        ["a photo of a red circle", "a photo of two squares"],
        num_inference_steps=4,
        guidance_scale=4.5,
        generator=torch.Generator().manual_seed(seed),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        output_type="np",
    ).images


def test_save_pretrained_then_stock_from_pretrained_is_bit_exact(tmp_path):
    pipe = build_tiny_sd3_pipeline(seed=0, num_layers=2)
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None]
    # Stock diffusers, no flowalign code in the loading path:
    stock = StableDiffusion3Pipeline.from_pretrained(tmp_path, text_encoder_3=None, tokenizer_3=None)
    stock.set_progress_bar_config(disable=True)
    ours = load_pipeline(tmp_path)
    ours.set_progress_bar_config(disable=True)
    reference = _images(pipe)
    assert reference.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(_images(stock), reference)
    np.testing.assert_array_equal(_images(ours), reference)
    assert not np.array_equal(_images(stock, seed=1), reference)  # the seed matters


def test_encode_prompts_matches_the_stock_pipeline_in_any_chunking():
    pipe = build_tiny_sd3_pipeline(seed=0, num_layers=1)
    prompts = ["a photo of a red circle", "", "two blue squares", "a photo of a triangle"]
    embeds, pooled = encode_prompts(pipe, prompts)
    stock_embeds, _, stock_pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                          max_sequence_length=MAX_SEQUENCE_LENGTH)
    assert embeds.shape == (4, 16 + MAX_SEQUENCE_LENGTH, 128) and pooled.shape == (4, 128)  # CLIP tokens + 1 T5 token
    torch.testing.assert_close(embeds, stock_embeds, rtol=0, atol=0)
    torch.testing.assert_close(pooled, stock_pooled, rtol=0, atol=0)
    chunked = encode_prompts(pipe, prompts, batch_size=3)
    torch.testing.assert_close(chunked[0], embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked[1], pooled, rtol=1e-6, atol=1e-6)
    assert encode_prompts(pipe, prompts[:1], max_sequence_length=4)[0].shape == (1, 16 + 4, 128)
    assert not torch.equal(embeds[0], embeds[1])  # the prompt matters
