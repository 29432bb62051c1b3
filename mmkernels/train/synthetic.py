"""The embedded data set: procedural, seeded scenes of coloured shapes with captions that describe them.

Each example is a pure function of (seed, split, index): a scene of 1 to `max_shapes` shapes, each
with a shape, a colour, a size and a position, rendered with numpy (no image library needed), a
caption ("a small red circle left of a large blue square with a green star"), and for the fusion
task the scene's regions: one per shape plus a few background regions, so that the number of
regions per image varies and padding is real. Each region has a box (x1, y1, x2, y2 in [0, 1]), a
feature vector (a fixed random "detector" embedding of the region's class plus noise) and a class
distribution (the detector's soft guess: most mass on the true class).

    data = SyntheticPairs(size=8192, seed=0, split="train", image_size=32, task="clip")
    example = data[i]        # Example(caption, image (3, H, W) uint8, regions None)
"""
from __future__ import annotations

import numpy as np
import torch

from mmkernels.train.examples import Example, Regions

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 220, 50),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "cyan": (40, 210, 220),
}
SIZES = ("small", "large")
PREFIXES = ("", "a picture of", "an image showing", "there is")
RELATIONS = ("left of", "right of", "above", "below")
# class 0 is the background; then one class per (shape, colour)
NUM_CLASSES = 1 + len(SHAPES) * len(COLORS)
SPLITS = {"train": 0, "heldout": 1}


def vocabulary() -> list[str]:
    """Every word a synthetic caption can contain (the word-level tokenizer's vocabulary)."""
    words = {"a", "an", "with", "and"}
    for phrase in PREFIXES + RELATIONS:
        words.update(phrase.split())
    words.update(SHAPES)
    words.update(COLORS)
    words.update(SIZES)
    return sorted(words)


def _describe(shape: dict) -> str:
    return f"a {SIZES[shape['size']]} {list(COLORS)[shape['color']]} {SHAPES[shape['shape']]}"


def _relation(a: dict, b: dict) -> str:
    dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]
    if abs(dx) >= abs(dy):
        return "left of" if dx > 0 else "right of"
    return "above" if dy > 0 else "below"


def caption_of(shapes: list[dict], prefix: int) -> str:
    """'[prefix] d1 [relation d2] [with d3 [and d4]]' for the scene's shapes, in their order."""
    parts = [PREFIXES[prefix]] if PREFIXES[prefix] else []
    parts.append(_describe(shapes[0]))
    if len(shapes) >= 2:
        parts += [_relation(shapes[0], shapes[1]), _describe(shapes[1])]
    if len(shapes) >= 3:
        parts += ["with", " and ".join(_describe(s) for s in shapes[2:])]
    return " ".join(parts)


def _inside(shape: dict, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels (pixel centres xs, ys in [0, 1]) the shape covers."""
    dx, dy, r = xs - shape["cx"], ys - shape["cy"], shape["r"]
    kind = SHAPES[shape["shape"]]
    if kind == "circle":
        return dx * dx + dy * dy <= r * r
    if kind == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    # triangle, apex up: rows from cy - r to cy + r, half width growing from 0 to r
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


class SyntheticPairs:
    """`size` procedural examples of one split; example i depends only on (seed, split, i).

    task "clip" renders images (3, image_size, image_size) uint8; task "fusion" builds regions
    (at most `max_regions` per image, `region_dim` features, NUM_CLASSES classes) and no image.
    """

    def __init__(self, size: int, seed: int, split: str, task: str, image_size: int = 32,
                 max_shapes: int = 4, max_regions: int = 8, region_dim: int = 32):
        if split not in SPLITS:
            raise ValueError(f"expected split in {tuple(SPLITS)}, got {split!r}")
        if max_regions < max_shapes:
            raise ValueError(f"expected max_regions >= max_shapes, got {max_regions} and {max_shapes}")
        self.size, self.seed, self.split, self.task = size, seed, split, task
        self.image_size, self.max_shapes = image_size, max_shapes
        self.max_regions, self.region_dim = max_regions, region_dim
        # the "detector": one fixed embedding per region class, the same for both splits
        detector = np.random.default_rng([seed, 7919])
        self.class_embedding = detector.standard_normal((NUM_CLASSES, region_dim)).astype(np.float32)
        coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
        self._ys, self._xs = np.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.size

    def _scene(self, rng: np.random.Generator) -> tuple[list[dict], int]:
        n = int(rng.choice(np.arange(1, self.max_shapes + 1),
                           p=_shape_count_probs(self.max_shapes)))
        # one shape per cell of a 2 x 2 (or 3 x 3) grid, jittered: shapes never hide each other
        grid = 2 if self.max_shapes <= 4 else 3
        cells = rng.permutation(grid * grid)[:n]
        shapes = []
        for cell in cells:
            size = int(rng.integers(2))
            r = (0.09 if size == 0 else 0.16) * 2 / grid
            cx = (cell % grid + 0.5) / grid + rng.uniform(-0.25, 0.25) / grid
            cy = (cell // grid + 0.5) / grid + rng.uniform(-0.25, 0.25) / grid
            shapes.append({"shape": int(rng.integers(len(SHAPES))), "color": int(rng.integers(len(COLORS))),
                           "size": size, "r": r, "cx": cx, "cy": cy})
        return shapes, int(rng.integers(len(PREFIXES)))

    def _render(self, shapes: list[dict], rng: np.random.Generator) -> torch.Tensor:
        image = np.empty((self.image_size, self.image_size, 3), dtype=np.float32)
        image[:] = rng.integers(0, 60, size=3)
        for shape in shapes:
            image[_inside(shape, self._xs, self._ys)] = list(COLORS.values())[shape["color"]]
        image += rng.normal(0, 6, size=image.shape)
        return torch.from_numpy(image.clip(0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous()

    def _regions(self, shapes: list[dict], rng: np.random.Generator) -> Regions:
        n_background = int(rng.integers(0, self.max_regions - len(shapes) + 1))
        boxes, classes = [], []
        for s in shapes:
            boxes.append([s["cx"] - s["r"], s["cy"] - s["r"], s["cx"] + s["r"], s["cy"] + s["r"]])
            classes.append(1 + s["shape"] * len(COLORS) + s["color"])
        for _ in range(n_background):
            x1, y1 = rng.uniform(0, 0.7, size=2)
            w, h = rng.uniform(0.1, 0.3, size=2)
            boxes.append([x1, y1, x1 + w, y1 + h])
            classes.append(0)
        boxes = np.clip(np.asarray(boxes, dtype=np.float32), 0.0, 1.0)
        classes = np.asarray(classes)
        features = self.class_embedding[classes] + 0.3 * rng.standard_normal(
            (len(classes), self.region_dim)).astype(np.float32)
        # the detector's soft guess: a confident logit on the true class over noisy others
        logits = rng.normal(0, 1, size=(len(classes), NUM_CLASSES))
        logits[np.arange(len(classes)), classes] += rng.uniform(2.0, 5.0, size=len(classes))
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        order = rng.permutation(len(classes))  # regions in no particular order, as a detector gives them
        return Regions(torch.from_numpy(features[order]), torch.from_numpy(boxes[order]),
                       torch.from_numpy(probs[order].astype(np.float32)))

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} examples")
        rng = np.random.default_rng([self.seed, SPLITS[self.split], index])
        shapes, prefix = self._scene(rng)
        caption = caption_of(shapes, prefix)
        if self.task == "fusion":
            return Example(caption=caption, image=None, regions=self._regions(shapes, rng))
        return Example(caption=caption, image=self._render(shapes, rng), regions=None)

    def describe(self) -> str:
        return (f"synthetic {self.split} split: {self.size} scenes of 1-{self.max_shapes} coloured shapes "
                f"(seed {self.seed})")


def _shape_count_probs(max_shapes: int) -> np.ndarray:
    # few one-shape scenes: their captions repeat often (64 combinations), which caps retrieval
    weights = np.array([1.0] + [2.5] * (max_shapes - 1))
    return weights / weights.sum()
