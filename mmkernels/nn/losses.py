"""Drop-in contrastive loss modules with open_clip's constructors and forwards.

An open_clip training script swaps its criterion in one line:

    criterion = mmkernels.nn.ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                                      rank=args.rank, world_size=args.world_size)
    criterion = mmkernels.nn.SigLipLoss(rank=args.rank, world_size=args.world_size, dist_impl="bidir")

`InfoNCELoss` is the one-directional loss (`mmkernels.info_nce_loss`), single process.

With world_size == 1 they compute the single-process loss with `mmkernels.clip_loss` /
`mmkernels.siglip_loss`; with world_size > 1 they run `mmkernels.distributed` over the process group
(no logit block in autograd, no N² communication) and return, for each flag combination, the value
and gradients open_clip returns for those flags (see each class).
"""
from __future__ import annotations

import torch
from torch import nn

from mmkernels.distributed.api import clip_loss_scaled, siglip_loss_scaled
from mmkernels.ops.contrastive import clip_loss, info_nce_loss, siglip_loss

__all__ = ["ClipLoss", "SigLipLoss", "InfoNCELoss"]

_SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
# open_clip's exchanges of the texts: "bidir" and "shift" pass them between neighbours (its memory
# holds a block at a time), "reduce" and "gather" collect all of them. The same function either way:
# the neighbour schemes take mmkernels.distributed's ring, the others its all_gather.
_SIGLIP_MODES = {"bidir": "ring", "shift": "ring", "reduce": "gather", "gather": "gather"}
_CLIP_MODES = ("gather", "ring")


def _check_rank_args(rank, world_size, use_horovod, cls: str) -> None:
    if use_horovod:
        raise ValueError(
            f"{cls}(use_horovod=True): mmkernels' distributed losses run on torch.distributed (gloo, NCCL), "
            "not Horovod; launch with torchrun and pass use_horovod=False"
        )
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected {name} to be an int, got {type(value).__name__}")
    if world_size < 1:
        raise ValueError(f"expected world_size >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def _group_matches(rank: int, world_size: int):
    """A check run on every rank with its input checks: the module's rank / world_size are the
    process group's (a mismatch, e.g. a node-local rank passed for the global one, raises on all)."""
    def check(group):
        actual = (torch.distributed.get_rank(group), torch.distributed.get_world_size(group))
        if (rank, world_size) != actual:
            raise ValueError(
                f"the loss was built with rank={rank}, world_size={world_size}, but this process is rank "
                f"{actual[0]} of a process group of {actual[1]}"
            )
    return check


def _with_zero_bias_grad(loss: torch.Tensor, logit_bias) -> torch.Tensor:
    """CLIP's cross-entropies are invariant to adding one constant to every logit, so logit_bias
    changes neither the value nor anything but its own gradient, which is exactly 0: keep it in the
    graph with that gradient (DDP expects every parameter that took part to get one)."""
    if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
        return loss + 0.0 * logit_bias.reshape(()).to(loss.dtype)
    return loss


class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE loss with open_clip's `ClipLoss` constructor and forward.

    ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
             use_horovod=False, *, normalize=False, label_smoothing=0.0, workspace_bytes=None, group=None,
             mode=None)

    forward(image_features (M, D), text_features (M, D), logit_scale, logit_bias=None, output_dict=False,
            group_ids=None, extra_text=None)
    -> () float32 loss, or {"contrastive_loss": loss} with output_dict. logit_scale is already
    exponentiated (open_clip passes `model.logit_scale.exp()`). Not open_clip's, as in
    `mmkernels.clip_loss`: group_ids (M,) int: pairs with the same id are positives of each other,
    each row's and column's target spread over its positives; extra_text (K, D): more text columns
    (hard negatives, NegCLIP), negatives of every image row in the image→text direction only. With
    world_size > 1 they are global, as in `mmkernels.distributed.clip_loss`: equal ids on two ranks
    are one group (every rank passes ids or none does), every rank's extra rows are negatives of
    every rank's images (K may differ between ranks); local_loss=True refuses both (open_clip's
    local loss has the diagonal's targets).

    world_size == 1: (CE(rows of S) + CE(columns of S)) / 2 with S = logit_scale · image @ text.T.
    world_size > 1 (a torch.distributed process group of that size, `group` or the world): each
    rank passes its M local pairs, and gets what open_clip gives for the same flags (L: the loss one
    process computes on the global batch of N = W·M pairs; W = world_size):
    - local_loss=False, gather_with_grad=False: value L; the local embeddings get dL/d(their
      rows) (open_clip's detached gather with the rank's own slot kept); logit_scale gets dL/ds.
    - local_loss=False, gather_with_grad=True: value L; embeddings W · dL/d(rows); logit_scale dL/ds.
    - local_loss=True, gather_with_grad=True: value open_clip's local loss, the mean cross-entropy of
      this rank's M rows and M columns of S (the ranks' values average to L); embeddings
      W · dL/d(rows), as open_clip's gathered gradients sum to; logit_scale W · this rank's share of
      dL/ds. The shares sum to dL/ds as open_clip's do, but split by rows of S rather than by
      open_clip's rows and columns, so one rank's logit_scale gradient differs from open_clip's
      while their sum (and DDP's average) is the same.
    - local_loss=True, gather_with_grad=False raises: open_clip differentiates there through detached
      copies of the other ranks' features, an approximation mmkernels does not compute; pass
      gather_with_grad=True (the same loss values, exact gradients).
    The ranks may hold different M except with local_loss=True (open_clip needs equal M throughout).
    How the texts travel (world_size > 1; the same values and gradients either way): `mode` "gather"
    (`mmkernels.distributed.clip_loss`'s all_gather: (N, D) texts per rank) or "ring" (its
    point-to-point ring: O(M·D) per rank); None (the default) picks by open_clip's flags: the ring
    for gather_with_grad=True, open_clip's setting for large global batches (with local_loss=True,
    the flags open_clip documents for memory linear in the batch; without it, the global loss), where
    open_clip keeps every rank's gathered features in autograd and the ring keeps one block at a time;
    the all_gather for gather_with_grad=False (open_clip's default, for small global batches, where
    its two collectives beat the ring's 2·(W-1) steps).
    `rank` and `world_size` must be the process group's; `cache_labels` has no effect (no labels
    tensor is built); `use_horovod=True` raises. `logit_bias` (open_clip adds it to every logit)
    leaves the value unchanged and gets a zero gradient. `normalize` and `label_smoothing` (not
    open_clip's; label smoothing not with local_loss=True) and `workspace_bytes` are as in
    `mmkernels.clip_loss`.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, normalize: bool = False,
                 label_smoothing: float = 0.0, workspace_bytes: int | None = None, group=None,
                 mode: str | None = None):
        super().__init__()
        _check_rank_args(rank, world_size, use_horovod, "ClipLoss")
        if mode is not None and mode not in _CLIP_MODES:
            raise ValueError(f"expected mode to be one of {_CLIP_MODES} or None, got {mode!r}")
        if world_size > 1 and local_loss and not gather_with_grad:
            raise ValueError(
                "ClipLoss(local_loss=True, gather_with_grad=False): open_clip differentiates this rank's local "
                "loss through detached copies of the other ranks' features, dropping every gradient term that "
                "flows through them; mmkernels computes exact gradients only. Pass gather_with_grad=True: the "
                "same loss values, with the exact gradient"
            )
        if world_size > 1 and local_loss and label_smoothing:
            raise ValueError(
                f"ClipLoss(local_loss=True, label_smoothing={label_smoothing}): open_clip's local loss has no "
                "label smoothing; use local_loss=False (the global loss) to smooth labels"
            )
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.normalize = normalize
        self.label_smoothing = label_smoothing
        self.workspace_bytes = workspace_bytes
        self.group = group
        self.mode = mode or ("ring" if gather_with_grad else "gather")

    def _scaling(self) -> str:
        if self.local_loss:
            return "open_clip_local_loss"
        return "open_clip_gather_with_grad" if self.gather_with_grad else "open_clip_detached"

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False, group_ids=None, extra_text=None):
        if self.world_size == 1:
            loss = clip_loss(image_features, text_features, logit_scale, normalize=self.normalize,
                             label_smoothing=self.label_smoothing, workspace_bytes=self.workspace_bytes,
                             group_ids=group_ids, extra_text=extra_text)
        else:
            loss = clip_loss_scaled(
                image_features, text_features, logit_scale, group=self.group, normalize=self.normalize,
                label_smoothing=self.label_smoothing, workspace_bytes=self.workspace_bytes,
                scaling=self._scaling(), mode=self.mode, group_ids_local=group_ids, extra_text_local=extra_text,
                caller="mmkernels.nn.ClipLoss",
                extra_checks=_group_matches(self.rank, self.world_size),
            )
        loss = _with_zero_bias_grad(loss, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, normalize={self.normalize}, label_smoothing={self.label_smoothing}, "
                f"mode={self.mode!r}")


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss with open_clip's `SigLipLoss` constructor and forward.

    SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None, chunk_size=0, *, bidir=None,
               use_horovod=False, normalize=False, workspace_bytes=None, group=None)

    forward(image_features (M, D), text_features (M, D), logit_scale, logit_bias, output_dict=False, group_ids=None)
    -> () float32 loss, or {"contrastive_loss": loss}; logit_bias None means 0. group_ids (M,) int
    (not open_clip's): label +1 for every pair with the same id (`mmkernels.siglip_loss(group_ids=)`);
    with world_size > 1 the ids are global, and every rank passes them or none does.

    world_size == 1: -Σ_ij log σ(label_ij · S_ij) / M with S = logit_scale · image @ text.T + logit_bias.
    world_size > 1: open_clip's value on every rank, its local rows against every rank's texts,
    -Σ_{i local, all j} log σ(label_ij · S_ij) / M_r, and open_clip's gradients: those of the sum of
    all ranks' values (its exchanges carry gradients back to the texts' owners), i.e. with equal M
    W · dL/d(rows) for the embeddings and W · this rank's share (its block row) of dL/dlogit_scale
    and dL/dlogit_bias, L being the single-process loss of the global batch. Unequal M_r are
    allowed (each rank's block then weighs N / M_r instead of W). Every `dist_impl` ("bidir",
    "shift", "reduce", "gather") gives the same function in open_clip, and the same result here.
    How the texts travel follows open_clip's choice: "bidir" (the default) and "shift", open_clip's
    exchanges between neighbouring ranks, run `mmkernels.distributed.siglip_loss(mode="ring")`
    (point-to-point, one text block of max M_r rows at a time, the next block's exchange overlapping
    the current one's compute, the text gradients summed around the ring back to their owners;
    O(M·D) memory instead of O(N·D) for the same bytes sent); "reduce" and "gather" run
    mode="gather" (one all_gather of the texts, one reduce-scatter of their gradients). open_clip's
    "bidir" sends the blocks both ways (half the steps); the ring sends them one way, so that each
    block's gradient sum, carried along behind it, ends one hop from its owner (see mmkernels.distributed.ring).
    `bidir` (older open_clip: True = "bidir", False = "shift") is accepted; `chunk_size` and
    `cache_labels` have no effect (no logit block and no labels tensor are built); `use_horovod=True`
    raises. `rank` and `world_size` must be the process group's.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 chunk_size: int = 0, *, bidir: bool | None = None, use_horovod: bool = False,
                 normalize: bool = False, workspace_bytes: int | None = None, group=None):
        super().__init__()
        _check_rank_args(rank, world_size, use_horovod, "SigLipLoss")
        if dist_impl is not None and dist_impl not in _SIGLIP_DIST_IMPLS:
            raise ValueError(f"expected dist_impl to be one of {_SIGLIP_DIST_IMPLS} or None, got {dist_impl!r}")
        if bidir is not None:
            implied = "bidir" if bidir else "shift"
            if dist_impl is not None and dist_impl != implied:
                raise ValueError(f"got bidir={bidir} (dist_impl {implied!r}) and dist_impl={dist_impl!r}: pass one")
            dist_impl = implied
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
            raise ValueError(f"expected chunk_size to be an int >= 0, got {chunk_size!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        self.chunk_size = chunk_size
        self.normalize = normalize
        self.workspace_bytes = workspace_bytes
        self.group = group

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale, logit_bias,
                output_dict: bool = False, group_ids=None):
        if logit_bias is None:
            logit_bias = 0.0
        if self.world_size == 1:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, normalize=self.normalize,
                               workspace_bytes=self.workspace_bytes, group_ids=group_ids)
        else:
            loss = siglip_loss_scaled(
                image_features, text_features, logit_scale, logit_bias, group=self.group, normalize=self.normalize,
                workspace_bytes=self.workspace_bytes, scaling="open_clip_siglip", mode=_SIGLIP_MODES[self.dist_impl],
                group_ids_local=group_ids, caller="mmkernels.nn.SigLipLoss",
                extra_checks=_group_matches(self.rank, self.world_size),
            )
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, "
                f"normalize={self.normalize}")


class InfoNCELoss(nn.Module):
    """One-directional InfoNCE, `mmkernels.info_nce_loss` as a module (single process).

    InfoNCELoss(*, normalize=False, label_smoothing=0.0, workspace_bytes=None)

    forward(query (N, D), keys (N, D), logit_scale, group_ids=None, extra_keys=None) -> () float32:
    mean_i CE(S_i, i) with S = logit_scale · query @ keys.T (key i is query i's positive); logit_scale
    already exponentiated. group_ids (N,) int: the keys with the query's id are its positives, its
    target spread over them; extra_keys (K, D): more keys, negatives of every query
    (`mmkernels.info_nce_loss(group_ids=, extra_keys=)`).
    """

    def __init__(self, *, normalize: bool = False, label_smoothing: float = 0.0, workspace_bytes: int | None = None):
        super().__init__()
        self.normalize = normalize
        self.label_smoothing = label_smoothing
        self.workspace_bytes = workspace_bytes

    def forward(self, query: torch.Tensor, keys: torch.Tensor, logit_scale, group_ids=None,
                extra_keys=None) -> torch.Tensor:
        return info_nce_loss(query, keys, logit_scale, normalize=self.normalize,
                             label_smoothing=self.label_smoothing, workspace_bytes=self.workspace_bytes,
                             group_ids=group_ids, extra_keys=extra_keys)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}, label_smoothing={self.label_smoothing}"
