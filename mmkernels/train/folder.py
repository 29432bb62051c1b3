"""`--data DIR`: image-caption pairs from a folder, checked before any training starts.

DIR holds the images (any format Pillow reads, in any sub-folder) and one captions file:

- `captions.jsonl`: one JSON object per line, `{"image": "cats/001.png", "caption": "a cat on a mat"}`;
- or `captions.csv`: a header line `image,caption`, then one pair per line (quote captions with commas).

Image paths are relative to DIR. For `--task fusion` each image has its regions in an `.npz` beside
it (`cats/001.npz` for `cats/001.png`) with `features` (R, D) float, `boxes` (R, 4) float in
[0, 1] as (x1, y1, x2, y2), and optionally `class_probs` (R, K) (a class distribution per region;
all files have it, or none). Every line is checked first: a missing or unreadable image, an empty
caption, a malformed line or region file is a `Problem` naming the file and line. With
`bad_data="skip"` the problems are reported and those pairs left out; with `"error"` the loop
refuses to start and lists them all.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from mmkernels.train.examples import Example, Regions

CAPTION_FILES = ("captions.jsonl", "captions.csv")
BAD_DATA_CHOICES = ("skip", "error")


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class DataError(ValueError):
    """Bad data with bad_data="error", or no usable pair at all; lists every problem found."""

    def __init__(self, message: str, problems: list[Problem]):
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{message}\n{lines}" if problems else message)
        self.problems = problems


def _caption_rows(path: str):
    """(line number, image path or None, caption or None, problem reason or None) per data line."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    yield number, None, None, f"not a JSON object ({err.msg})"
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("image"), str):
                    yield number, None, None, 'expected an object with a string "image" and a string "caption"'
                    continue
                caption = row.get("caption")
                yield number, row["image"], caption if isinstance(caption, str) else None, None
        return
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["image", "caption"]:
            yield 1, None, None, f"expected the header line 'image,caption', got {header!r}"
            return
        for row in reader:
            number = reader.line_num
            if not row or not any(cell.strip() for cell in row):
                continue
            if len(row) != 2:
                yield number, None, None, f"expected 2 fields (image, caption), got {len(row)}"
                continue
            yield number, row[0].strip(), row[1], None


def _load_image(path: str, size: int) -> torch.Tensor:
    """(3, size, size) uint8: the image decoded in full, in RGB, resized to size x size."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB").resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _load_regions(path: str) -> Regions:
    with np.load(path, allow_pickle=False) as z:
        if "features" not in z or "boxes" not in z:
            raise ValueError(f"expected arrays 'features' and 'boxes', found {sorted(z.files)}")
        feats = np.asarray(z["features"], dtype=np.float32)
        boxes = np.asarray(z["boxes"], dtype=np.float32)
        probs = np.asarray(z["class_probs"], dtype=np.float32) if "class_probs" in z else None
    if feats.ndim != 2 or feats.shape[0] == 0:
        raise ValueError(f"expected features of shape (R, D) with R >= 1, got {feats.shape}")
    if boxes.shape != (feats.shape[0], 4):
        raise ValueError(f"expected boxes of shape ({feats.shape[0]}, 4), got {boxes.shape}")
    if probs is not None and (probs.ndim != 2 or probs.shape[0] != feats.shape[0]):
        raise ValueError(f"expected class_probs of shape ({feats.shape[0]}, K), got {probs.shape}")
    for name, arr in (("features", feats), ("boxes", boxes), ("class_probs", probs)):
        if arr is not None and not np.isfinite(arr).all():
            raise ValueError(f"{name} has NaN or Inf values")
    if probs is not None and (probs.min() < 0 or not np.allclose(probs.sum(1), 1.0, atol=1e-3)):
        raise ValueError("class_probs rows must be distributions (non-negative, summing to 1)")
    return Regions(torch.from_numpy(feats), torch.from_numpy(boxes.clip(0.0, 1.0)),
                   None if probs is None else torch.from_numpy(probs))


class FolderPairs:
    """The usable pairs of a --data folder (see the module docstring), indexed 0..len-1.

    `problems` lists what was left out. `region_dim`, `num_region_classes` (0 without class_probs)
    and `max_regions` (the most regions of one image) describe the regions of the fusion task.
    """

    def __init__(self, root: str, task: str, image_size: int, bad_data: str = "skip"):
        if bad_data not in BAD_DATA_CHOICES:
            raise ValueError(f"expected bad_data in {BAD_DATA_CHOICES}, got {bad_data!r}")
        if not os.path.isdir(root):
            raise ValueError(f"expected --data to be a directory, got {root!r}")
        found = [name for name in CAPTION_FILES if os.path.exists(os.path.join(root, name))]
        if len(found) != 1:
            raise ValueError(
                f"expected exactly one of {', '.join(CAPTION_FILES)} in {root!r}, found {found or 'none'}"
            )
        self.root, self.task, self.image_size = root, task, image_size
        self.captions_file = os.path.join(root, found[0])
        self.problems: list[Problem] = []
        self.items: list[tuple[str, str]] = []  # (image path, caption)
        self.region_dim, self.num_region_classes, self.max_regions = 0, 0, 0
        self._check_all()
        if self.problems and bad_data == "error":
            raise DataError(f"{len(self.problems)} bad pair(s) in {self.captions_file} (--bad-data error):",
                            self.problems)
        if not self.items:
            raise DataError(f"no usable image-caption pair in {self.captions_file}:", self.problems)

    def _check_all(self) -> None:
        region_shapes: list[tuple[int, int, tuple[int, int]]] = []  # (line, index, (D, K))
        for number, image, caption, reason in _caption_rows(self.captions_file):
            problem = reason or self._check_pair(image, caption)
            if problem is None and self.task == "fusion":
                problem, shape = self._check_regions(image)
                if problem is None:
                    region_shapes.append((number, len(self.items), shape))
            if problem is not None:
                self.problems.append(Problem(self.captions_file, number, problem))
            else:
                self.items.append((os.path.join(self.root, image), caption))
        if region_shapes:
            self._check_region_shapes(region_shapes)

    def _check_pair(self, image: str, caption) -> str | None:
        if caption is None or not caption.strip():
            return f"empty caption for {image!r}"
        path = os.path.join(self.root, image)
        if not os.path.isfile(path):
            return f"image {image!r} not found"
        if self.task == "fusion":
            return None  # the fusion task reads the regions, not the pixels
        try:
            _load_image(path, self.image_size)
        except Exception as err:  # Pillow raises many types for a broken file; all mean "unreadable"
            return f"image {image!r} unreadable ({type(err).__name__}: {err})"
        return None

    def _check_regions(self, image: str):
        npz = os.path.join(self.root, os.path.splitext(image)[0] + ".npz")
        if not os.path.isfile(npz):
            return f"region file {os.path.relpath(npz, self.root)!r} not found", None
        try:
            regions = _load_regions(npz)
        except Exception as err:  # a truncated or foreign file: numpy raises several types
            return f"region file {os.path.relpath(npz, self.root)!r} unusable ({err})", None
        k = 0 if regions.class_probs is None else regions.class_probs.shape[1]
        self.max_regions = max(self.max_regions, regions.features.shape[0])
        return None, (regions.features.shape[1], k)

    def _check_region_shapes(self, region_shapes) -> None:
        """Every region file must share the feature width D and the class count K (the model's heads)."""
        first_line, _, (dim, classes) = region_shapes[0]
        bad = {index: (line, d, k) for line, index, (d, k) in region_shapes if (d, k) != (dim, classes)}
        for index in sorted(bad, reverse=True):
            line, d, k = bad[index]
            self.problems.append(Problem(
                self.captions_file, line,
                f"regions have D={d}, K={k}, unlike D={dim}, K={classes} of line {first_line}",
            ))
            del self.items[index]
        self.problems.sort(key=lambda p: p.line)
        self.region_dim, self.num_region_classes = dim, classes

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, index: int) -> str:
        return self.items[index][1]

    def __getitem__(self, index: int) -> Example:
        path, caption = self.items[index]
        if self.task == "fusion":
            return Example(caption=caption, image=None, regions=_load_regions(os.path.splitext(path)[0] + ".npz"))
        return Example(caption=caption, image=_load_image(path, self.image_size), regions=None)

    def describe(self) -> str:
        return f"{len(self.items)} pairs from {self.captions_file} ({len(self.problems)} left out)"


class Subset:
    """The examples of `data` at `indices` (a held-out or training split of a FolderPairs)."""

    def __init__(self, data, indices: list[int]):
        self.data, self.indices = data, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Example:
        return self.data[self.indices[index]]
