"""The point-to-point ring of `mmkernels.distributed`'s mode="ring" (siglip_loss: one pass;
clip_loss: two passes, the column statistics and then the gradients).

Every rank's block (its text embeddings, and whatever travels with them) passes once around the
ring of the group's ranks; each rank computes on each block while the next block travels, and what
it computes for a block (its gradient contributions, or its partial column statistics) travels on
around the ring to the block's owner, folded on the way (summed; CLIP's statistics merged). All
sends go to the next rank, r + 1, all receives come from the previous one, r - 1.

The schedule of rank r among W, blocks named by their owner q (q_k = r - k mod W):
- step k = 0 .. W-1 computes on block q_k: its own rows first, then r-1's, r-2's, ...
  Posted before the compute and waited for after it (so they overlap the compute):
  the rows of q_k to r+1 and those of q_{k+1} from r-1 (k < W-1); for the gradients (k >= 2), the
  sum so far for q_{k-1} to r+1 and the sum so far for q_k from r-1.
  Then: k = 0 keeps the contribution to its own rows; k = 1 starts the sum for q_1 with its
  contribution; k >= 2 adds its contribution to the sum received.
- step W (W > 1, gradients only): the sum for q_{W-1} = r + 1 goes home to r+1; this rank's own
  sum arrives from r-1 and is added to its own contribution.
A block of 0 rows sends nothing and is not computed on (every rank knows every block's size, so
senders and receivers skip the same messages). Each block's rows hop W-1 times (ranks q+1 .. q-1);
its gradient sum hops W-1 times (from q+1 to q-1, then home): per rank and call, the bytes of an
all_gather of the rows plus those of a ring reduce-scatter of their fp32 gradients, with every hop
but the last overlapped by compute. Memory: two blocks of rows and three fp32 blocks of
gradients at a time, O(max_q M_q · D), never the (N, D) gathered rows.

One direction, not both (open_clip's "bidir" sends blocks both ways, in half the steps): carried
along behind its block, each gradient sum ends one hop from its owner; with blocks going both ways
the sums of the two halves would end about W/2 hops from it.

torch.distributed.batch_isend_irecv runs the messages of a step (gloo: one thread per message;
NCCL: one group of sends and receives, on NCCL's stream, so the compute stream keeps running).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

ROWS_TAG = 0
GRAD_TAG = 1


class Message(NamedTuple):
    kind: str     # "rows" (a block's rows, the embeddings' dtype) or "grad" (a block's gradient sum, fp32;
                  # float64 for float64 rows)
    block: int    # the rank that owns the block
    send: bool    # True: to the next rank; False: from the previous one


class Step(NamedTuple):
    block: int | None   # whose rows this rank computes on; None: the last step (no compute)
    messages: tuple     # Messages posted before the compute, in this order; waited for after it
    fold: str | None    # what the contribution and the received sum become (see ring_schedule)


def ring_schedule(rank: int, sizes: tuple, gradients: bool) -> list:
    """Rank `rank`'s steps in the ring over blocks of `sizes[q]` rows (q = 0 .. W-1).

    fold: "own" keeps the contribution to the rank's own rows; "start" makes the contribution the
    sum to send on; "add" adds it to the sum received; "home" adds the sum received to "own"'s;
    None: nothing to keep (no gradients, or an empty block).
    """
    world = len(sizes)
    steps = []
    for k in range(world):
        q, q_next, q_prev = (rank - k) % world, (rank - k - 1) % world, (rank - k + 1) % world
        messages = []
        if k < world - 1:
            if sizes[q]:
                messages.append(Message("rows", q, True))
            if sizes[q_next]:
                messages.append(Message("rows", q_next, False))
        fold = None
        if gradients:
            if k >= 2 and sizes[q_prev]:
                messages.append(Message("grad", q_prev, True))
            if k >= 2 and sizes[q]:
                messages.append(Message("grad", q, False))
            if sizes[q]:
                fold = ("own", "start")[k] if k < 2 else "add"
        steps.append(Step(q if sizes[q] else None, tuple(messages), fold))
    if gradients and world > 1:
        last = (rank + 1) % world  # q_{W-1}: the next rank
        messages = ([Message("grad", last, True)] if sizes[last] else []) + (
            [Message("grad", rank, False)] if sizes[rank] else [])
        steps.append(Step(None, tuple(messages), "home" if sizes[rank] else None))
    return steps


def ring_pass(block, sizes: tuple, group, compute: Callable, *, gradients: bool, shapes: Callable | None = None,
              carry_shape: Callable | None = None, carry_dtype: torch.dtype | None = None,
              merge: Callable | None = None):
    """Run `compute(q, block_q)` on every rank's block (q's, own block first) as the blocks pass
    around the ring of `group`, the exchange of the next block overlapping each compute.

    block: this rank's block, a tensor (sizes[rank], D) or a tuple of tensors that travel together
        (e.g. text rows and their column log-sum-exps); compute receives block q in the same form.
        sizes[q] says whether block q holds anything (0: it is neither sent nor computed on).
    shapes: q -> the shapes of block q's tensors (default: (sizes[q], *trailing dims of the local
        tensor) for each); every rank must derive the same shapes. Tensors with no element are not
        sent (each side makes its own empty one).
    gradients: whether compute's results travel on to the block's owner, folded on the way:
        compute returns block q's contribution, shaped carry_shape(q) (default (sizes[q], D) of the
        first tensor), in carry_dtype (default the accumulation dtype: fp32, float64 for a float64
        first tensor, what the block functions return). merge(sum, contribution) -> sum folds two
        of them (default: the in-place sum, for gradient contributions; CLIP's column statistics
        merge by max and rescaled sums). Without gradients compute may return anything (ignored).
    Returns the fold over all ranks of the contributions to this rank's block, carry_shape(rank)
    in that dtype (gradients=True), else None. Every rank of the group must call it with the same
    sizes, shapes and gradients flag.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    single = isinstance(block, torch.Tensor)
    local = tuple(t.contiguous() for t in ((block,) if single else block))
    if shapes is None:
        shapes = lambda q: tuple((sizes[q], *t.shape[1:]) for t in local)  # noqa: E731
    if carry_shape is None:
        carry_shape = lambda q: (sizes[q], local[0].shape[1])  # noqa: E731
    if merge is None:
        merge = torch.Tensor.add_
    # The carried blocks received must have the dtype of those sent, or gloo aborts on the size.
    if carry_dtype is None:
        carry_dtype = torch.float64 if local[0].dtype == torch.float64 else torch.float32
    nxt, prv = (dist.get_global_rank(group, (rank + d) % world) for d in (1, -1))
    current = local
    own = outgoing = None
    for step in ring_schedule(rank, sizes, gradients):
        ops, incoming, incoming_sum = [], None, None
        for msg in step.messages:
            if msg.kind == "rows" and msg.send:
                ops += [dist.P2POp(dist.isend, t, nxt, group, ROWS_TAG + 2 * i)
                        for i, t in enumerate(current) if t.numel()]
            elif msg.kind == "rows":
                incoming = tuple(t.new_empty(shape) for t, shape in zip(local, shapes(msg.block)))
                ops += [dist.P2POp(dist.irecv, t, prv, group, ROWS_TAG + 2 * i)
                        for i, t in enumerate(incoming) if t.numel()]
            elif msg.send:
                if outgoing.numel():
                    ops.append(dist.P2POp(dist.isend, outgoing, nxt, group, GRAD_TAG))
            else:
                incoming_sum = local[0].new_empty(carry_shape(msg.block), dtype=carry_dtype)
                if incoming_sum.numel():
                    ops.append(dist.P2POp(dist.irecv, incoming_sum, prv, group, GRAD_TAG))
        works = dist.batch_isend_irecv(ops) if ops else []
        contribution = None if step.block is None else compute(step.block, current[0] if single else current)
        for work in works:
            work.wait()
        if step.fold == "own":
            own = contribution
        elif step.fold == "start":
            outgoing = contribution
        elif step.fold == "add":
            outgoing = merge(incoming_sum, contribution)
        elif step.fold == "home":
            own = merge(own, incoming_sum)
        else:
            outgoing = None
        current = incoming
    if gradients and own is None:  # this rank holds no rows
        own = local[0].new_zeros(carry_shape(rank), dtype=carry_dtype)
    return own
