"""From examples to batches: the splits, the tokenizer, the batch order, collation.

    data = build_data(cfg, spec)                       # TrainData: train / held-out splits + tokenizer
    loader = batch_loader(data, cfg, start_step, stop_step, rank, world)
    for step, batch in loader: ...                     # batch: dict of CPU tensors for this rank

The batch order is a pure function of (seed, step): step s takes batch s % (n // B) of epoch
s // (n // B), whose order is a seeded permutation of the training examples. So the data position
is the step number, a resumed run reads exactly the batches it would have read, and every rank of
a multi-process run slices its rows out of the same global batch (rank r gets the r-th of
`world` near-equal parts, so one process with the global batch sees the same rows).

Batches (all CPU tensors; B rows, fixed shapes so that every step has one shape):
- input_ids, attention_mask: (B, L) int64, right-padded to the model's context length;
- clip task: pixels (B, 3, H, W) uint8 (scaled to [-1, 1] on the device, in the step);
- fusion task: region_feats (B, R, D) float32, region_boxes (B, R, 4) float32, region_valid (B, R)
  bool, region_lens (B,) int64, region_probs (B, R, K) float32 (K = 0 when the data has none),
  padded to R = the most regions one image has.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from mmkernels.train import synthetic
from mmkernels.train.folder import FolderPairs, Problem, Subset
from mmkernels.train.tokenizer import caption_tokenizer, encode, end_token_id, load_tokenizer, word_level_tokenizer


@dataclass
class TrainData:
    train: object                 # a sequence of Example
    heldout: object               # a sequence of Example
    tokenizer: object
    context_length: int
    max_regions: int = 0
    region_dim: int = 0
    num_region_classes: int = 0
    description: str = ""
    problems: list[Problem] = field(default_factory=list)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def end_id(self) -> int:
        return end_token_id(self.tokenizer)


def _split(n: int, heldout_size: int, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded random held-out subset of size heldout_size."""
    order = np.random.default_rng([seed, 104729]).permutation(n).tolist()
    return sorted(order[heldout_size:]), sorted(order[:heldout_size])


def build_data(cfg, spec) -> TrainData:
    """The training data `cfg` asks for: the synthetic scenes, or the pairs of cfg.data."""
    if cfg.data is None:
        kwargs = dict(seed=cfg.seed, task=cfg.task, image_size=spec.image_size)
        if cfg.task == "fusion":
            kwargs.update(max_regions=spec.max_regions, region_dim=spec.region_dim)
        train = synthetic.SyntheticPairs(cfg.train_size, split="train", **kwargs)
        heldout = synthetic.SyntheticPairs(cfg.eval_size, split="heldout", **kwargs)
        tok = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else word_level_tokenizer(synthetic.vocabulary())
        return TrainData(
            train, heldout, tok, spec.context_length,
            max_regions=spec.max_regions if cfg.task == "fusion" else 0,
            region_dim=spec.region_dim if cfg.task == "fusion" else 0,
            num_region_classes=synthetic.NUM_CLASSES if cfg.task == "fusion" else 0,
            description=f"{train.describe()}; held out: {heldout.size} more (seed {cfg.seed})",
        )
    pairs = FolderPairs(cfg.data, cfg.task, spec.image_size, cfg.bad_data)
    heldout_size = min(cfg.eval_size, len(pairs) // 5)
    train_idx, heldout_idx = _split(len(pairs), heldout_size, cfg.seed)
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:  # the training captions' words; a held-out word they lack is [UNK]
        tok = caption_tokenizer(pairs.caption(i) for i in train_idx)
    return TrainData(
        Subset(pairs, train_idx), Subset(pairs, heldout_idx), tok, spec.context_length,
        max_regions=pairs.max_regions, region_dim=pairs.region_dim, num_region_classes=pairs.num_region_classes,
        description=f"{pairs.describe()}: {len(train_idx)} to train on, {len(heldout_idx)} held out",
        problems=pairs.problems,
    )


class BatchOrder:
    """The global batch of each step: batch s % E of epoch s // E (E = n // batch_size), whose order
    is a permutation of range(n) seeded by (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise ValueError(f"the training split has {n} examples, fewer than --batch-size {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.batches_per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, 15485863, epoch]).permutation(self.n)
        return self._perm[k * self.batch_size:(k + 1) * self.batch_size].tolist()


def rank_slice(rows: int, rank: int, world: int) -> slice:
    """Rank `rank`'s part of `rows` global rows: near-equal contiguous parts, the first ones larger."""
    base, extra = divmod(rows, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def rank_sizes(rows: int, world: int) -> list[int]:
    """How many of `rows` global rows each rank holds."""
    return [rank_slice(rows, r, world).stop - rank_slice(rows, r, world).start for r in range(world)]


def collate(examples, data: TrainData) -> dict:
    """A batch dict (see the module docstring) from a list of Example."""
    ids, mask = encode(data.tokenizer, [e.caption for e in examples], data.context_length)
    batch = {"input_ids": ids, "attention_mask": mask}
    if examples and examples[0].image is not None:
        batch["pixels"] = torch.stack([e.image for e in examples])
    if examples and examples[0].regions is not None:
        B, R, D, K = len(examples), data.max_regions, data.region_dim, data.num_region_classes
        feats, boxes = torch.zeros(B, R, D), torch.zeros(B, R, 4)
        probs, lens = torch.zeros(B, R, K), torch.zeros(B, dtype=torch.int64)
        for i, e in enumerate(examples):
            n = e.regions.features.shape[0]
            feats[i, :n], boxes[i, :n], lens[i] = e.regions.features, e.regions.boxes, n
            if K:
                probs[i, :n] = e.regions.class_probs
        batch.update(region_feats=feats, region_boxes=boxes, region_lens=lens, region_probs=probs,
                     region_valid=torch.arange(R)[None, :] < lens[:, None])
    return batch


class _StepBatches(torch.utils.data.Sampler):
    """Yields this rank's example indices for each step in [start, stop)."""

    def __init__(self, order: BatchOrder, start: int, stop: int, rank: int, world: int):
        self.order, self.start, self.stop, self.rank, self.world = order, start, stop, rank, world

    def __iter__(self):
        for step in range(self.start, self.stop):
            rows = self.order.indices(step)
            yield rows[rank_slice(len(rows), self.rank, self.world)]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class _Collate:
    def __init__(self, data: TrainData):
        self.data = data

    def __call__(self, indices):
        return collate([self.data.train[i] for i in indices], self.data)


class _Fetch(torch.utils.data.Dataset):
    """Hands the batch sampler's index list through whole, so that collate sees one step's rows."""

    def __init__(self, data: TrainData):
        self.collate = _Collate(data)

    def __getitem__(self, indices):
        return self.collate(indices)

    def __len__(self) -> int:
        return len(self.collate.data.train)


def batch_loader(data: TrainData, order: BatchOrder, start: int, stop: int, rank: int = 0, world: int = 1,
                 workers: int = 0, pin_memory: bool = False):
    """An iterable of (step, batch) for steps start..stop-1; `workers` processes build batches ahead."""
    loader = torch.utils.data.DataLoader(
        _Fetch(data), sampler=_StepBatches(order, start, stop, rank, world), batch_size=None,
        num_workers=workers, pin_memory=pin_memory, persistent_workers=False,
    )
    return zip(range(start, stop), loader)


def heldout_batches(data: TrainData, batch_size: int):
    """The held-out split in order, as batches of at most batch_size rows."""
    for start in range(0, len(data.heldout), batch_size):
        yield collate([data.heldout[i] for i in range(start, min(start + batch_size, len(data.heldout)))], data)
