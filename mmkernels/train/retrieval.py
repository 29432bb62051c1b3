"""Held-out retrieval: recall@K image->text and text->image from an (N, N) score matrix.

Pairs whose captions are the same text are one class: retrieving any image (or caption) of the
query's class counts as a hit, since no model can tell identical captions apart. Chance R@1 is
then about (class size) / N; with the synthetic data nearly every caption is unique.
"""
from __future__ import annotations

import torch

KS = (1, 5)


def recall_at_k(scores: torch.Tensor, captions: list[str], ks=KS) -> dict:
    """scores: (N, N), image i (rows) against caption j (columns); pair i is (image i, captions[i]).

    Returns {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5": fractions in [0, 1], "chance_r1", "n"}.
    """
    n = scores.shape[0]
    if scores.shape != (n, n) or len(captions) != n:
        raise ValueError(f"expected an (N, N) score matrix and N captions, got {tuple(scores.shape)} and {len(captions)}")
    ids = {}
    cls = torch.tensor([ids.setdefault(c, len(ids)) for c in captions])
    same = cls[:, None] == cls[None, :]  # (N, N): image i and caption j describe the same thing
    out = {"n": n}
    for name, s, hit in (("i2t", scores, same), ("t2i", scores.T, same.T)):
        ranked = s.float().cpu().argsort(dim=1, descending=True)
        hits = hit.gather(1, ranked)  # (N, N): whether the r-th retrieved item is right
        for k in ks:
            out[f"{name}_r{k}"] = hits[:, :min(k, n)].any(1).float().mean().item()
    out["chance_r1"] = same.float().sum(1).mean().item() / n
    return out
