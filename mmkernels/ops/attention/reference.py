"""`cross_attention` in plain PyTorch: the CPU path and the tests' oracle (run in float64).

It computes in at least float32 (float64 stays float64) and relies on PyTorch's autograd for its
gradients. Inputs are assumed checked by the public function that calls it.
"""
from __future__ import annotations

import torch

from mmkernels.ops._common import reference_dtype


def cross_attention(
    q,
    k,
    v,
    kv_lens=None,
    q_lens=None,
    key_padding_mask=None,
    attn_mask=None,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale=None,
    dropout_keep=None,
    generator=None,
    compute_dtype=None,
) -> torch.Tensor:
    """softmax(scale · q @ k.T + attn_mask) @ v over the keys each query row attends, (B, H, Lq, d).

    q: (B, H, Lq, d); k, v: (B, H, Lk, d). The definition is `mmkernels.cross_attention`'s: keys at
    positions ≥ kv_lens[b] and rows at positions ≥ q_lens[b] ((B,) int) do not exist; an existing
    row attends the existing keys that key_padding_mask ((B, Lk) bool, True = padding), attn_mask
    (bool True = attend, or additive, -inf = removed; broadcastable to (B, H, Lq, Lk)) and
    is_causal (j ≤ i, top-left) leave it. A row that does not exist or attends no key returns zeros
    and passes no gradient, whatever its inputs hold; a row with a NaN score returns NaN. Dropout
    zeroes probabilities where `dropout_keep` ((B, H, Lq, Lk) bool) is False, drawn from `generator`
    when not given, and rescales the kept ones by 1 / (1 - dropout_p). Computes in `compute_dtype`
    (default float32, float64 for float64 inputs; the tests pass the inputs' dtype to get the plain
    eager formula); an additive mask is added in its own precision if that is wider.
    """
    dtype = compute_dtype or reference_dtype(q)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    batch, _, len_q, head_dim = q.shape
    len_k = k.shape[2]
    device = q.device
    scale = head_dim**-0.5 if scale is None else scale

    # Which keys each row attends, (B or 1, H or 1, Lq or 1, Lk), decided by lengths and masks only.
    attended = torch.ones(1, 1, 1, len_k, dtype=torch.bool, device=device)
    key_exists = None
    if kv_lens is not None:
        key_exists = torch.arange(len_k, device=device) < kv_lens.to(device).view(batch, 1, 1, 1)
        attended = attended & key_exists
    if key_padding_mask is not None:
        attended = attended & ~key_padding_mask.view(batch, 1, 1, len_k)
    if attn_mask is not None:
        attended = attended & (attn_mask if attn_mask.dtype == torch.bool else attn_mask != float("-inf"))
    if is_causal:
        attended = attended & torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril()
    row_attends = attended.any(dim=-1, keepdim=True)
    if q_lens is not None:
        row_exists = torch.arange(len_q, device=device) < q_lens.to(device).view(batch, 1, 1)
        row_attends = row_attends & row_exists[..., None]
    row_attends = row_attends.expand(-1, -1, len_q, 1)

    # What does not exist, and the queries of rows with no key, are replaced by zeros: a select, not
    # a product, so that a NaN there reaches nothing and their gradients are exactly zero.
    q = torch.where(row_attends, q, 0.0)
    if key_exists is not None:
        k = torch.where(key_exists.transpose(-1, -2), k, 0.0)
        v = torch.where(key_exists.transpose(-1, -2), v, 0.0)
    scores = (q @ k.transpose(-1, -2)) * scale
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        scores = scores + attn_mask
    scores = scores.masked_fill(~attended, float("-inf")).masked_fill(~row_attends, 0.0)
    probs = torch.softmax(scores, dim=-1).to(dtype)
    if dropout_p > 0:
        if dropout_keep is None:
            uniform = torch.rand(probs.shape, generator=generator, device=device, dtype=dtype)
            dropout_keep = uniform >= dropout_p
        probs = probs * dropout_keep / (1.0 - dropout_p)
    return torch.where(row_attends, probs @ v, 0.0)
