"""Model-based rewards loaded from tiny checkpoints saved in the official layouts.

Each reward is checked against a reference built the way the official code computes it (library
processors on PIL images, the official module layouts), plus the shared contract: shapes, dtypes,
chunking, gradients, and the loading errors.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flowalign.rewards import CheckpointNotFoundError
from PIL import Image

from flowalign import rewards

AESTHETIC_DIR = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / "aesthetic"
AESTHETIC_FILE = AESTHETIC_DIR / "sac+logos+ava1-l14-linearMSE.pth"
MODEL_REWARDS = ["pickscore", "hpsv2.1", "imagereward", "aesthetic", "clipscore"]
PROMPTS = [
    "a photo of a red circle",
    "a photo of three triangles",
    "a photo of a red circle",
    "a photo of a blue square",
]


@pytest.fixture(scope="module")
def tiny(tiny_reward_checkpoints):
    """{name: load kwargs} of tiny official-layout checkpoints (the aesthetic one with a random head)."""
    return tiny_reward_checkpoints()


@pytest.fixture(scope="module")
def loaded(tiny):
    return {name: rewards.load(name, **kwargs) for name, kwargs in tiny.items()}


def _pil_images(n: int, size=(48, 40), seed: int = 0) -> list[Image.Image]:
    """Smooth random images (bilinear upsampling of noise), closer to photos than white noise."""
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)).resize(size, Image.BILINEAR) for _ in range(n)
    ]


# -- the shared contract, for every model-based reward ---------------------------------------------
@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_scores_shape_dtype_chunking_and_pil(name, loaded, as_tensor):
    reward = loaded[name]
    images = as_tensor(_pil_images(5))
    prompts = PROMPTS + ["a photo of two circles"]
    reward.batch_size = None
    whole = reward(images, prompts)
    assert whole.shape == (5,) and whole.dtype == torch.float32 and torch.isfinite(whole).all()
    assert whole.std() > 0  # the tiny models do tell images apart
    reward.batch_size = 2
    torch.testing.assert_close(reward(images, prompts), whole, atol=1e-5, rtol=1e-5)
    assert reward(images.double(), prompts).dtype == torch.float64
    torch.testing.assert_close(reward(_pil_images(5), prompts), whole)  # PIL in, same scores
    reward.batch_size = 32


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_differentiable_rewards_pass_gradients_to_images_only(name, loaded, as_tensor):
    reward = loaded[name]
    assert reward.differentiable
    images = as_tensor(_pil_images(3)).requires_grad_(True)
    reward(images, PROMPTS[:3]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in reward.parameters())  # frozen weights


@pytest.mark.parametrize("name", ["pickscore", "hpsv2.1", "imagereward", "clipscore"])
def test_prompt_aware_rewards_depend_on_the_prompt(name, loaded, as_tensor):
    images = as_tensor(_pil_images(1)).expand(4, -1, -1, -1)
    scores = loaded[name](images, PROMPTS)
    assert scores[0] == pytest.approx(scores[2].item(), abs=1e-6)  # same image, same prompt
    assert len({round(s, 5) for s in scores.tolist()}) == 3


# -- references: the official computations, with the libraries' own processors ---------------------
# Images already at the model's input size need no resize: scores must match to float precision.
# Resized images differ by PIL's uint8 rounding in the library processors (at most ~1/255 a pixel,
# see test_rewards_preprocess.py); measured, that moves the tiny models' scores by 0.3-0.8% of their
# spread across images, so we allow 5% of that spread.
RESIZED_FRACTION_OF_SPREAD = 0.05


def _reference_pickscore(kwargs, images, prompts):
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(kwargs["processor"])
    model = AutoModel.from_pretrained(kwargs["model"]).eval()
    with torch.no_grad():  # the PickScore model card's snippet
        image_inputs = processor(images=images, return_tensors="pt")
        text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        image_embs = model.get_image_features(**image_inputs)
        text_embs = model.get_text_features(**text_inputs)
        image_embs = getattr(image_embs, "pooler_output", image_embs)  # transformers 5 returns an output object
        text_embs = getattr(text_embs, "pooler_output", text_embs)
        image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
        text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * (text_embs @ image_embs.T).diagonal()


def _reference_open_clip(architecture, state_dict, images, prompts, resize_mode):
    import open_clip

    model = open_clip.create_model(architecture, load_weights=False).eval()
    model.load_state_dict(state_dict)
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False, resize_mode=resize_mode)
    tokens = open_clip.get_tokenizer(architecture)(prompts)
    with torch.no_grad():
        image_features, text_features, _ = model(torch.stack([preprocess(im) for im in images]), tokens)
    return (image_features * text_features).sum(-1)


def _reference_hps(kwargs, images, prompts):
    state = torch.load(Path(kwargs["checkpoint"]) / "HPS_v2.1_compressed.pt", weights_only=True)["state_dict"]
    # hpsv2's preprocess_val: longest side to the input size, then pad (resize_longest_max=True)
    return _reference_open_clip(kwargs["architecture"], state, images, prompts, "longest")


def _reference_clipscore(kwargs, images, prompts):
    from safetensors.torch import load_file

    state = load_file(Path(kwargs["model"].removeprefix("local-dir:")) / "open_clip_model.safetensors")
    return 2.5 * _reference_open_clip(kwargs["model"], state, images, prompts, "shortest").clamp(min=0)


def _reference_aesthetic(kwargs, images, prompts):
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(kwargs["clip"])
    model = CLIPModel.from_pretrained(kwargs["clip"]).eval()
    head = torch.nn.Sequential(  # improved-aesthetic-predictor's MLP, written out
        torch.nn.Linear(768, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()
    head.load_state_dict(
        {k.removeprefix("layers."): v for k, v in torch.load(kwargs["head"], weights_only=True).items()}
    )
    with torch.no_grad():
        features = model.get_image_features(**processor(images=images, return_tensors="pt"))
        features = getattr(features, "pooler_output", features)
        return head(features / features.norm(dim=-1, keepdim=True))[:, 0]


def _reference_image_reward(kwargs, images, prompts):
    """ImageReward.score as the official code runs it: BLIP ViT (timm layout) -> med BERT -> MLP."""
    from flowalign.rewards.image_reward import text_config_from_med_config
    from flowalign.rewards.testing import tiny_blip_vit
    from torchvision import transforms
    from transformers import AutoTokenizer, BlipTextModel

    root = Path(kwargs["checkpoint"])
    state = torch.load(root / "ImageReward.pt", weights_only=True)
    med = json.loads((root / "med_config.json").read_text())
    vit = tiny_blip_vit(seed=123)  # same architecture, other weights: overwritten by the checkpoint below
    vit.load_state_dict(
        {k[len("blip.visual_encoder.") :]: v for k, v in state.items() if k.startswith("blip.visual_encoder.")}
    )
    text = BlipTextModel(text_config_from_med_config(med, vit.embed_dim), add_pooling_layer=False).eval()
    text.load_state_dict(
        {
            k[len("blip.text_encoder.") :]: v
            for k, v in state.items()
            if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")
        }
    )
    mlp = torch.nn.Sequential(
        torch.nn.Linear(med["hidden_size"], 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()
    mlp.load_state_dict({k[len("mlp.layers.") :]: v for k, v in state.items() if k.startswith("mlp.")})
    tokenizer = AutoTokenizer.from_pretrained(kwargs["tokenizer"])
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    n_px = vit.patch_embed.img_size[0]
    preprocess = transforms.Compose(
        [  # ImageReward's _transform(n_px)
            transforms.Resize(n_px, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(n_px),
            transforms.ToTensor(),
            transforms.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
        ]
    )
    scores = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            text_input = tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            image_embeds = vit.forward_features(preprocess(image)[None])
            image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
            out = text(
                text_input.input_ids,
                attention_mask=text_input.attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
                is_decoder=False,
            )
            reward = mlp(out.last_hidden_state[:, 0, :])
            scores.append(((reward - 0.16717362830052426) / 1.0333394966054072)[0, 0])
    return torch.stack(scores)


REFERENCES = {
    "pickscore": _reference_pickscore,
    "hpsv2.1": _reference_hps,
    "clipscore": _reference_clipscore,
    "aesthetic": _reference_aesthetic,
    "imagereward": _reference_image_reward,
}


@pytest.mark.parametrize("name", MODEL_REWARDS)
def test_scores_match_the_official_computation(name, tiny, loaded):
    prompts = PROMPTS[:3]
    exact = _pil_images(3, size=(32, 32), seed=1)  # already the tiny models' input size: no resize
    torch.testing.assert_close(
        loaded[name](exact, prompts), REFERENCES[name](tiny[name], exact, prompts), atol=1e-5, rtol=1e-5
    )
    resized = _pil_images(4, size=(56, 44), seed=2) + _pil_images(2, size=(33, 90), seed=3)  # resize + crop/pad
    prompts = PROMPTS + PROMPTS[:2]
    expected = REFERENCES[name](tiny[name], resized, prompts)
    difference = (loaded[name](resized, prompts) - expected).abs().max()
    assert difference <= RESIZED_FRACTION_OF_SPREAD * expected.std(), (difference, expected.std())


# -- the real LAION aesthetic head -----------------------------------------------------------------
needs_real_head = pytest.mark.skipif(not AESTHETIC_FILE.is_file(), reason=f"{AESTHETIC_DIR} is absent")


@needs_real_head
def test_real_aesthetic_head_keys_shapes_and_forward():
    from flowalign.rewards.aesthetic import AestheticHead, load_head_state_dict

    digest = hashlib.sha256(AESTHETIC_FILE.read_bytes()).hexdigest()
    readme = (AESTHETIC_DIR / "README.md").read_text()
    assert digest in readme  # the file is the one the README documents
    state = load_head_state_dict(str(AESTHETIC_FILE))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes == {
        "layers.0.weight": (1024, 768),
        "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024),
        "layers.2.bias": (128,),
        "layers.4.weight": (64, 128),
        "layers.4.bias": (64,),
        "layers.6.weight": (16, 64),
        "layers.6.bias": (16,),
        "layers.7.weight": (1, 16),
        "layers.7.bias": (1,),
    }
    head = AestheticHead.from_file(str(AESTHETIC_FILE))
    torch.manual_seed(0)
    embedding = torch.nn.functional.normalize(torch.randn(2, 768), dim=-1)  # a known unit-norm embedding
    expected = embedding  # the official MLP by hand: five affine maps, no activations
    for key in ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7"):
        expected = expected @ state[f"{key}.weight"].T + state[f"{key}.bias"]
    with torch.no_grad():
        out = head(embedding)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        # no activations: the head is affine, f(x + y) - f(0) = (f(x) - f(0)) + (f(y) - f(0))
        zero = head(torch.zeros(1, 768))
        torch.testing.assert_close(
            head(embedding.sum(0, keepdim=True)) - zero, (out - zero).sum(0, keepdim=True), atol=1e-4, rtol=1e-4
        )


@needs_real_head
def test_aesthetic_reward_loads_the_real_head_through_the_public_path(tmp_path, as_tensor):
    from flowalign.rewards.aesthetic import AestheticHead
    from flowalign.rewards.testing import save_tiny_aesthetic

    kwargs = save_tiny_aesthetic(tmp_path, head=str(AESTHETIC_FILE))
    reward = rewards.load("aesthetic", **kwargs)
    real = AestheticHead.from_file(str(AESTHETIC_FILE))
    for mine, theirs in zip(reward.head.state_dict().values(), real.state_dict().values()):
        torch.testing.assert_close(mine, theirs)
    images = as_tensor(_pil_images(2, size=(32, 32)))
    with torch.no_grad():
        expected = real(reward.image_embeddings(images))[:, 0]
    torch.testing.assert_close(reward(images), expected)


# -- loading errors --------------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty cache, as on a machine without access to the Hub."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("pickscore", {"model": "flowalign-tests/no-such-pickscore"}),
        ("hpsv2.1", {"checkpoint": "flowalign-tests/no-such-hps"}),
        ("imagereward", {"checkpoint": "flowalign-tests/no-such-imagereward"}),
        ("aesthetic", {"head": "flowalign-tests/no-such-aesthetic"}),
        ("clipscore", {"model": "hf-hub:flowalign-tests/no-such-clip"}),
        ("clipscore", {"model": "ViT-B-32", "pretrained": "openai"}),  # an open_clip tag, hosted on the hub
    ],
)
def test_missing_hub_id_offline_says_how_to_pass_a_local_path(name, kwargs, offline):
    with pytest.raises(CheckpointNotFoundError) as err:
        rewards.load(name, **kwargs)
    message = str(err.value)
    source = kwargs.get("model", kwargs.get("checkpoint", kwargs.get("head")))
    expected = "timm/vit_base_patch32_clip_224.openai" if source == "ViT-B-32" else source.removeprefix("hf-hub:")
    assert f"'{expected}' is not a local path" in message
    assert f"hf download {expected} --local-dir DIR" in message and "then pass the local path" in message


def test_missing_local_paths_and_bad_checkpoints_are_clear_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="no file or folder at"):
        rewards.load("hpsv2.1", checkpoint=str(tmp_path / "nowhere" / "hps.pt"))
    with pytest.raises(FileNotFoundError, match="has no HPS_v2_compressed.pt"):
        rewards.load("hpsv2", checkpoint=tiny["hpsv2.1"]["checkpoint"])  # folder holds the v2.1 file only

    root = Path(tiny["imagereward"]["checkpoint"])
    state = torch.load(root / "ImageReward.pt", weights_only=True)
    del state["blip.visual_encoder.blocks.1.attn.qkv.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    torch.save(state, broken / "ImageReward.pt")
    (broken / "med_config.json").write_text((root / "med_config.json").read_text())
    with pytest.raises(
        ValueError, match=r"vision transformer architecture: missing \['encoder.layers.1.self_attn.qkv.weight'\]"
    ):
        rewards.load("imagereward", checkpoint=str(broken), tokenizer=tiny["imagereward"]["tokenizer"])

    bad_head = tmp_path / "head.pth"
    torch.save({"layers.0.weight": torch.zeros(1024, 768)}, bad_head)
    with pytest.raises(ValueError, match="keys differ from the LAION layout; missing"):
        rewards.load("aesthetic", head=str(bad_head), clip=tiny["aesthetic"]["clip"])
    with pytest.raises(ValueError, match="has 16 dimensions but the aesthetic head expects 768"):
        rewards.load(
            "aesthetic",
            head=tiny["aesthetic"]["head"],
            clip=tiny["pickscore"]["model"],
            processor=tiny["pickscore"]["processor"],
        )


def test_image_reward_loads_from_the_pt_file_path_and_reads_vision_shape(tiny):
    kwargs = dict(tiny["imagereward"])
    kwargs["checkpoint"] = str(Path(kwargs["checkpoint"]) / "ImageReward.pt")  # med_config.json beside it
    reward = rewards.load("imagereward", **kwargs)
    config = reward.vision.config
    assert (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.image_size,
        config.patch_size,
        config.layer_norm_eps,
    ) == (128, 2, 2, 32, 8, 1e-6)
