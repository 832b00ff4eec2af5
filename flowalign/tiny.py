"""The tiny SD3 world: real diffusers components at toy size, built offline.

Everything here is a stock diffusers / transformers object, only small:

- ``clip_tokenizer``: the real CLIP BPE tokenizer (49,408 tokens, ``<|startoftext|>`` = 49406,
  ``<|endoftext|>`` = 49407), built from the vocabulary file that ``open_clip_torch`` ships.
- ``build_tiny_sd3_pipeline``: a ``StableDiffusion3Pipeline`` with an ``SD3Transformer2DModel``
  (patch 4 on 3x32x32 latents = 64 image tokens), two ``CLIPTextModelWithProjection`` encoders,
  no T5, ``FlowMatchEulerDiscreteScheduler`` (shift 3.0, as SD3) and a *lossless*
  ``AutoencoderKL`` (see ``build_lossless_vae``).
- ``encode_prompts``: prompt embeddings exactly as the stock pipeline computes them, in chunks.
- ``load_base_pipeline``: the embedded base model, pretrained on the shapes world by
  ``flowalign pretrain`` and shipped inside the package (``flowalign/assets/tiny-sd3-shapes``).
- (the evaluation of a model on the shapes world, ``flowalign eval``, is ``flowalign.shapes_eval``)

Two facts to know when calling the tiny pipeline with stock diffusers:

1. Always pass ``max_sequence_length=MAX_SEQUENCE_LENGTH`` (1). Without T5 the stock pipeline
   still pads the prompt with ``max_sequence_length`` (default 256) zero "T5" tokens; the tiny
   model was trained with one.
2. A folder saved without T5 loads with stock diffusers as
   ``StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)``;
   ``load_base_pipeline`` does that for you.

Example::

    from flowalign.tiny import load_base_pipeline, EVAL_CFG, EVAL_STEPS, MAX_SEQUENCE_LENGTH
    pipe = load_base_pipeline()
    image = pipe("a photo of a red circle", num_inference_steps=EVAL_STEPS, guidance_scale=EVAL_CFG,
                 max_sequence_length=MAX_SEQUENCE_LENGTH).images[0]
"""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer


MAX_SEQUENCE_LENGTH = 1
"""Number of (zero) T5 tokens the tiny model is trained and sampled with."""

BASE_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "tiny-sd3-shapes"
"""Where the embedded pretrained base model lives inside the installed package."""

# The sampling settings of the base model card (and the defaults of `generate` / `evaluate` / `flowalign eval`):
# Euler steps and classifier-free guidance. The tiny model is best at low guidance (CFG 2: 82% single-object;
# CFG 5 over-suppresses objects, since the unconditional branch expects more of them than one-object prompts).
EVAL_STEPS = 28
EVAL_CFG = 2.0

SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-unicode table of GPT-2 / CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _clip_vocab_dir() -> str:
    """Write CLIP's ``vocab.json`` / ``merges.txt`` from open_clip's BPE file (cached per process).

    The construction is the one of OpenAI CLIP: 256 byte symbols, the same with ``</w>``, one
    token per merge (the first 48,894 merges), then the two special tokens (49406, 49407).
    """
    import open_clip  # heavy (torchvision), and only its BPE vocabulary file is needed, once per process

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not bpe_path.exists():
        raise FileNotFoundError(
            f"open_clip's BPE vocabulary was not found at {bpe_path}; reinstall open_clip_torch."
        )
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += [SOT_TOKEN, EOT_TOKEN]
    out = Path(tempfile.mkdtemp(prefix="flowalign-clip-bpe-"))
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return str(out)


def clip_tokenizer(model_max_length: int = 77):
    """The real CLIP BPE tokenizer (``transformers.CLIPTokenizer``), built offline.

    Token ids match OpenAI CLIP / open_clip exactly; ``model_max_length`` sets the padded length
    (77 in CLIP; the embedded tiny model uses 16, see ``TinySD3Config.text_max_length``).

    >>> tok = clip_tokenizer()
    >>> tok("a red circle").input_ids[0], tok.eos_token_id
    (49406, 49407)
    """
    # from_pretrained on a local folder works across transformers 4.x (slow) and 5.x (fast).
    return CLIPTokenizer.from_pretrained(
        _clip_vocab_dir(),
        model_max_length=model_max_length,
        bos_token=SOT_TOKEN,
        eos_token=EOT_TOKEN,
        unk_token=EOT_TOKEN,
        pad_token=EOT_TOKEN,
    )


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------
@dataclass
class TinySD3Config:
    """Sizes of the tiny SD3 world. Defaults are those of the embedded base model."""

    image_size: int = 32  # pixels; the lossless VAE keeps 3x32x32 latents
    patch_size: int = 4  # 32/4 = 8x8 = 64 image tokens
    num_layers: int = 4  # SD3 joint transformer blocks
    num_attention_heads: int = 4
    attention_head_dim: int = 32  # width 128
    text_hidden_size: int = 64  # each of the two CLIP text encoders
    text_layers: int = 2
    text_heads: int = 2
    text_max_length: int = 16  # CLIP pads to 77; 16 covers every shapes prompt and is ~1.7x faster
    vae_shift: float = 0.0  # latents = (x - shift) * scale, x = 2 * image - 1
    vae_scale: float = 1.0
    scheduler_shift: float = 3.0  # as SD3
    extra: dict = field(default_factory=dict)


def _tiny_clip_text_encoder(cfg: TinySD3Config):
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.text_hidden_size * 4,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=77,
        projection_dim=cfg.text_hidden_size,
        hidden_act="gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModelWithProjection(config)


def build_lossless_vae(shift: float = 0.0, scale: float = 1.0, big: float = 1000.0, offset: float = 20.0):
    """A stock ``AutoencoderKL`` whose weights are set by hand so that decode(encode(x)) == x.

    Why: a small *trained* VAE loses the thin details the verifier needs (triangles come back
    round); this one is exact to ~1e-6 and costs nothing to train. The latent is the image itself
    (3x32x32, no downsampling: one block), normalised by ``shift`` / ``scale``.

    How (per colour channel c, 12 hidden channels in 3 groups of 4):

    - every ResNet block has ``conv2 = 0`` (so it is the identity) and the mid block has no
      attention;
    - ``conv_in`` writes the group ``[x, -x, big, -big]``. The only non-linear layers left are the
      final GroupNorm + SiLU. The group's mean is 0 and its std ``sqrt((mean(x^2) + big^2) / 2)``
      is ``big / sqrt(2)`` to a relative 5e-7, so GroupNorm with ``gamma = big / sqrt(2)`` returns
      ``x`` (and ``-x``); ``beta = offset`` moves them where SiLU is the identity
      (``SiLU(u) = u`` to 3e-7 for ``u >= 18``);
    - ``conv_out`` takes ``(SiLU(x + offset) - SiLU(-x + offset)) / 2 = x``.

    The encoder's log-variance is -30 (std 3e-7), so sampling the latent distribution is exact too.
    """
    width = 12
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        block_out_channels=(width,),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=3,
        sample_size=32,
        scaling_factor=float(scale),
        shift_factor=float(shift),
        mid_block_add_attention=False,
        force_upcast=False,
    )
    gain = big / math.sqrt(2.0)
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for module in vae.modules():  # norms inside the (zeroed) ResNets: keep them well defined
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(1.0)

        def write_group(conv: torch.nn.Conv2d) -> None:
            # conv_in: channel c -> [x_c, -x_c, big, -big] (centre tap of the 3x3 kernel)
            for c in range(3):
                conv.weight[4 * c + 0, c, 1, 1] = 1.0
                conv.weight[4 * c + 1, c, 1, 1] = -1.0
                conv.bias[4 * c + 2] = big
                conv.bias[4 * c + 3] = -big

        def unit_gain_norm(norm: torch.nn.GroupNorm) -> None:
            # GroupNorm(group) * gamma + beta == [x + offset, -x + offset, *, *]
            for c in range(3):
                norm.weight[4 * c + 0] = gain
                norm.weight[4 * c + 1] = gain
                norm.weight[4 * c + 2] = 0.0
                norm.weight[4 * c + 3] = 0.0
                norm.bias[4 * c + 0] = offset
                norm.bias[4 * c + 1] = offset

        def read_group(conv: torch.nn.Conv2d) -> None:
            # conv_out: (SiLU(x + offset) - SiLU(-x + offset)) / 2 == x
            for c in range(3):
                conv.weight[c, 4 * c + 0, 1, 1] = 0.5
                conv.weight[c, 4 * c + 1, 1, 1] = -0.5

        enc, dec = vae.encoder, vae.decoder
        write_group(enc.conv_in)
        unit_gain_norm(enc.conv_norm_out)
        read_group(enc.conv_out)  # channels 0..2: mean; 3..5: log-variance
        enc.conv_out.bias[3:] = -30.0
        write_group(dec.conv_in)
        unit_gain_norm(dec.conv_norm_out)
        read_group(dec.conv_out)
        if vae.quant_conv is not None:
            vae.quant_conv.weight[:, :, 0, 0] = torch.eye(6)
        if vae.post_quant_conv is not None:
            vae.post_quant_conv.weight[:, :, 0, 0] = torch.eye(3)
    return vae


def build_tiny_sd3_pipeline(config: TinySD3Config | None = None, seed: int = 0, **overrides):
    """A tiny, random-weight, fp32 ``StableDiffusion3Pipeline`` built offline.

    ``overrides`` replace fields of ``TinySD3Config`` (e.g. ``num_layers=2``). Deterministic in
    ``seed``. Call it with ``max_sequence_length=MAX_SEQUENCE_LENGTH``.

    >>> pipe = build_tiny_sd3_pipeline(num_layers=1)
    >>> pipe.transformer.config.patch_size, pipe.vae_scale_factor
    (4, 1)
    """
    cfg = config or TinySD3Config()
    if overrides:
        unknown = set(overrides) - set(asdict(cfg))
        if unknown:
            raise TypeError(f"Unknown TinySD3Config field(s) {sorted(unknown)}; valid: {sorted(asdict(cfg))}")
        cfg = TinySD3Config(**{**asdict(cfg), **overrides})
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size={cfg.image_size} must be a multiple of patch_size={cfg.patch_size}")

    width = cfg.num_attention_heads * cfg.attention_head_dim
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_channels=3,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=2 * cfg.text_hidden_size,  # the two CLIP hidden states, concatenated
        caption_projection_dim=width,
        pooled_projection_dim=2 * cfg.text_hidden_size,  # the two CLIP projections, concatenated
        out_channels=3,
        pos_embed_max_size=cfg.image_size // cfg.patch_size,
    )
    text_encoder = _tiny_clip_text_encoder(cfg)
    text_encoder_2 = _tiny_clip_text_encoder(cfg)
    tokenizer = clip_tokenizer(cfg.text_max_length)
    tokenizer_2 = clip_tokenizer(cfg.text_max_length)
    vae = build_lossless_vae(shift=cfg.vae_shift, scale=cfg.vae_scale)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.scheduler_shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a (tiny or real) SD3 pipeline folder or hub id saved without T5, with stock diffusers."""
    kwargs = {}
    model_index = Path(path) / "model_index.json"
    if model_index.exists():
        index = json.loads(model_index.read_text())
        if index.get("text_encoder_3", [None])[0] is None:
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
    # the dtype at load time (diffusers then keeps its float32 modules and does not warn about a later cast);
    # diffusers renamed torch_dtype to dtype and deprecates the old name
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (diffusers with `dtype`)

        dtype_key = "dtype"
    except ImportError:
        dtype_key = "torch_dtype"
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path), **{dtype_key: dtype}, **kwargs)
    return pipe.to(device)


def load_base_pipeline(
    path: str | os.PathLike | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
):
    """The embedded pretrained tiny base model (a stock ``StableDiffusion3Pipeline``).

    >>> pipe = load_base_pipeline()  # doctest: +SKIP
    """
    path = Path(path) if path is not None else BASE_MODEL_DIR
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"No pipeline at {path}. The embedded base model is created by "
            "`flowalign pretrain --out flowalign/assets/tiny-sd3-shapes`; pass `path=` for another folder."
        )
    pipe = load_pipeline(path, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], batch_size: int = 256, max_sequence_length: int | None = None,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt embeddings exactly as the stock pipeline computes them, in chunks of ``batch_size``.

    ``max_sequence_length`` is the number of T5 tokens (default: the tiny model's one zero token,
    ``MAX_SEQUENCE_LENGTH``). Returns ``(prompt_embeds [N, L, D], pooled_prompt_embeds [N, P])``.

    >>> embeds, pooled = encode_prompts(build_tiny_sd3_pipeline(num_layers=1), ["a red circle", ""])
    >>> embeds.shape[0], pooled.shape
    (2, torch.Size([2, 128]))
    """
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch_size):
        pe, _, pp, _ = pipe.encode_prompt(
            prompt=prompts[i : i + batch_size],
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length or MAX_SEQUENCE_LENGTH,
        )
        embeds.append(pe)
        pooled.append(pp)
    return torch.cat(embeds), torch.cat(pooled)
