"""A random sweep of cross_attention on both paths (the CPU reference and the Triton kernels) against
the float64 reference and the documented definition: random shapes, dtypes, masks of every kind,
lengths, causality, dropout, layouts, and NaN/Inf injected anywhere (inside and past the lengths,
in q, k, v and the additive mask). Each case prints nothing unless it fails; its seed is in the
failure report (replay with MMKERNELS_TEST_SEED=<seed>).

    MMKERNELS_SWEEP_CASES=500 pytest -m slow tests/ops/test_attention_sweep.py   # a longer sweep

CI runs the default budget (MMKERNELS_SWEEP_CASES, 20 cases): shapes stay within two blocks of
the interpreter's 32 × 32 tiles so that each case costs about a second.
"""
import os
import random

import pytest
import torch

from attention_checks import NONFINITE_WARNINGS, check_contract, keep_mask_for, on_path
from mmkernels.ops.attention import cross_attention
from toolkit import fresh_seed, needs_triton

SWEEP_CASES = int(os.environ.get("MMKERNELS_SWEEP_CASES", "20"))
NONFINITE = (float("nan"), float("inf"), float("-inf"))


def _lengths(rng: random.Random, batch: int, length: int) -> torch.Tensor:
    return torch.tensor([rng.choice([0, length, rng.randint(0, length)]) for _ in range(batch)])


def _attn_mask(rng: random.Random, gen: torch.Generator, kind: str, batch: int, heads: int, len_q: int, len_k: int):
    """A bool (True = attend) or additive mask of a random broadcastable shape, with fully masked rows,
    -inf holes and rows of finfo.min among its entries."""
    shape = rng.choice([(len_q, len_k), (batch, 1, len_q, len_k), (batch, heads, len_q, len_k), (1, heads, 1, len_k)])
    if kind == "bool":
        mask = torch.rand(shape, generator=gen) < rng.choice([0.3, 0.7, 0.95])
        if len_q > 1 and len(shape) >= 2 and shape[-2] == len_q:
            mask[..., rng.randrange(len_q), :] = False
        return mask
    mask = torch.randn(shape, generator=gen) * rng.choice([0.5, 3.0])
    mask[torch.rand(shape, generator=gen) < rng.choice([0.0, 0.2, 0.6])] = float("-inf")
    rows = list(range(shape[-2]))
    rng.shuffle(rows)
    mask[..., rows[0], :] = torch.finfo(torch.float32).min  # attends every key, uniformly
    if len(rows) > 1:
        mask[..., rows[1], :] = float("-inf")  # attends none
    return mask


def draw_case(rng: random.Random, gen: torch.Generator, device):
    batch, heads = rng.randint(1, 2), rng.randint(1, 2)
    len_q, len_k = rng.randint(1, 40), rng.randint(0, 40)
    head_dim = rng.choice([8, 16, 24, 32, 48])
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16])
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen) * rng.choice([0.5, 1.0, 3.0])
               for n in (len_q, len_k, len_k))
    args = {"is_causal": rng.random() < 0.3}
    if rng.random() < 0.5:
        args["kv_lens"] = _lengths(rng, batch, len_k)
    if rng.random() < 0.3:
        args["q_lens"] = _lengths(rng, batch, len_q)
    if rng.random() < 0.4:
        args["key_padding_mask"] = (torch.rand(batch, len_k, generator=gen) < rng.choice([0.2, 0.9])).to(device)
    mask_kind = rng.choice([None, "bool", "additive"])
    if mask_kind is not None:
        args["attn_mask"] = _attn_mask(rng, gen, mask_kind, batch, heads, len_q, len_k).to(device)
    if rng.random() < 0.2:
        args["scale"] = rng.choice([0.05, 1.0])
    if rng.random() < 0.6:  # NaN or ±Inf in one to three places, in range of the lengths or not
        targets = [q, k, v] + ([args["attn_mask"]] if mask_kind == "additive" else [])
        for _ in range(rng.randint(1, 3)):
            target = rng.choice(targets)
            if target.numel():
                target.view(-1)[rng.randrange(target.numel())] = rng.choice(NONFINITE)
    dropout_p = rng.choice([0.0, 0.0, 0.3])
    layout = rng.choice(["bhld", "blhd"])
    tensors = [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k, v)]
    return tensors, args, dtype, dropout_p, layout


@pytest.mark.slow
@needs_triton
@NONFINITE_WARNINGS
@pytest.mark.parametrize("index", range(SWEEP_CASES))
def test_random_case_on_both_paths_matches_the_definition(index, device):
    seed = fresh_seed()
    rng = random.Random(seed)
    (q, k, v), args, dtype, dropout_p, layout = draw_case(rng, torch.Generator().manual_seed(seed), device)
    # Triton's interpreter has no bf16 (those CPU tensors take the reference path): bf16 runs the
    # kernels on the GPU only.
    paths = ["reference"] if dtype == torch.bfloat16 and device.type == "cpu" else ["reference", "kernels"]
    for path in paths:
        generator_seed = rng.randrange(2**31)
        with on_path(path):
            inputs = (q, k, v) if layout == "bhld" else (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = cross_attention(*inputs, layout=layout, dropout_p=dropout_p,
                                  generator=torch.Generator(device=device).manual_seed(generator_seed), **args)
            out = out if layout == "bhld" else out.transpose(1, 2)
        keep = keep_mask_for(path, generator_seed, tuple(q.shape[:3]) + (k.shape[2],), dropout_p, device) \
            if dropout_p > 0 else None
        label = f"{path} {dtype} B,H,Lq,Lk,d={tuple(q.shape[:3]) + (k.shape[2], q.shape[3])} {layout} p={dropout_p} " \
                f"{ {n: (a.dtype, tuple(a.shape)) if torch.is_tensor(a) else a for n, a in args.items()} }"
        check_contract(q, k, v, args, out, dropout_keep=keep, dropout_p=dropout_p, label=label)
