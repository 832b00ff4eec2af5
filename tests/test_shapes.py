"""Tests of the shapes world (flowalign.shapes): prompts, splits, rendering, verifier; the no-colour prompt source
and its colour-entropy read-out (flowalign.shapes_eval)."""

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from flowalign import shapes
from flowalign.prompts import load_prompts
from flowalign.shapes_eval import NOCOLOR_UNSEEN_REWARDS, colour_entropy_per_group

N_PROMPTS = 1000


def _random_pairs(n: int, seed: int, split=None):
    rng = np.random.default_rng(seed)
    prompts = [shapes.sample_prompt(rng, split=split) for _ in range(n)]
    images = [shapes.render_prompt(p, rng) for p in prompts]
    return prompts, images


@pytest.fixture(scope="module")
def ground_truth():
    return _random_pairs(N_PROMPTS, seed=1234)


def _blur_and_noise(image: np.ndarray, rng: np.random.Generator, noise: float = 0.03) -> np.ndarray:
    """3x3 box blur plus Gaussian noise (std 0.03), clipped to [0, 1]: a stand-in for decoding."""
    blurred = ndimage.uniform_filter(image.astype(np.float32) / 255.0, size=(3, 3, 1), mode="nearest")
    return np.clip(blurred + rng.normal(0.0, noise, blurred.shape), 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Prompts and splits
# ---------------------------------------------------------------------------------------------


def test_prompt_inventory_and_families():
    prompts = shapes.all_prompts()
    assert len(prompts) == len(set(prompts)) == 3 + 6 + 9 + 12 + 24 + 72
    counts = {f: 0 for f in shapes.FAMILIES}
    for p in prompts:
        counts[shapes.family_of(p)] += 1
    assert counts == {
        "single_object": 3, "two_objects": 6, "counting": 9, "colors": 12, "position": 24, "color_attr": 72,
    }
    assert shapes.family_of("a photo of a circle") == "single_object"
    assert shapes.family_of("a photo of a circle and a square") == "two_objects"
    assert shapes.family_of("a photo of three triangles") == "counting"
    assert shapes.family_of("a photo of a blue square") == "colors"
    assert shapes.family_of("a photo of a circle to the left of a square") == "position"
    assert shapes.family_of("a photo of a red circle and a blue square") == "color_attr"


def test_parse_prompt_constraints():
    spec = shapes.parse_prompt("A photo of a triangle above a circle.")
    assert spec.family == "position" and spec.relation == "above"
    assert [(o.shape, o.count, o.color) for o in spec.objects] == [("triangle", 1, None), ("circle", 1, None)]
    spec = shapes.parse_prompt("a photo of four squares")
    assert [(o.shape, o.count, o.color) for o in spec.objects] == [("square", 4, None)]
    spec = shapes.parse_prompt("a photo of a yellow triangle and a green circle")
    assert [(o.shape, o.color) for o in spec.objects] == [("triangle", "yellow"), ("circle", "green")]


@pytest.mark.parametrize(
    "bad",
    [
        "a photo of a hexagon",
        "a photo of five circles",
        "a photo of one circle",
        "a photo of a purple square",
        "a photo of a circle next to a square",
        "a photo of a circle and a circle",
        "a photo of a red circle and a red square",
        "",
    ],
)
def test_parse_errors_name_the_prompt(bad):
    with pytest.raises(ValueError, match="unparseable prompt"):
        shapes.parse_prompt(bad)
    with pytest.raises(ValueError, match="unparseable prompt"):
        shapes.verify(np.full((32, 32, 3), 255, np.uint8), bad)


def test_splits_are_disjoint_where_promised():
    train, heldout = set(shapes.all_prompts("train")), set(shapes.all_prompts("heldout"))
    shared = {"single_object", "two_objects"}
    for family in shapes.FAMILIES:
        tr = {p for p in train if shapes.family_of(p) == family}
        ho = {p for p in heldout if shapes.family_of(p) == family}
        everything = {p for p in shapes.all_prompts() if shapes.family_of(p) == family}
        assert tr | ho == everything
        if family in shared:
            assert tr == ho == everything
        else:
            assert not tr & ho
            assert len(ho) == round(len(everything) / 4)
    # Samplers respect the split.
    rng = np.random.default_rng(0)
    sampled_train = {shapes.sample_prompt(rng, split="train") for _ in range(3000)}
    sampled_heldout = {shapes.sample_prompt(rng, split="heldout") for _ in range(3000)}
    assert sampled_train == train
    assert sampled_heldout == heldout
    dataset_prompts = {item["prompt"] for item in (shapes.ShapesDataset(300, seed=3)[i] for i in range(300))}
    assert dataset_prompts <= train
    assert not dataset_prompts & (heldout - {p for p in heldout if shapes.family_of(p) in shared})


def test_sample_prompt_family_and_errors():
    rng = np.random.default_rng(0)
    for family in shapes.FAMILIES:
        assert all(shapes.family_of(shapes.sample_prompt(rng, family=family)) == family for _ in range(20))
    families = [shapes.family_of(shapes.sample_prompt(rng)) for _ in range(6000)]
    freq = np.array([families.count(f) for f in shapes.FAMILIES]) / 6000
    assert np.all(np.abs(freq - 1 / 6) < 0.03)  # uniform over families (std ~0.005)
    with pytest.raises(ValueError, match="unknown family"):
        shapes.sample_prompt(rng, family="colour")
    with pytest.raises(ValueError, match="unknown split"):
        shapes.sample_prompt(rng, split="test")


def test_heldout_prompts_balanced_and_deterministic():
    prompts = shapes.heldout_prompts(60, seed=0)
    assert prompts == shapes.heldout_prompts(60, seed=0)
    assert prompts != shapes.heldout_prompts(60, seed=1)
    assert set(prompts) <= set(shapes.all_prompts("heldout"))
    families = [shapes.family_of(p) for p in prompts]
    assert all(families.count(f) == 10 for f in shapes.FAMILIES)
    # Within a family the held-out prompts are cycled, so 10 draws cover min(10, n) distinct ones.
    for family in shapes.FAMILIES:
        n_family = len([p for p in shapes.all_prompts("heldout") if shapes.family_of(p) == family])
        assert len({p for p, f in zip(prompts, families) if f == family}) == min(10, n_family)


def test_nocolor_prompts_name_no_colour_and_keep_the_split():
    nocolor = shapes.NOCOLOR_FAMILIES
    train, heldout = shapes.all_prompts("train", nocolor), shapes.all_prompts("heldout", nocolor)
    assert (len(train), len(heldout)) == (3 + 6 + 7 + 18, 3 + 6 + 2 + 6)
    colour_words = set(shapes.COLORS)
    assert not any(colour_words & set(p.split()) for p in shapes.all_prompts(None, nocolor))
    # the same split as the full world's, restricted to the no-colour families
    assert set(train) == {p for p in shapes.all_prompts("train") if shapes.family_of(p) in nocolor}
    assert set(heldout) == {p for p in shapes.all_prompts("heldout") if shapes.family_of(p) in nocolor}
    assert {p for p in train if shapes.family_of(p) in ("counting", "position")}.isdisjoint(heldout)
    prompts = shapes.heldout_prompts(40, seed=0, families=nocolor)
    assert set(prompts) <= set(heldout) and prompts == shapes.heldout_prompts(40, seed=0, families=nocolor)
    assert [shapes.family_of(p) for p in prompts[:8]] == list(nocolor) * 2
    assert shapes.heldout_prompts(60, seed=3, families=shapes.FAMILIES) == shapes.heldout_prompts(60, seed=3)
    with pytest.raises(ValueError, match="at least one"):
        shapes.heldout_prompts(4, families=())
    with pytest.raises(ValueError, match="unknown family 'colour'"):
        shapes.all_prompts("train", families=["colour"])


def test_nocolor_prompt_source_draws_family_balanced_and_reads_out_colour_entropy():
    source = load_prompts("shapes_nocolor")
    assert source.train == shapes.all_prompts("train", shapes.NOCOLOR_FAMILIES)
    weights = source.sampling_weights()
    per_family = {f: sum(float(w) for p, w in zip(source.train, weights) if shapes.family_of(p) == f)
                  for f in shapes.NOCOLOR_FAMILIES}
    assert per_family == pytest.approx({f: 0.25 for f in shapes.NOCOLOR_FAMILIES})  # a family uniformly, then a prompt
    assert source.heldout_prompts(12, seed=1) == shapes.heldout_prompts(12, seed=1, families=shapes.NOCOLOR_FAMILIES)
    # unseen rewards: the verifier, a JPEG-side reward that is not the training reward, then red_jpeg's parts
    assert source.unseen_rewards == NOCOLOR_UNSEEN_REWARDS
    assert source.unseen_rewards[:2] == ["shapes_binary", "png_compressibility"]
    assert source.group_readouts == {"colour_entropy": colour_entropy_per_group}
    full = load_prompts("shapes")
    assert full.group_readouts == {} and len(full.train) == 97
    assert full.heldout_prompts(30, seed=2) == shapes.heldout_prompts(30, seed=2)
    with pytest.raises(TypeError, match="group_readouts\\['x'\\]"):
        type(source)(["a"], group_readouts={"x": 3})


def _flat(colour, n: int = 1) -> torch.Tensor:
    """``n`` white 32 x 32 images with one 10 x 10 square of ``colour`` (RGB 0-255)."""
    image = torch.ones(n, 3, 32, 32)
    image[:, :, 5:15, 5:15] = torch.tensor(colour, dtype=torch.float32)[:, None, None] / 255
    return image


def test_dominant_colors_follow_the_verifiers_colour_classification():
    rng = np.random.default_rng(5)
    palette = list(shapes.COLORS)
    images, expected = [], []
    for i in range(24):  # one object, or a majority colour of two squares against a smaller circle
        major, minor = palette[i % 4], palette[(i + 1 + i // 4) % 4]
        objects = [("square", major)] if i % 2 else [("square", major), ("square", major), ("circle", minor)]
        image = shapes.render_objects(objects, rng)
        images.append(_blur_and_noise(image, rng) if i % 3 == 0 else image)  # decoded-like and clean
        expected.append(major)
    assert shapes.dominant_colors(images) == expected
    assert shapes.dominant_colors(torch.cat([_flat((255, 255, 255)), _flat((60, 60, 60)), _flat((230, 0, 0))])) == [
        shapes.NO_FOREGROUND, shapes.OTHER_COLOR, "red"]  # white: no foreground; dark grey: off-palette
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        shapes.dominant_colors(_flat((230, 0, 0)) * 2)


def test_colour_entropy_per_group_on_constructed_images():
    red, blue, green, yellow = (_flat(shapes.COLORS[c], 2) for c in ("red", "blue", "green", "yellow"))
    images = torch.cat([red, red, red, blue, red, blue, green, yellow])  # 16 images
    groups = ["all red"] * 4 + ["half"] * 4 + ["four"] * 8
    values = colour_entropy_per_group(images, groups)
    assert values["all red"] == 0.0
    assert values["half"] == pytest.approx(np.log(2))  # p = (1/2, 1/2): -2 * 0.5 * log 0.5
    assert values["four"] == pytest.approx(np.log(4))  # two images of each of 4 colours
    three = colour_entropy_per_group(torch.cat([red, blue[:1]]), [7, 7, 7])  # p = (2/3, 1/3)
    assert three == {7: pytest.approx(-(2 / 3) * np.log(2 / 3) - (1 / 3) * np.log(1 / 3))}
    assert colour_entropy_per_group(red[:1], [0]) == {0: 0.0}
    with pytest.raises(ValueError, match="3 images but 2 groups"):
        colour_entropy_per_group(torch.cat([red, blue[:1]]), [0, 1])


# ---------------------------------------------------------------------------------------------
# Rendering and data set
# ---------------------------------------------------------------------------------------------


def test_render_is_deterministic_and_well_formed():
    prompt = "a photo of four circles"
    a = shapes.render_prompt(prompt, np.random.default_rng(7))
    b = shapes.render_prompt(prompt, np.random.default_rng(7))
    c = shapes.render_prompt(prompt, np.random.default_rng(8))
    assert a.shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # Only background and palette colours appear (hard edges, no anti-aliasing).
    allowed = {shapes.BACKGROUND, *shapes.COLORS.values()}
    assert {tuple(int(v) for v in px) for px in a.reshape(-1, 3)} <= allowed
    objects = shapes.detect_objects(a)
    assert len(objects) == 4 and all(o.shape == "circle" for o in objects)


def test_dataset_items_deterministic():
    ds = shapes.ShapesDataset(50, seed=5, split="train")
    again = shapes.ShapesDataset(50, seed=5, split="train")
    other = shapes.ShapesDataset(50, seed=6, split="train")
    assert len(ds) == 50
    item = ds[17]
    assert set(item) == {"image", "prompt", "family"}
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["family"] == shapes.family_of(item["prompt"])
    assert torch.equal(item["image"], again[17]["image"]) and item["prompt"] == again[17]["prompt"]
    assert any(ds[i]["prompt"] != other[i]["prompt"] for i in range(10))
    assert shapes.verify(item["image"], item["prompt"]).all_satisfied
    only = shapes.ShapesDataset(20, seed=0, families=["counting"])
    assert {only[i]["family"] for i in range(20)} == {"counting"}
    with pytest.raises(IndexError):
        ds[50]
    with pytest.raises(ValueError, match="unknown family"):
        shapes.ShapesDataset(5, families=["colour"])


# ---------------------------------------------------------------------------------------------
# Verifier
# ---------------------------------------------------------------------------------------------


def test_ground_truth_scores_at_least_99_percent(ground_truth):
    prompts, images = ground_truth
    ok = np.array([shapes.verify(im, p).all_satisfied for p, im in zip(prompts, images)])
    print(f"ground truth all-satisfied: {ok.mean():.4f} on {len(ok)} prompts")
    assert ok.mean() >= 0.99
    for family in shapes.FAMILIES:  # every family is well represented and verified
        mask = np.array([shapes.family_of(p) == family for p in prompts])
        assert mask.sum() > 100 and ok[mask].mean() >= 0.99


def _entails_shapes(spec_a, spec_b) -> bool:
    """Whether B asks for exactly the same multiset of shapes as A (else B cannot be satisfied)."""
    multiset = lambda spec: sorted((o.shape, o.count) for o in spec.objects)  # noqa: E731
    return multiset(spec_a) == multiset(spec_b)


def test_mismatched_pairs_score_near_zero(ground_truth):
    prompts, images = ground_truth
    rng = np.random.default_rng(99)
    all_prompts = shapes.all_prompts()
    ok, fractions, ok_different_objects = [], [], []
    for prompt_a, image in zip(prompts, images):
        prompt_b = prompt_a
        while prompt_b == prompt_a:
            prompt_b = all_prompts[rng.integers(len(all_prompts))]
        result = shapes.verify(image, prompt_b)
        ok.append(result.all_satisfied)
        fractions.append(result.fraction)
        if not _entails_shapes(shapes.parse_prompt(prompt_a), shapes.parse_prompt(prompt_b)):
            ok_different_objects.append(result.all_satisfied)
    rate = float(np.mean(ok))
    print(f"mismatched all-satisfied: {rate:.4f}, mean fraction {np.mean(fractions):.3f}; "
          f"with a different object multiset: {np.mean(ok_different_objects):.4f} "
          f"of {len(ok_different_objects)}")
    # A random other prompt B is a *true* description of A's image about 4% of the time, all of it
    # entailment: "a circle and a square" vs "a square and a circle", "a red circle and a blue square"
    # or "a circle left of a square" vs "a circle and a square", "a blue square" vs "a square", a random
    # unnamed colour matching B's colour. Summing those probabilities gives ~4%, hence the 6% bound.
    assert rate < 0.06
    # When B names a different set of objects the image cannot satisfy it.
    assert len(ok_different_objects) > 700 and np.mean(ok_different_objects) < 0.005


@pytest.mark.parametrize(
    "prompt_a, prompt_b",
    [
        ("a photo of a red circle and a blue square", "a photo of a blue circle and a red square"),
        ("a photo of a circle to the left of a square", "a photo of a circle to the right of a square"),
        ("a photo of a triangle above a circle", "a photo of a triangle below a circle"),
        ("a photo of three squares", "a photo of two squares"),
        ("a photo of three squares", "a photo of four squares"),
        ("a photo of a green triangle", "a photo of a yellow triangle"),
        ("a photo of a circle and a triangle", "a photo of a circle"),
        ("a photo of a circle", "a photo of a square"),
    ],
)
def test_hard_mismatches_fail(prompt_a, prompt_b):
    rng = np.random.default_rng(0)
    for _ in range(20):
        image = shapes.render_prompt(prompt_a, rng)
        assert shapes.verify(image, prompt_a).all_satisfied
        result = shapes.verify(image, prompt_b)
        assert not result.all_satisfied and result.fraction < 1.0


def _gaussian_blur_and_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur (sigma 1 px) plus noise (std 0.05): softer than the 3x3 box."""
    blurred = ndimage.gaussian_filter(image.astype(np.float32) / 255.0, sigma=(1.0, 1.0, 0), mode="nearest")
    return np.clip(blurred + rng.normal(0.0, 0.05, blurred.shape), 0.0, 1.0).astype(np.float32)


@pytest.mark.parametrize(
    "corrupt", [_blur_and_noise, _gaussian_blur_and_noise], ids=["box3_noise03", "gauss1_noise05"]
)
def test_blurred_and_noised_ground_truth_still_verifies(ground_truth, corrupt):
    prompts, images = ground_truth
    rng = np.random.default_rng(0)
    ok = np.array([shapes.verify(corrupt(im, rng), p).all_satisfied for p, im in zip(prompts, images)])
    print(f"{corrupt.__doc__.split(':')[0]}: ground truth all-satisfied {ok.mean():.4f}")
    assert ok.mean() >= 0.95


def test_checks_per_family():
    rng = np.random.default_rng(0)
    expected = {
        "a photo of a circle": ["count(circle)==1", "no other objects (total==1)"],
        "a photo of a circle and a square": [
            "count(circle)==1", "count(square)==1", "no other objects (total==2)",
        ],
        "a photo of three triangles": ["count(triangle)==3", "no other objects (total==3)"],
        "a photo of a blue square": [
            "count(square)==1", "color(square)==blue", "no other objects (total==1)",
        ],
        "a photo of a circle to the left of a square": [
            "count(circle)==1", "count(square)==1", "circle to the left of square",
            "no other objects (total==2)",
        ],
        "a photo of a red circle and a blue square": [
            "count(circle)==1", "count(square)==1", "color(circle)==red", "color(square)==blue",
            "no other objects (total==2)",
        ],
    }
    for prompt, names in expected.items():
        result = shapes.verify(shapes.render_prompt(prompt, rng), prompt)
        assert [name for name, _ in result.checks] == names
        assert result.fraction == 1.0 and result.all_satisfied
    # Partial credit: the right shapes with swapped colours satisfy 3 of 5 checks.
    image = shapes.render_objects([("circle", "blue"), ("square", "red")], rng)
    result = shapes.verify(image, "a photo of a red circle and a blue square")
    assert result.fraction == pytest.approx(3 / 5) and not result.all_satisfied
    # An extra object fails only the "no other objects" check.
    image = shapes.render_objects([("circle", "red"), ("triangle", "green")], rng)
    result = shapes.verify(image, "a photo of a red circle")
    assert dict(result.checks) == {"count(circle)==1": True, "color(circle)==red": True,
                                   "no other objects (total==1)": False}
    # An empty (white) image satisfies nothing but... nothing.
    blank = np.full((32, 32, 3), 255, np.uint8)
    assert shapes.verify(blank, "a photo of a circle").fraction == 0.0


def test_relation_geometry():
    # Hand-placed scene: circle box at x 2..11, square at x 20..29, same rows.
    image = np.full((32, 32, 3), 255, np.uint8)
    image[10:20, 2:12][shapes._shape_mask("circle", 10)] = shapes.COLORS["red"]
    image[10:20, 20:30] = shapes.COLORS["green"]
    assert shapes.verify(image, "a photo of a circle to the left of a square").all_satisfied
    assert shapes.verify(image, "a photo of a square to the right of a circle").all_satisfied
    for relation in ("to the right of", "above", "below"):
        assert not shapes.verify(image, f"a photo of a circle {relation} a square").all_satisfied


@pytest.mark.parametrize("shape", shapes.SHAPES)
@pytest.mark.parametrize("size", [7, 9, 12, 20])
def test_classify_shape_on_clean_and_blurred_masks(shape, size):
    image = np.full((32, 32, 3), 255, np.uint8)
    image[4 : 4 + size, 5 : 5 + size][shapes._shape_mask(shape, size)] = shapes.COLORS["blue"]
    for candidate in (image, _blur_and_noise(image, np.random.default_rng(size))):
        objects = shapes.detect_objects(candidate)
        assert [(o.shape, o.color) for o in objects] == [(shape, "blue")]


def _blurred_mask(shape: str, size: int, sigma: float) -> np.ndarray:
    """A shape's mask after a Gaussian blur of its coverage, thresholded at 1/2 (like the verifier)."""
    coverage = np.zeros((size + 8, size + 8))
    coverage[4 : 4 + size, 4 : 4 + size] = shapes._shape_mask(shape, size)
    return ndimage.gaussian_filter(coverage, sigma) > 0.5


@pytest.mark.parametrize("shape", shapes.SHAPES)
def test_classify_shape_masks(shape):
    for size in (7, 8, 10, 12, 16, 24):
        assert shapes.classify_shape(shapes._shape_mask(shape, size)) == shape
        for sigma in (0.6, 1.0):
            assert shapes.classify_shape(_blurred_mask(shape, size, sigma)) == shape
    # A bottom-heavy triangle with a missing apex (as decoders produce) is still a triangle.
    if shape == "triangle":
        eroded = shapes._shape_mask("triangle", 9).copy()
        eroded[:2] = False
        assert shapes.classify_shape(eroded) == "triangle"


def test_classify_shape_rejects_empty_masks():
    with pytest.raises(ValueError, match="non-empty"):
        shapes.classify_shape(np.zeros((5, 5), bool))


def test_shape_features():
    assert shapes._shape_from_features(0.5, -0.57) == "triangle"
    assert shapes._shape_from_features(0.78, -0.3) == "triangle"  # blurred: rounder, still bottom-heavy
    assert shapes._shape_from_features(1.0, 0.0) == "square"
    assert shapes._shape_from_features(0.95, -0.05) == "square"
    assert shapes._shape_from_features(np.pi / 4, 0.0) == "circle"
    assert shapes._shape_from_features(0.8, 0.05) == "circle"
    # An inverted triangle is not an upright triangle (positive skewness).
    assert shapes.classify_shape(shapes._shape_mask("triangle", 10)[::-1]) != "triangle"


def test_specks_are_ignored_and_off_palette_blobs_count_as_other():
    image = np.full((32, 32, 3), 255, np.uint8)
    image[5:15, 5:15] = shapes.COLORS["yellow"]
    image[25:27, 25:27] = shapes.COLORS["red"]  # 4-pixel speck: ignored
    image[27:30, 20:21] = (250, 250, 250)  # near-white smudge: background
    assert [(o.shape, o.color) for o in shapes.detect_objects(image)] == [("square", "yellow")]
    assert shapes.verify(image, "a photo of a yellow square").all_satisfied
    image[18:28, 2:12] = (128, 128, 128)  # grey blob: an object of colour "other"
    assert sorted((o.shape, o.color) for o in shapes.detect_objects(image)) == [
        ("square", "other"), ("square", "yellow")]
    result = shapes.verify(image, "a photo of a yellow square")
    assert not result.all_satisfied and not dict(result.checks)["count(square)==1"]


def test_verify_accepts_all_image_types():
    rng = np.random.default_rng(3)
    prompt = "a photo of a green triangle and a yellow circle"
    image = shapes.render_prompt(prompt, rng)
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    for candidate in (image, image.astype(np.float32) / 255.0, tensor, Image.fromarray(image)):
        assert shapes.verify(candidate, prompt).all_satisfied
    # 64 x 64 upsampled images verify too (areas scale with the image).
    big = np.repeat(np.repeat(image, 2, axis=0), 2, axis=1)
    assert shapes.verify(big, prompt).all_satisfied
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        shapes.verify(tensor * 2.0, prompt)
    with pytest.raises(ValueError, match="shape"):
        shapes.verify(tensor[None], prompt)


def test_verify_batch_matches_verify_and_checks_inputs(ground_truth, as_tensor):
    prompts, images = ground_truth
    prompts, images = prompts[:64], images[:64]
    batch = as_tensor(images)
    # Corrupt a few prompts so that some entries fail.
    prompts = list(prompts)
    prompts[::4] = ["a photo of four triangles"] * len(prompts[::4])
    fraction, all_ok = shapes.verify_batch(batch, prompts)
    assert fraction.shape == all_ok.shape == (64,)
    assert fraction.dtype == all_ok.dtype == torch.float32
    singles = [shapes.verify(im, p) for im, p in zip(images, prompts)]
    assert fraction.tolist() == pytest.approx([s.fraction for s in singles])
    assert all_ok.tolist() == [float(s.all_satisfied) for s in singles]
    assert 0.0 < all_ok.mean() < 1.0
    pil_fraction, pil_ok = shapes.verify_batch([Image.fromarray(im) for im in images], prompts)
    assert torch.equal(pil_fraction, fraction) and torch.equal(pil_ok, all_ok)
    with pytest.raises(ValueError, match="prompts"):
        shapes.verify_batch(batch, prompts[:-1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        shapes.verify_batch(batch - 0.5, prompts)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        shapes.verify_batch(batch * float("nan"), prompts)
    with pytest.raises(ValueError, match="shape"):
        shapes.verify_batch(batch[:, :2], prompts)
