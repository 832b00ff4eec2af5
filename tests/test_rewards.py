"""The reward protocol: checks, chunking, PIL input, user callables, registry, specs, mixtures, JPEG, shapes, and the
credit-assignment task's rewards (redness, PNG compressibility, fixed z-scores, red_jpeg and its constants)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flowalign.rewards import FunctionReward, Mixture, Reward, as_reward, combine, zscore
from flowalign.rewards.credit import RED_JPEG_STATS
from flowalign.rewards.registry import parse_reward_spec
from PIL import Image

from flowalign import rewards, shapes


class Brightness(Reward):
    """Mean pixel value plus a prompt-length term (so prompts matter)."""

    name = "brightness"
    differentiable = True

    def __init__(self, batch_size=32):
        super().__init__(batch_size=batch_size)
        self.calls = []

    def score_chunk(self, images, prompts):
        self.calls.append(images.shape[0])
        return images.mean(dim=(1, 2, 3)) + torch.tensor([len(p) for p in prompts], device=images.device) / 100


def test_reward_scores_shape_dtype_and_values():
    images = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    prompts = ["a", "bb", "ccc", "", "e"]
    scores = Brightness()(images, prompts)
    assert scores.shape == (5,) and scores.dtype == torch.float64
    expected = images.mean(dim=(1, 2, 3)) + torch.tensor([1, 2, 3, 0, 1]) / 100
    torch.testing.assert_close(scores, expected)


def test_chunking_gives_the_same_scores_and_respects_batch_size():
    images, prompts = torch.rand(10, 3, 8, 8), [f"p{i}" for i in range(10)]
    reward = Brightness(batch_size=3)
    chunked = reward(images, prompts)
    assert reward.calls == [3, 3, 3, 1]
    reward.batch_size = None
    torch.testing.assert_close(chunked, reward(images, prompts))
    assert reward.calls[-1] == 10


def test_single_string_prompt_is_used_for_every_image():
    images = torch.rand(3, 3, 4, 4)
    torch.testing.assert_close(Brightness()(images, "abc"), Brightness()(images, ["abc"] * 3))


@pytest.mark.parametrize(
    "images, match",
    [
        (torch.rand(2, 3, 8, 8) * 2 - 1, r"\[0, 1\].*\(images \+ 1\) / 2"),
        (torch.rand(2, 3, 8, 8) * 255, r"values in \[.*255"),
        (torch.rand(2, 8, 8, 3), r"shape \[B, 3, H, W\]; got \(2, 8, 8, 3\).*channels last"),
        (torch.rand(3, 8, 8), r"got \(3, 8, 8\).*images\[None\]"),
        (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), r"float tensor.*uint8.*/ 255"),
        (torch.tensor([float("nan")]).expand(1, 3, 2, 2).clone(), r"NaN"),
    ],
)
def test_bad_images_raise_clear_errors(images, match):
    with pytest.raises(ValueError, match=match):
        Brightness()(images, ["x"] * images.shape[0])


def test_prompt_count_mismatch_and_missing_prompts():
    with pytest.raises(ValueError, match="got 2 prompts for 3 images"):
        Brightness()(torch.rand(3, 3, 4, 4), ["a", "b"])
    with pytest.raises(ValueError, match="prompts=None for 3 images"):
        Brightness()(torch.rand(3, 3, 4, 4), None)
    with pytest.raises(TypeError, match="prompt 1 is a int"):
        Brightness()(torch.rand(2, 3, 4, 4), ["a", 3])


def test_nan_output_is_an_error_naming_the_images():
    def half_nan(images, prompts):
        scores = images.mean(dim=(1, 2, 3))
        scores[1::2] = float("nan")
        return scores

    with pytest.raises(ValueError, match=r"half_nan returned NaN for 2 of 4 images \(indices \[1, 3\]\)"):
        as_reward(half_nan)(torch.rand(4, 3, 4, 4), ["p"] * 4)


def test_wrong_output_shape_is_an_error():
    reward = as_reward(lambda images, prompts: images.mean(dim=(2, 3)), name="per_channel")
    with pytest.raises(
        ValueError, match=r"per_channel: score_chunk must return a tensor of shape \(2,\); got \(2, 3\)"
    ):
        reward(torch.rand(2, 3, 4, 4), ["a", "b"])


def test_differentiable_rewards_pass_gradients_and_others_do_not_track_them():
    images = torch.rand(4, 3, 8, 8, requires_grad=True)
    scores = Brightness()(images, ["a"] * 4)
    scores.sum().backward()
    torch.testing.assert_close(images.grad, torch.full_like(images, 1 / (3 * 8 * 8)))

    plain = as_reward(lambda x, p: x.mean(dim=(1, 2, 3)))
    assert not plain.differentiable
    assert not plain(torch.rand(2, 3, 4, 4, requires_grad=True), ["a", "b"]).requires_grad
    opted_in = as_reward(lambda x, p: x.mean(dim=(1, 2, 3)), differentiable=True)
    assert opted_in(torch.rand(2, 3, 4, 4, requires_grad=True), ["a", "b"]).requires_grad


def test_pil_images_and_mixed_sizes_match_tensor_scores():
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(8, 8), (6, 10), (8, 8)]]
    pil = [Image.fromarray(a) for a in arrays]
    prompts = ["a", "bb", "ccc"]
    scores = Brightness()(pil, prompts)
    expected = torch.stack(
        [
            Brightness()(torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255, [p])[0]
            for a, p in zip(arrays, prompts)
        ]
    )
    torch.testing.assert_close(scores, expected)
    with pytest.raises(TypeError, match="stack them"):
        Brightness()([torch.rand(3, 4, 4)], ["a"])


def test_empty_batch():
    assert Brightness()(torch.rand(0, 3, 4, 4), []).shape == (0,)


def test_weights_follow_the_images_device_and_scores_their_dtype():
    class Scaled(Reward):
        name = "scaled"

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(2.0))

        def score_chunk(self, images, prompts):
            assert images.device == self.scale.device
            return self.scale * images.mean(dim=(1, 2, 3))

    reward = Scaled()
    scores = reward(torch.rand(2, 3, 4, 4, dtype=torch.float16), ["a", "b"])
    assert scores.dtype == torch.float16
    if torch.cuda.is_available():  # exercised on GPU machines
        images = torch.rand(2, 3, 4, 4, device="cuda")
        assert reward(images, ["a", "b"]).device.type == "cuda" and reward.device.type == "cuda"


def test_user_callables_accept_numpy_lists_and_column_outputs():
    as_list = as_reward(lambda x, p: [float(v) for v in x.mean(dim=(1, 2, 3))], name="as_list")
    column = as_reward(lambda x, p: x.mean(dim=(1, 2, 3))[:, None])
    images = torch.rand(3, 3, 4, 4)
    torch.testing.assert_close(as_list(images, ["a"] * 3), images.mean(dim=(1, 2, 3)))
    torch.testing.assert_close(column(images, ["a"] * 3), images.mean(dim=(1, 2, 3)))
    assert isinstance(as_list, FunctionReward) and as_list.name == "as_list"
    with pytest.raises(TypeError, match="Expected a Reward"):
        as_reward(3)


# -- registry and specs --------------------------------------------------------------------------
def test_registry_lists_builtins_and_registers_user_factories():
    names = rewards.available()
    for name in [
        "pickscore",
        "hpsv2",
        "hpsv2.1",
        "imagereward",
        "aesthetic",
        "clipscore",
        "jpeg_compressibility",
        "jpeg_incompressibility",
        "shapes",
        "shapes_binary",
        "redness",
        "png_compressibility",
        "red_jpeg",
    ]:
        assert name in names
    rewards.register("test_redness", lambda scale=1.0: lambda x, p: scale * x[:, 0].mean(dim=(1, 2)), overwrite=True)
    red = rewards.load("test-redness", scale=2.0)  # '-' and '_' are the same, case-insensitive
    images = torch.rand(2, 3, 4, 4)
    torch.testing.assert_close(red(images, ["a", "b"]), 2 * images[:, 0].mean(dim=(1, 2)))
    assert red.name == "test_redness"

    instance = Brightness()
    rewards.register("test_brightness", instance, overwrite=True)
    assert rewards.load("test_brightness") is instance
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("test_brightness", Brightness())
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("pickscore", Brightness())
    with pytest.raises(KeyError, match="Did you mean pickscore"):
        rewards.load("pickscor")


def test_parse_reward_spec():
    assert parse_reward_spec("pickscore") == rewards.RewardSpec("pickscore", 1.0, {})
    assert parse_reward_spec("pickscore=0.5").weight == 0.5
    spec = parse_reward_spec("hpsv2.1(checkpoint=/ckpt/hps, batch_size=8, binary=true)=-0.25")
    assert spec == rewards.RewardSpec("hpsv2.1", -0.25, {"checkpoint": "/ckpt/hps", "batch_size": 8, "binary": True})
    assert parse_reward_spec("clipscore(model=local-dir:/a/b)").kwargs == {"model": "local-dir:/a/b"}
    with pytest.raises(ValueError, match="weight 'abc' is not a number"):
        parse_reward_spec("pickscore=abc")
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        parse_reward_spec("pickscore(model)")
    with pytest.raises(ValueError, match="Cannot parse reward spec"):
        parse_reward_spec("pick score")
    # load() takes a spec with options too (no weight)
    assert rewards.load("jpeg_compressibility(quality=50)").quality == 50
    with pytest.raises(ValueError, match="weights belong to load_mixture"):
        rewards.load("jpeg_compressibility=0.5")


# -- mixtures ------------------------------------------------------------------------------------
def test_zscore_and_combine_by_hand():
    # a: mean 5, population std 2 (deviations -3 -1 -1 -1 0 0 2 4, squares sum to 32, / 8 = 4)
    a = torch.tensor([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])
    b = torch.tensor([0.0, 0.0, 0.0, 0.0, 10.0, 10.0, 10.0, 10.0])  # mean 5, std 5: z-scores -1 and 1
    za = torch.tensor([-1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 1.0, 2.0])
    torch.testing.assert_close(zscore(a, eps=0.0), za)
    assert zscore(torch.tensor([5.0])).item() == 0.0  # one image: 0, not NaN
    torch.testing.assert_close(combine([a, b], [0.5, 2.0]), torch.tensor([1.0, 2.0, 2.0, 2.0, 22.5, 22.5, 23.5, 24.5]))
    torch.testing.assert_close(combine({"a": a, "b": b}, [1.0, 1.0], "zscore"),
                               torch.tensor([-2.5, -1.5, -1.5, -1.5, 1.0, 1.0, 2.0, 3.0]), atol=1e-5, rtol=0)


def test_mixture_weights_normalisation_and_components():
    images = torch.rand(6, 3, 8, 8)
    prompts = [f"p{'x' * i}" for i in range(6)]
    bright = Brightness()
    red = as_reward(lambda x, p: 100 * x[:, 0].mean(dim=(1, 2)), name="red", requires_prompts=False)
    raw = Mixture([(bright, 0.3), (red, 0.7)])
    torch.testing.assert_close(raw(images, prompts), 0.3 * bright(images, prompts) + 0.7 * red(images, prompts))

    normalised = Mixture([(bright, 0.3), (red, 0.7)], normalize="zscore")
    total = normalised(images, prompts)
    torch.testing.assert_close(total, 0.3 * zscore(bright(images, prompts)) + 0.7 * zscore(red(images, prompts)))
    assert abs(total.mean().item()) < 1e-5  # z-scores are centred: the red reward's scale (x100) no longer dominates
    parts = normalised.components(images, prompts)
    assert list(parts) == ["brightness", "red"]
    assert normalised.name == "0.3*brightness+0.7*red"
    assert not normalised.differentiable  # the lambda is not declared differentiable


def test_mixture_gradients_unique_names_and_errors():
    images = torch.rand(4, 3, 8, 8, requires_grad=True)
    mixture = Mixture({Brightness(): 1.0, Brightness(): 2.0}, normalize="zscore")
    assert mixture.names == ["brightness", "brightness_2"] and mixture.differentiable
    # z-scores sum to zero over the batch, so weight them before backpropagating
    (mixture(images, ["a", "bb", "c", "dd"]) * torch.arange(4.0)).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="normalize must be one of"):
        Mixture([(Brightness(), 1.0)], normalize="minmax")
    with pytest.raises(ValueError, match="at least one"):
        Mixture([])


def test_load_mixture_from_specs():
    rewards.register(
        "test_constant", lambda value=1.0: as_reward(lambda x, p: torch.full((x.shape[0],), value)), overwrite=True
    )
    mixture = rewards.load_mixture(["test_constant(value=2)=0.5", "jpeg_incompressibility(quality=50)=0.1"])
    images = torch.rand(3, 3, 16, 16)
    expected = 0.5 * 2.0 + 0.1 * rewards.JpegIncompressibility(quality=50)(images)
    torch.testing.assert_close(mixture(images, ["a"] * 3), expected)


# -- JPEG and shapes -----------------------------------------------------------------------------
def test_jpeg_sizes_match_pil_and_order_images_by_detail():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    flat = np.full((32, 32, 3), 128, dtype=np.uint8)
    images = torch.from_numpy(np.stack([noise, flat])).permute(0, 3, 1, 2).float() / 255
    sizes = []
    for array in (noise, flat):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    incompressibility = rewards.load("jpeg_incompressibility")(images)
    compressibility = rewards.load("jpeg_compressibility")(images, ["ignored"] * 2)
    torch.testing.assert_close(incompressibility, torch.tensor(sizes))
    torch.testing.assert_close(compressibility, -torch.tensor(sizes))
    assert incompressibility[0] > incompressibility[1]  # noise is bigger than a flat image
    assert rewards.load("jpeg_incompressibility", quality=10)(images)[0] < incompressibility[0]
    chunked = rewards.JpegIncompressibility(batch_size=1)(images)
    torch.testing.assert_close(chunked, incompressibility)
    with pytest.raises(ValueError, match="quality must be in"):
        rewards.JpegIncompressibility(quality=0)


def test_shapes_verifier_dense_and_binary_wrap_verify_batch():
    prompts = shapes.heldout_prompts(6)
    rng = np.random.default_rng(0)
    images = torch.stack([torch.from_numpy(shapes.render_prompt(p, rng)).permute(2, 0, 1) / 255 for p in prompts])
    wrong = prompts[1:] + prompts[:1]  # each image against another family's prompt
    fraction, all_ok = shapes.verify_batch(images, wrong)
    dense, binary = rewards.load("shapes"), rewards.load("shapes_binary")
    torch.testing.assert_close(dense(images, wrong), fraction)
    torch.testing.assert_close(binary(images, wrong), all_ok)
    torch.testing.assert_close(binary(images, prompts), torch.ones(6))  # rendered images satisfy their prompts
    assert dense(images, wrong).mean() < 1.0
    torch.testing.assert_close(rewards.ShapesVerifier(batch_size=4)(images, wrong), fraction)


def test_as_reward_and_mixture_resolve_registered_names():
    """``as_reward`` (now beside ``load`` in the registry) still turns a registered name into that reward."""
    rewards.register("test_half", lambda: as_reward(lambda x, p: x.mean(dim=(1, 2, 3)) / 2, requires_prompts=False),
                     overwrite=True)
    images = torch.rand(3, 3, 4, 4)
    by_name = as_reward("test_half")
    assert by_name.name == "test_half"
    torch.testing.assert_close(by_name(images, None), images.mean(dim=(1, 2, 3)) / 2)
    torch.testing.assert_close(Mixture([("test_half", 2.0)])(images, None), images.mean(dim=(1, 2, 3)))
    with pytest.raises(KeyError, match="Unknown reward 'test_halff'. Did you mean test_half"):
        as_reward("test_halff")


# -- the credit-assignment task: redness, PNG, fixed z-scores, red_jpeg ---------------------------
def _palette_images() -> torch.Tensor:
    """One flat 8x8 image per shapes palette colour (red, green, blue, yellow), then white and mid grey."""
    colours = [shapes.COLORS[c] for c in ("red", "green", "blue", "yellow")] + [(255, 255, 255), (128, 128, 128)]
    return torch.tensor(colours, dtype=torch.float32)[:, :, None, None].expand(-1, -1, 8, 8) / 255


def test_redness_is_red_minus_the_larger_of_green_and_blue():
    images = _palette_images()
    red = rewards.load("redness")
    assert red.name == "redness" and red.differentiable and not red.requires_prompts
    # R - max(G, B) of the palette: red 230/255, green -190/255, blue -230/255, yellow (250 - 220)/255; greys 0
    torch.testing.assert_close(red(images), torch.tensor([230, -190, -230, 30, 0, 0]) / 255.0)
    # the mean over pixels: half red, half white -> half of red's score
    half = torch.ones(1, 3, 8, 8)
    half[:, 1:, :4] = 0  # top half (1, 0, 0)
    torch.testing.assert_close(red(half), torch.tensor([0.5]))
    x = images.clone().requires_grad_(True)  # gradients reach the pixels
    red(x).sum().backward()
    assert x.grad[0, 0].abs().sum() > 0


def test_png_compressibility_is_minus_the_png_size():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    flat = np.full((32, 32, 3), 200, dtype=np.uint8)
    images = torch.from_numpy(np.stack([noise, flat])).permute(0, 3, 1, 2).float() / 255
    sizes = []
    for array in (noise, flat):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=6)
        sizes.append(buffer.tell() / 1000)
    scores = rewards.load("png_compressibility")(images)
    torch.testing.assert_close(scores, -torch.tensor(sizes))
    assert scores[1] > scores[0] and sizes[0] > 3.0  # a flat image beats noise (3 kB of raw pixels barely shrink)
    with pytest.raises(ValueError, match="compress_level must be in"):
        rewards.PngCompressibility(compress_level=10)


def test_fixed_zscore_uses_the_constants_not_the_batch():
    a = torch.tensor([1.0, 3.0, 5.0])
    b = torch.tensor([10.0, 10.0, 30.0])
    # (a - 1) / 2 = [0, 1, 2]; (b - 10) / 10 = [0, 0, 2]; 0.5 * first + 2 * second
    torch.testing.assert_close(combine([a, b], [0.5, 2.0], "fixed", stats=[(1.0, 2.0), (10.0, 10.0)]),
                               torch.tensor([0.0, 0.5, 5.0]))
    red = as_reward(lambda x, p: x[:, 0].mean(dim=(1, 2)), name="red", requires_prompts=False)
    mixture = Mixture([(red, 1.0)], normalize="fixed", stats=[(0.5, 0.25)])
    images = torch.rand(4, 3, 8, 8)
    whole = mixture(images)
    torch.testing.assert_close(whole, (images[:, 0].mean(dim=(1, 2)) - 0.5) / 0.25)
    torch.testing.assert_close(torch.cat([mixture(images[:1]), mixture(images[1:])]), whole)  # no batch statistic
    with pytest.raises(ValueError, match="needs stats"):
        Mixture([(red, 1.0)], normalize="fixed")
    with pytest.raises(ValueError, match="std > 0"):
        Mixture([(red, 1.0)], normalize="fixed", stats=[(0.0, 0.0)])
    with pytest.raises(ValueError, match="2 \\(mean, std\\) pairs"):
        combine([a, b], [1.0, 1.0], "fixed", stats=[(0.0, 1.0)])
    with pytest.raises(ValueError, match="stats apply to normalize=\"fixed\" only"):
        Mixture([(red, 1.0)], normalize="zscore", stats=[(0.0, 1.0)])


def test_red_jpeg_is_the_fixed_mixture_of_its_components():
    reward = rewards.load("red_jpeg")
    assert reward.name == "red_jpeg" and reward.names == ["redness", "jpeg_compressibility"]
    rng = np.random.default_rng(0)
    images = torch.from_numpy(np.stack([shapes.render_prompt(p, rng) for p in shapes.heldout_prompts(6)]))
    images = images.permute(0, 3, 1, 2).float() / 255
    (mr, sr), (mj, sj) = RED_JPEG_STATS["redness"], RED_JPEG_STATS["jpeg_compressibility"]
    red, jpeg = rewards.load("redness")(images), rewards.load("jpeg_compressibility")(images)
    expected = 0.5 * (red - mr) / sr + 0.5 * (jpeg - mj) / sj
    torch.testing.assert_close(reward(images), expected)
    torch.testing.assert_close(reward(images[:2]), expected[:2])  # each image's score is its own
    # a red 12 x 12 square on white against the same square in blue: redness +-144/1024, a gap of 0.281, i.e.
    # 0.5 * 0.281 / s_r = 1.70 in the mixture; the JPEG sizes differ by the colour's coding only (~0.1 in z)
    square = torch.ones(2, 3, 32, 32)
    square[0, 1:, 8:20, 8:20] = 0  # red
    square[1, :2, 8:20, 8:20] = 0  # blue
    torch.testing.assert_close(rewards.load("redness")(square), torch.tensor([144.0, -144.0]) / 1024)
    assert reward(square)[0] - reward(square)[1] > 1.4


@pytest.mark.slow
def test_red_jpeg_constants_match_a_fresh_sample_of_the_base_model():
    """RED_JPEG_STATS are the base model's statistics: 128 rollouts of other seeds (16 prompts, 8 images each) of
    the credit config agree with them within the sample's spread (means within 0.35 std, stds within a factor
    1.5). 128 images of 16 prompts measured: redness -0.018 / 0.094 and -0.019 / 0.086 (seeds 1, 2),
    jpeg -1.273 / 0.140 and -1.282 / 0.153, against -0.023 / 0.083 and -1.235 / 0.199 on 1,024."""
    # the trainer (accelerate, peft, diffusers) is heavy: imported only by this test
    from flowalign.shapes_eval import reward_statistics

    measured = reward_statistics("samples/configs/credit_red_jpeg.yaml", ["redness", "jpeg_compressibility"],
                                 n_images=128, seed=1)
    for name, (mean, std) in RED_JPEG_STATS.items():
        got = measured[name]
        assert got["n"] == 128
        assert abs(got["mean"] - mean) < 0.35 * std, (name, got, mean, std)
        assert std / 1.5 < got["std"] < 1.5 * std, (name, got, std)
