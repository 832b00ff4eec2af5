"""The shapes world: a procedural, GenEval-like text-to-image data set with an exact verifier.

Every image is ``IMAGE_SIZE`` x ``IMAGE_SIZE`` (32 x 32) RGB: 1-4 hard-edged coloured shapes on a
white background, drawn with numpy. Shapes (``SHAPES``): circle, square, upright triangle (apex up,
flat base down). Colours (``COLORS``): saturated red, green, blue, yellow. Objects never overlap
(their bounding boxes keep a gap of at least ``MIN_GAP`` pixels); their size is 9-12 px with one or
two objects and 7-9 px with three or four.

Prompt families (``FAMILIES``, in this order) and their templates::

    single_object  "a photo of a {shape}"                          "a photo of a circle"
    two_objects    "a photo of a {shape} and a {shape}"            "a photo of a circle and a square"
    counting       "a photo of {two|three|four} {shape}s"          "a photo of three triangles"
    colors         "a photo of a {color} {shape}"                  "a photo of a blue square"
    position       "a photo of a {shape} {relation} a {shape}"     "a photo of a circle to the left of a square"
    color_attr     "a photo of a {color} {shape} and a {color} {shape}"
                                                                    "a photo of a red circle and a blue square"

Relations are "to the left of", "to the right of", "above", "below". The two shapes of
two_objects / position / color_attr prompts differ, and so do the two colours of a color_attr
prompt. That makes 3 + 6 + 9 + 12 + 24 + 72 = 126 distinct prompts.

Rendering: the scene contains exactly the objects the prompt names (counting: exactly N of that
shape) and nothing else. A colour the prompt does not name is drawn uniformly at random. Position
scenes are re-sampled until the relation holds by a wide margin (see ``_relation_score``).

Verifier (``verify``, ``verify_batch``):

1. Colour classification, per pixel. A pixel ``p`` of an anti-aliased or blurred edge is a mix
   ``p = bg + alpha * (c - bg)`` of the white background ``bg`` and a palette colour ``c``, so the
   *direction* of ``bg - p`` names the colour however faint the pixel is (plain nearest-RGB
   classification turns half-green edge pixels yellow). Each pixel gets the palette colour whose
   direction ``bg - c`` has the largest cosine with ``bg - p``, and is foreground if its coverage
   ``alpha = <bg - p, bg - c> / |bg - c|^2`` is above ``ALPHA_THRESHOLD`` (0.5). Foreground whose
   best cosine is below ``MIN_COLOR_COSINE`` (grey, black, off-palette hues) gets the colour
   ``"other"``: it still forms objects (so junk blobs fail "no other objects") but never matches a
   named colour.
2. Objects: connected components (``scipy.ndimage.label``, 4-connectivity) of each colour's
   (and "other"'s) foreground, keeping components of at least ``MIN_AREA`` pixels (at 32 x 32;
   scaled with the image area) so that specks are ignored.
3. Shape, per component (``classify_shape``): an upright triangle is bottom-heavy, its centroid
   sits 2/3 of the way down its bounding box instead of 1/2 for circles and squares. This
   survives blur, where the fill ratio of a triangle drifts towards a circle's. We measure it as
   the skewness of the component's row coordinates, ``E[(y - mean)^3] / std^3`` (an upright
   triangle: -0.57; circles and squares: 0 by symmetry). Unlike the centroid offset inside the
   bounding box, it barely moves when blur erodes the thin apex of a small triangle (measured on
   4-object scenes under a Gaussian blur of sigma 1.3: triangles <= -0.2, circles and squares
   >= -0.09, while the bounding-box offsets overlapped). A component is a triangle when the
   skewness is below ``TRIANGLE_SKEWNESS``; otherwise a square when its bounding-box fill ratio
   exceeds ``SQUARE_FILL_RATIO`` (square 1.0, disc pi/4 = 0.785), else a circle.
4. Checks, per family (``fraction`` = satisfied / total, ``all_satisfied`` = all of them):

   ==============  ==========================================================================
   single_object   ``count(S)==1``; ``no other objects`` (exactly 1 object in total)
   two_objects     ``count(A)==1``; ``count(B)==1``; ``no other objects`` (exactly 2)
   counting        ``count(S)==N``; ``no other objects`` (exactly N)
   colors          ``count(S)==1``; ``color(S)==C``; ``no other objects`` (exactly 1)
   position        ``count(A)==1``; ``count(B)==1``; ``A <relation> B``; ``no other objects``
   color_attr      ``count(A)==1``; ``count(B)==1``; ``color(A)==C1``; ``color(B)==C2``;
                   ``no other objects`` (exactly 2)
   ==============  ==========================================================================

   ``color(S)==C`` holds when some detected S has colour C (the count check already asks for
   exactly one). ``A <relation> B`` follows GenEval: with centroid offset ``d = c_A - c_B``, each
   coordinate is shrunk towards 0 by ``POSITION_THRESHOLD * (size_A + size_B)`` (bounding-box
   extent along that axis), divided by ``|d|``, and the relation holds when the component along
   its axis is beyond 0.5 ("left of": ``dx < -0.5``; "above": ``dy < -0.5``, y grows downwards),
   i.e. A lies within 60 degrees of the named direction as seen from B. It holds when some (A, B)
   pair satisfies it.

   Measured (tests/test_shapes.py, 1,000 seeded prompts of all families): ground-truth renders
   100% all-satisfied; after a 3x3 box blur + noise (std 0.03) 100%, after a Gaussian blur
   (sigma 1) + noise (std 0.05) 99.9%. Against a different random prompt, 2.7% all-satisfied
   (mean fraction 0.34): every one of those is a true description of the image (an image of "a
   red circle and a blue square" *is* one of "a square and a circle"); when the other prompt
   names a different set of objects, 0%.

Held-out split: in each family with at least 8 distinct prompts (counting, colors, position,
color_attr) the ``round(n / 4)`` prompts with the smallest SHA-256 of their text are reserved for
evaluation (2 + 3 + 6 + 18 = 29 prompts); ``split="train"`` never yields them and
``split="heldout"`` yields no other prompt of those families. The families single_object (3
prompts) and two_objects (6) are too small to split and are shared by both splits, so "train" has
97 prompts and "heldout" 38. ``split=None`` (or ``"all"``) means every prompt.

Prompts that name no colour (``NOCOLOR_FAMILIES``: single_object, two_objects, counting, position;
``prompt_source(NOCOLOR_FAMILIES)``, ``prompts: shapes_nocolor`` in a training config) keep the same
per-family split: 34 train prompts (3 + 6 + 7 + 18) and 17 held out (3 + 6 + 2 + 6). The model picks
every colour of their images, so :func:`dominant_colors` of its samples measures what it chose
(``flowalign.shapes_eval.colour_entropy_per_group``).

Example::

    >>> import numpy as np
    >>> from flowalign import shapes
    >>> rng = np.random.default_rng(0)
    >>> prompt = shapes.sample_prompt(rng, family="position")
    >>> image = shapes.render_prompt(prompt, rng)           # uint8 [32, 32, 3]
    >>> shapes.verify(image, prompt).all_satisfied
    True
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from flowalign.prompts import PromptSource

__all__ = [
    "IMAGE_SIZE",
    "SHAPES",
    "COLORS",
    "FAMILIES",
    "RELATIONS",
    "ObjectSpec",
    "PromptSpec",
    "DetectedObject",
    "Verification",
    "parse_prompt",
    "family_of",
    "all_prompts",
    "sample_prompt",
    "heldout_prompts",
    "prompt_source",
    "NOCOLOR_FAMILIES",
    "render_prompt",
    "render_objects",
    "detect_objects",
    "classify_shape",
    "dominant_colors",
    "NO_FOREGROUND",
    "verify",
    "verify_batch",
    "ShapesDataset",
]

# ----------------------------------------------------------------------------------------------
# The world
# ----------------------------------------------------------------------------------------------

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 0, 0),
    "green": (0, 190, 0),
    "blue": (0, 0, 230),
    "yellow": (250, 220, 0),
}
BACKGROUND = (255, 255, 255)
FAMILIES = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
NOCOLOR_FAMILIES = ("single_object", "two_objects", "counting", "position")  # the families whose prompts name no colour
RELATIONS = ("to the left of", "to the right of", "above", "below")
COUNT_WORDS = {"two": 2, "three": 3, "four": 4}
SPLITS = ("train", "heldout")

MIN_GAP = 2  # pixels between the bounding boxes of two rendered objects
SIZES_FEW = (9, 12)  # object size range (inclusive) with 1-2 objects
SIZES_MANY = (7, 9)  # ... with 3-4 objects

# Verifier constants (at 32 x 32; areas scale with the image area).
ALPHA_THRESHOLD = 0.5  # a pixel is foreground when it is more than half palette colour
MIN_COLOR_COSINE = 0.92  # below: colour "other" (grey, black...); palette directions differ by >= 37 deg
OTHER_COLOR = "other"  # colour of foreground whose hue is no palette colour; such objects still count
NO_FOREGROUND = "none"  # dominant_colors of an image without foreground pixels
MIN_AREA = 8  # pixels; smaller components are specks (the smallest rendered triangle has ~20)
TRIANGLE_SKEWNESS = -0.15  # row-coordinate skewness: upright triangle -0.57, circle / square 0
SQUARE_FILL_RATIO = 0.89  # square fills its bounding box (1.0), a disc pi/4
POSITION_THRESHOLD = 0.1  # GenEval's relative-position dead zone, in object sizes


# ----------------------------------------------------------------------------------------------
# Prompts
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One named object of a prompt: ``count`` objects of ``shape`` (colour ``None`` = any)."""

    shape: str
    count: int = 1
    color: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: its family, the named objects and (position family) the relation."""

    family: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None  # objects[0] <relation> objects[1]


_SHAPE = "(circle|square|triangle)"
_COLOR = "(red|green|blue|yellow)"
_RELATION = "(to the left of|to the right of|above|below)"
_PATTERNS = (
    ("single_object", re.compile(rf"a photo of a {_SHAPE}")),
    ("two_objects", re.compile(rf"a photo of a {_SHAPE} and a {_SHAPE}")),
    ("counting", re.compile(rf"a photo of (two|three|four) {_SHAPE}s")),
    ("colors", re.compile(rf"a photo of a {_COLOR} {_SHAPE}")),
    ("position", re.compile(rf"a photo of a {_SHAPE} {_RELATION} a {_SHAPE}")),
    ("color_attr", re.compile(rf"a photo of a {_COLOR} {_SHAPE} and a {_COLOR} {_SHAPE}")),
)


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def parse_prompt(text: str) -> PromptSpec:
    """Parse a shapes-world prompt into its constraints.

    Case, surrounding white space and a final period are ignored. Raises ``ValueError`` naming the
    prompt when it matches no template (see the module docstring), or when the two shapes of a
    two-object prompt (or the two colours of a color_attr prompt) are the same.

    Example::

        >>> parse_prompt("a photo of a red circle and a blue square")
        PromptSpec(family='color_attr', objects=(ObjectSpec(shape='circle', count=1, color='red'), \
ObjectSpec(shape='square', count=1, color='blue')), relation=None)
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a str, got {type(text).__name__}: {text!r}")
    return _parse_normalized(_normalize(text), text)


@functools.lru_cache(maxsize=1024)
def _parse_normalized(norm: str, text: str) -> PromptSpec:
    for family, pattern in _PATTERNS:
        match = pattern.fullmatch(norm)
        if match is None:
            continue
        g = match.groups()
        if family == "single_object":
            spec = PromptSpec(family, (ObjectSpec(g[0]),))
        elif family == "two_objects":
            spec = PromptSpec(family, (ObjectSpec(g[0]), ObjectSpec(g[1])))
        elif family == "counting":
            spec = PromptSpec(family, (ObjectSpec(g[1], count=COUNT_WORDS[g[0]]),))
        elif family == "colors":
            spec = PromptSpec(family, (ObjectSpec(g[1], color=g[0]),))
        elif family == "position":
            spec = PromptSpec(family, (ObjectSpec(g[0]), ObjectSpec(g[2])), relation=g[1])
        else:  # color_attr
            spec = PromptSpec(family, (ObjectSpec(g[1], color=g[0]), ObjectSpec(g[3], color=g[2])))
        if len(spec.objects) == 2 and spec.objects[0].shape == spec.objects[1].shape:
            raise ValueError(
                f"unparseable prompt {text!r}: the two objects must be different shapes "
                f"(e.g. 'a photo of a circle and a square')"
            )
        if family == "color_attr" and spec.objects[0].color == spec.objects[1].color:
            raise ValueError(
                f"unparseable prompt {text!r}: the two colours of a color_attr prompt must differ"
            )
        return spec
    raise ValueError(
        f"unparseable prompt {text!r}: it matches none of the shapes-world templates, e.g. "
        f"'a photo of a circle', 'a photo of three triangles', 'a photo of a blue square', "
        f"'a photo of a circle to the left of a square', 'a photo of a red circle and a blue square' "
        f"(shapes {SHAPES}, colours {tuple(COLORS)})"
    )


def family_of(prompt: str) -> str:
    """The family of ``prompt`` (one of ``FAMILIES``); ``ValueError`` if it does not parse.

    Example::

        >>> family_of("a photo of four squares")
        'counting'
    """
    return parse_prompt(prompt).family


def _prompts_of_family(family: str) -> list[str]:
    pairs = list(itertools.permutations(SHAPES, 2))
    if family == "single_object":
        return [f"a photo of a {s}" for s in SHAPES]
    if family == "two_objects":
        return [f"a photo of a {a} and a {b}" for a, b in pairs]
    if family == "counting":
        return [f"a photo of {w} {s}s" for w in COUNT_WORDS for s in SHAPES]
    if family == "colors":
        return [f"a photo of a {c} {s}" for c in COLORS for s in SHAPES]
    if family == "position":
        return [f"a photo of a {a} {r} a {b}" for r in RELATIONS for a, b in pairs]
    if family == "color_attr":
        return [
            f"a photo of a {c1} {a} and a {c2} {b}"
            for c1, c2 in itertools.permutations(COLORS, 2)
            for a, b in pairs
        ]
    raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _split_family(family: str) -> tuple[list[str], list[str]]:
    """(train, heldout) prompts of one family; small families are shared by both splits."""
    prompts = _prompts_of_family(family)
    if len(prompts) < 8:
        return prompts, prompts
    n_heldout = round(len(prompts) / 4)
    heldout = set(sorted(prompts, key=_stable_hash)[:n_heldout])
    return [p for p in prompts if p not in heldout], [p for p in prompts if p in heldout]


_SPLIT_TABLE = {family: _split_family(family) for family in FAMILIES}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")


def _family_prompts(family: str, split: str | None) -> list[str]:
    _check_family(family)
    if split is None or split == "all":
        return _prompts_of_family(family)
    if split == "train":
        return list(_SPLIT_TABLE[family][0])
    if split == "heldout":
        return list(_SPLIT_TABLE[family][1])
    raise ValueError(f"unknown split {split!r}; choose 'train', 'heldout' or None (all prompts)")


def _check_families(families) -> tuple[str, ...]:
    """``families`` (None = all) as a non-empty tuple of known families, in the order given."""
    families = FAMILIES if families is None else tuple(families)
    if not families:
        raise ValueError(f"families must name at least one of {FAMILIES}, e.g. NOCOLOR_FAMILIES")
    for family in families:
        _check_family(family)
    return families


def all_prompts(split: str | None = None, families=None) -> list[str]:
    """Every prompt of ``split`` ("train", "heldout", or None for all) in ``families`` (None = all), grouped by family.

    Example::

        >>> len(all_prompts()), len(all_prompts("train")), len(all_prompts("heldout"))
        (126, 97, 38)
        >>> len(all_prompts("train", NOCOLOR_FAMILIES)), len(all_prompts("heldout", NOCOLOR_FAMILIES))
        (34, 17)
    """
    return [p for family in _check_families(families) for p in _family_prompts(family, split)]


def sample_prompt(
    rng: np.random.Generator, family: str | None = None, split: str | None = "train"
) -> str:
    """Draw a prompt: ``family`` uniformly among ``FAMILIES`` when None, then a prompt uniformly.

    Example::

        >>> sample_prompt(np.random.default_rng(0), family="colors")  # doctest: +SKIP
        'a photo of a green circle'
    """
    if family is None:
        family = FAMILIES[int(rng.integers(len(FAMILIES)))]
    prompts = _family_prompts(family, split)
    return prompts[int(rng.integers(len(prompts)))]


def heldout_prompts(n: int, seed: int = 0, families=None) -> list[str]:
    """``n`` evaluation prompts of ``families`` (None = all), balanced across them and deterministic in ``seed``.

    Families take turns in the given order; within a family the held-out prompts are visited in
    a seeded random order, cycling when ``n`` exceeds them, so ``n = 6 k`` gives ``k`` per family
    (of the 6 ``FAMILIES``).

    Example::

        >>> [family_of(p) for p in heldout_prompts(6)] == list(FAMILIES)
        True
        >>> [family_of(p) for p in heldout_prompts(4, families=NOCOLOR_FAMILIES)] == list(NOCOLOR_FAMILIES)
        True
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    families = _check_families(families)
    rng = np.random.default_rng(seed)
    orders = {f: [str(p) for p in rng.permutation(_family_prompts(f, "heldout"))] for f in families}
    out = []
    for i in range(n):
        family = families[i % len(families)]
        order = orders[family]
        out.append(order[(i // len(FAMILIES)) % len(order)])
    return out


def prompt_source(families=None, unseen_rewards=None) -> PromptSource:
    """The shapes world as a :class:`flowalign.prompts.PromptSource` (``prompts: shapes`` in a training config).

    Training prompts: the train split of ``families`` (None = all ``FAMILIES``), drawn as the world draws them (a
    family uniformly, then one of its prompts: :func:`sample_prompt`), the distribution the base model was
    pretrained on and the held-out evaluation is balanced by; uniform over the list would give color_attr 54 of
    the 97 prompts and two_objects 6. Held out: :func:`heldout_prompts` of the same families. Unseen rewards
    (None): the verifier (``shapes_binary``) and ``jpeg_compressibility``.

    Example::

        >>> source = prompt_source()
        >>> len(source.train), len(prompt_source(NOCOLOR_FAMILIES).train)
        (97, 34)
    """
    families = _check_families(families)
    train = all_prompts("train", families)
    of = [family_of(p) for p in train]
    sizes = {f: of.count(f) for f in families}
    return PromptSource(train, weights=[1.0 / (len(sizes) * sizes[f]) for f in of],
                        heldout=functools.partial(heldout_prompts, families=families),
                        unseen_rewards=list(unseen_rewards or ["shapes_binary", "jpeg_compressibility"]))


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``size x size`` mask of a shape filling its box (pixel centres are tested)."""
    c = (np.arange(size) + 0.5) / size  # pixel centres in (0, 1)
    y, x = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25  # disc of radius 1/2
    if shape == "triangle":
        return np.abs(x - 0.5) <= y / 2  # apex at the top centre, base along the bottom
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _relation_score(relation: str, box_a, box_b) -> float:
    """GenEval relative-position score of A vs B: > 0.5 means the relation holds (see docstring).

    ``box`` = (y0, x0, h, w, cy, cx) with centroid (cy, cx).
    """
    offset = np.array([box_a[5] - box_b[5], box_a[4] - box_b[4]], dtype=float)  # (dx, dy)
    dims = np.array([box_a[3] + box_b[3], box_a[2] + box_b[2]], dtype=float)
    norm = float(np.hypot(*offset))
    if norm == 0.0:
        return 0.0
    # Shrink each coordinate towards 0 by the dead zone, then normalise by the full offset.
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * dims, 0.0) * np.sign(offset) / norm
    dx, dy = revised
    return {"to the left of": -dx, "to the right of": dx, "above": -dy, "below": dy}[relation]


def _place(sizes: list[int], rng: np.random.Generator, tries: int = 200):
    """Top-left corners for boxes of the given sizes, non-overlapping with ``MIN_GAP``; or None."""
    boxes: list[tuple[int, int, int]] = []
    for s in sizes:
        for _ in range(tries):
            y0, x0 = (int(v) for v in rng.integers(1, IMAGE_SIZE - s, size=2))  # 1-pixel border
            if all(
                y0 + s + MIN_GAP <= by or by + bs + MIN_GAP <= y0 or x0 + s + MIN_GAP <= bx
                or bx + bs + MIN_GAP <= x0
                for by, bx, bs in boxes
            ):
                boxes.append((y0, x0, s))
                break
        else:
            return None
    return boxes


def render_objects(
    objects: list[tuple[str, str]], rng: np.random.Generator, relation: str | None = None
) -> np.ndarray:
    """Render ``[(shape, colour), ...]`` at random non-overlapping places: uint8 ``[32, 32, 3]``.

    With ``relation``, objects[0] <relation> objects[1] is enforced with a wide margin
    (relation score >= 0.7 instead of the verifier's 0.5).
    """
    lo, hi = SIZES_FEW if len(objects) <= 2 else SIZES_MANY
    while True:
        sizes = [int(s) for s in rng.integers(lo, hi + 1, size=len(objects))]
        boxes = _place(sizes, rng)
        if boxes is None:
            continue
        if relation is not None:
            (ya, xa, sa), (yb, xb, sb) = boxes[0], boxes[1]
            box_a = (ya, xa, sa, sa, ya + sa / 2, xa + sa / 2)
            box_b = (yb, xb, sb, sb, yb + sb / 2, xb + sb / 2)
            if _relation_score(relation, box_a, box_b) < 0.7:
                continue
        break
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for (shape, color), (y0, x0, s) in zip(objects, boxes):
        image[y0 : y0 + s, x0 : x0 + s][_shape_mask(shape, s)] = COLORS[color]
    return image


def render_prompt(prompt: str, rng: np.random.Generator) -> np.ndarray:
    """Render a ground-truth image of ``prompt``: ``np.uint8`` array ``[32, 32, 3]``.

    The scene holds exactly the named objects; unnamed colours are random. Deterministic in ``rng``.

    Example::

        >>> image = render_prompt("a photo of three triangles", np.random.default_rng(0))
        >>> image.shape, image.dtype
        ((32, 32, 3), dtype('uint8'))
    """
    spec = parse_prompt(prompt)
    color_names = list(COLORS)
    objects = []
    for obj in spec.objects:
        for _ in range(obj.count):
            color = obj.color or color_names[int(rng.integers(len(color_names)))]
            objects.append((obj.shape, color))
    return render_objects(objects, rng, relation=spec.relation)


# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------

_BG = np.asarray(BACKGROUND, dtype=np.float32) / 255.0
_COLOR_NAMES = tuple(COLORS)
# Palette directions bg - c: unit rows (cosine, projection) and their lengths (coverage alpha).
_DIRS = _BG[None, :] - np.asarray([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32) / 255.0
_UNIT_DIRS = _DIRS / np.linalg.norm(_DIRS, axis=1, keepdims=True)
_DIR_NORMS = np.linalg.norm(_DIRS, axis=1)
# 4-connectivity inside each image plane, no connection across the leading (image, colour) axes.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1, 1, :] = _STRUCTURE[1, :, 1] = True


@dataclass(frozen=True)
class DetectedObject:
    """One object found by the verifier: shape, colour, centroid and bounding box (pixels)."""

    shape: str
    color: str  # a COLORS name, or OTHER_COLOR
    area: int
    cy: float  # centroid, pixel-centre coordinates (row)
    cx: float  # centroid (column)
    y0: int  # bounding box top
    x0: int  # bounding box left
    h: int
    w: int


@dataclass
class Verification:
    """Verifier result: fraction of the prompt's checks satisfied, all of them, and each check."""

    fraction: float
    all_satisfied: bool
    checks: list[tuple[str, bool]]


def _shape_from_features(fill_ratio: float, skewness: float) -> str:
    """Shape from the bounding-box fill ratio and the row skewness (see the module docstring)."""
    if skewness < TRIANGLE_SKEWNESS:
        return "triangle"
    return "square" if fill_ratio > SQUARE_FILL_RATIO else "circle"


def _skewness(area, sum_y, sum_y2, sum_y3):
    """Skewness E[(y - m)^3] / var^1.5 from raw moment sums (arrays or floats)."""
    mean = sum_y / area
    var = sum_y2 / area - mean**2
    third = sum_y3 / area - 3 * mean * sum_y2 / area + 2 * mean**3
    return third / np.maximum(var, 1e-6) ** 1.5


def classify_shape(mask: np.ndarray) -> str:
    """Classify one object's boolean mask ``[H, W]`` as "circle", "square" or "triangle".

    Uses the same features as the verifier: the skewness of the mask's row coordinates (an
    upright triangle is bottom-heavy) and the fill ratio of its bounding box.

    Example::

        >>> c = (np.arange(10) + 0.5) / 10
        >>> y, x = np.meshgrid(c, c, indexing="ij")
        >>> classify_shape(np.abs(x - 0.5) <= y / 2), classify_shape((x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25)
        ('triangle', 'circle')
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError(
            f"expected a non-empty 2-D boolean mask, got shape {mask.shape} with {int(mask.sum())} pixels"
        )
    rows, cols = np.nonzero(mask)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    y = rows.astype(np.float64)
    skewness = _skewness(len(y), y.sum(), (y**2).sum(), (y**3).sum())
    return _shape_from_features(len(y) / (height * width), float(skewness))


def _to_float_batch(images) -> np.ndarray:
    """Images -> float32 numpy ``[B, H, W, 3]`` in [0, 1]; ValueError on bad shapes or values."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected a float tensor [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(f"expected a float tensor in [0, 1], got dtype {images.dtype}")
        array = images.detach().to("cpu", torch.float32).permute(0, 2, 3, 1).numpy()
    else:
        items = list(images)
        if not items:
            raise ValueError("got an empty list of images")
        return np.stack([_to_float_hwc(item) for item in items])
    _check_range(array)
    return array


def _check_range(array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if not array.size or (finite.all() and array.min() >= 0.0 and array.max() <= 1.0):
        return
    values = array[finite]
    low, high = (values.min(), values.max()) if values.size else (np.nan, np.nan)
    raise ValueError(
        f"image values must lie in [0, 1], got min {low:.4f} max {high:.4f} "
        f"({array.size - finite.sum()} NaN/inf values); clamp decoded images with .clamp(0, 1)"
    )


def _to_float_hwc(image) -> np.ndarray:
    """One image (uint8 HxWx3, float HxWx3 in [0, 1], float tensor [3, H, W], PIL) -> float HWC."""
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a tensor [3, H, W], got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise ValueError(f"expected a float tensor in [0, 1], got dtype {image.dtype}")
        array = image.detach().to("cpu", torch.float32).permute(1, 2, 0).numpy()
        _check_range(array)
        return array
    if not isinstance(image, np.ndarray):  # PIL.Image or anything array-like
        if hasattr(image, "convert"):
            image = image.convert("RGB")
        image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if np.issubdtype(image.dtype, np.floating):
        array = image.astype(np.float32)
        _check_range(array)
        return array
    raise ValueError(f"expected a uint8 or float image, got dtype {image.dtype}")


def _classify_pixels(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Step 1 of the verifier on a float ``[B, H, W, 3]`` batch: ``(colour index, foreground)``, flat ``[B*H*W]``;
    the index is into ``_COLOR_NAMES + (OTHER_COLOR,)`` (``len(_COLOR_NAMES)`` = off-palette)."""
    # bg - p = alpha * (bg - c) for a background / colour mix; project on every palette direction.
    diff = (_BG - batch).reshape(-1, 3)  # [N, 3]
    projection = diff @ _UNIT_DIRS.T  # [N, K] = |bg - p| * cos(angle to bg - c)
    best = projection.argmax(axis=1)  # largest cosine = largest projection (same |bg - p|)
    best_projection = projection[np.arange(len(best)), best]
    alpha = best_projection / _DIR_NORMS[best]  # coverage of the best colour
    norm = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    foreground = alpha > ALPHA_THRESHOLD
    best[best_projection <= MIN_COLOR_COSINE * norm] = len(_COLOR_NAMES)  # off-palette: "other"
    return best, foreground


def dominant_colors(images) -> list[str]:
    """The colour most of each image's foreground pixels have, classified as the verifier classifies them.

    Step 1 of the verifier (module docstring) names every foreground pixel's colour, a ``COLORS`` name or
    ``OTHER_COLOR``; an image's dominant colour is the one with the most foreground pixels (ties: ``COLORS``
    order, then "other"), ``NO_FOREGROUND`` ("none") when it has no foreground pixel. ``images``: what
    :func:`verify_batch` accepts (a float tensor ``[B, 3, H, W]`` in [0, 1], or a list of images).

    Example::

        >>> rng = np.random.default_rng(0)
        >>> two_red_one_blue = render_objects([("square", "red"), ("square", "red"), ("circle", "blue")], rng)
        >>> dominant_colors([two_red_one_blue, np.full((32, 32, 3), 255, np.uint8)])  # a white image: no foreground
        ['red', 'none']
    """
    batch = _to_float_batch(images)
    best, foreground = _classify_pixels(batch)
    n_colors = len(_COLOR_NAMES) + 1
    image_index = np.repeat(np.arange(batch.shape[0]), batch.shape[1] * batch.shape[2])
    # counts[b, c] = number of foreground pixels of image b classified as colour c
    counts = np.zeros((batch.shape[0], n_colors), dtype=np.int64)
    np.add.at(counts, (image_index[foreground], best[foreground]), 1)
    names = _COLOR_NAMES + (OTHER_COLOR,)
    return [names[int(row.argmax())] if row.any() else NO_FOREGROUND for row in counts]


def _detect(batch: np.ndarray) -> list[list[DetectedObject]]:
    """Objects of each image of a float ``[B, H, W, 3]`` batch in [0, 1]."""
    n_images, height, width, _ = batch.shape
    n_planes = len(_COLOR_NAMES) + 1  # palette colours, then OTHER_COLOR
    best, foreground = _classify_pixels(batch)
    # One plane per (image, colour); label them all in one call, no connections across planes.
    plane_index = np.arange(n_images)[:, None] * n_planes + best.reshape(n_images, -1)  # [B, H*W]
    planes = np.zeros((n_images * n_planes, height * width), dtype=bool)
    fg_pixels = np.flatnonzero(foreground)
    planes[plane_index.ravel()[fg_pixels], fg_pixels % (height * width)] = True
    labels, n_labels = ndimage.label(planes.reshape(-1, height, width), structure=_STRUCTURE)
    results: list[list[DetectedObject]] = [[] for _ in range(n_images)]
    if n_labels == 0:
        return results
    # Per-component moments from the foreground pixels only (planes are disjoint per pixel).
    pixel_labels = labels.reshape(n_images, n_planes, height * width).max(axis=1).ravel()[fg_pixels]
    rows = ((fg_pixels // width) % height).astype(np.float64)
    cols = (fg_pixels % width).astype(np.float64)
    area = np.bincount(pixel_labels, minlength=n_labels + 1)
    sum_y = np.bincount(pixel_labels, weights=rows, minlength=n_labels + 1)
    sum_x = np.bincount(pixel_labels, weights=cols, minlength=n_labels + 1)
    sum_y2 = np.bincount(pixel_labels, weights=rows**2, minlength=n_labels + 1)
    sum_y3 = np.bincount(pixel_labels, weights=rows**3, minlength=n_labels + 1)
    min_area = MIN_AREA * height * width / IMAGE_SIZE**2
    kept = np.flatnonzero(area >= min_area)
    kept = kept[kept > 0]
    skewness = _skewness(area[kept], sum_y[kept], sum_y2[kept], sum_y3[kept])
    boxes = ndimage.find_objects(labels)
    color_names = _COLOR_NAMES + (OTHER_COLOR,)
    for label, skew in zip(kept.tolist(), skewness.tolist()):
        plane, ys, xs = boxes[label - 1]
        h, w = ys.stop - ys.start, xs.stop - xs.start
        image_index, color_index = divmod(plane.start, n_planes)
        results[image_index].append(
            DetectedObject(
                shape=_shape_from_features(area[label] / (h * w), skew),
                color=color_names[color_index],
                area=int(area[label]),
                cy=float(sum_y[label] / area[label] + 0.5),  # pixel centres
                cx=float(sum_x[label] / area[label] + 0.5),
                y0=ys.start, x0=xs.start, h=h, w=w,
            )
        )
    return results


def detect_objects(image) -> list[DetectedObject]:
    """Objects found in one image (uint8 HxWx3, float HxWx3 / tensor [3, H, W] in [0, 1], or PIL).

    Example::

        >>> image = render_objects([("circle", "red")], np.random.default_rng(0))
        >>> [(o.shape, o.color) for o in detect_objects(image)]
        [('circle', 'red')]
    """
    return _detect(_to_float_hwc(image)[None])[0]


# ----------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------


def _box(obj: DetectedObject):
    return (obj.y0, obj.x0, obj.h, obj.w, obj.cy, obj.cx)


def _check(spec: PromptSpec, objects: list[DetectedObject]) -> Verification:
    """Evaluate the checks of ``spec`` (see the module docstring's table) on detected objects."""
    by_shape = {s: [o for o in objects if o.shape == s] for s in SHAPES}
    checks: list[tuple[str, bool]] = []
    for obj in spec.objects:
        checks.append((f"count({obj.shape})=={obj.count}", len(by_shape[obj.shape]) == obj.count))
    for obj in spec.objects:
        if obj.color is not None:
            ok = any(o.color == obj.color for o in by_shape[obj.shape])
            checks.append((f"color({obj.shape})=={obj.color}", ok))
    if spec.relation is not None:
        a, b = spec.objects
        ok = any(
            _relation_score(spec.relation, _box(oa), _box(ob)) > 0.5
            for oa in by_shape[a.shape]
            for ob in by_shape[b.shape]
        )
        checks.append((f"{a.shape} {spec.relation} {b.shape}", ok))
    expected_total = sum(obj.count for obj in spec.objects)
    checks.append((f"no other objects (total=={expected_total})", len(objects) == expected_total))
    n_ok = sum(ok for _, ok in checks)
    return Verification(n_ok / len(checks), n_ok == len(checks), checks)


def verify(image, prompt: str) -> Verification:
    """Verify one image against its prompt.

    ``image``: ``np.uint8`` HxWx3, float HxWx3 or float tensor ``[3, H, W]`` in [0, 1], or a PIL
    image. Returns ``Verification(fraction, all_satisfied, checks)``.

    Example::

        >>> rng = np.random.default_rng(0)
        >>> v = verify(render_prompt("a photo of a blue square", rng), "a photo of a blue square")
        >>> v.fraction, v.checks[1]
        (1.0, ('color(square)==blue', True))
    """
    spec = parse_prompt(prompt)
    return _check(spec, detect_objects(image))


def verify_batch(images, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a batch: ``(fraction [B], all_satisfied [B])`` as float32 tensors (reward use).

    ``images``: float tensor ``[B, 3, H, W]`` in [0, 1] or a list of images ``verify`` accepts
    (PIL, uint8 arrays...). Raises ``ValueError`` when ``len(prompts) != B`` or values leave [0, 1].

    Example::

        >>> prompts = heldout_prompts(4)
        >>> rng = np.random.default_rng(0)
        >>> images = [torch.from_numpy(render_prompt(p, rng)).permute(2, 0, 1) / 255 for p in prompts]
        >>> images = torch.stack(images)
        >>> fraction, ok = verify_batch(images, prompts)
        >>> ok.tolist()
        [1.0, 1.0, 1.0, 1.0]
    """
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of str (one per image), got a single str")
    batch = _to_float_batch(images)
    if len(prompts) != batch.shape[0]:
        raise ValueError(f"got {batch.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
    specs = [parse_prompt(p) for p in prompts]
    results = [_check(spec, objs) for spec, objs in zip(specs, _detect(batch))]
    fraction = torch.tensor([r.fraction for r in results], dtype=torch.float32)
    all_ok = torch.tensor([float(r.all_satisfied) for r in results], dtype=torch.float32)
    return fraction, all_ok


# ----------------------------------------------------------------------------------------------
# Data set
# ----------------------------------------------------------------------------------------------


class ShapesDataset(torch.utils.data.Dataset):
    """``size`` (image, prompt) pairs of the shapes world, deterministic per index.

    Item ``i`` uses ``np.random.default_rng([seed, i])``: a family uniformly among ``families``
    (default all), a prompt of ``split`` in it, and a ground-truth render. Items are dicts
    ``{"image": float tensor [3, 32, 32] in [0, 1], "prompt": str, "family": str}``.

    Example::

        >>> item = ShapesDataset(10, seed=0)[3]
        >>> item["image"].shape, verify(item["image"], item["prompt"]).all_satisfied
        (torch.Size([3, 32, 32]), True)
    """

    def __init__(self, size: int, seed: int = 0, split: str = "train", families=None):
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        families = tuple(FAMILIES if families is None else families)
        if not families:
            raise ValueError(f"families must name at least one of {FAMILIES}")
        for family in families:
            _check_family(family)
            if not _family_prompts(family, split):
                raise ValueError(f"family {family!r} has no prompts in split {split!r}")
        self.size, self.seed, self.split, self.families = size, seed, split, families

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for a data set of size {self.size}")
        index %= self.size
        rng = np.random.default_rng([self.seed, index])
        family = self.families[int(rng.integers(len(self.families)))]
        prompt = sample_prompt(rng, family=family, split=self.split)
        image = torch.from_numpy(render_prompt(prompt, rng)).permute(2, 0, 1).float() / 255.0
        return {"image": image, "prompt": prompt, "family": family}
