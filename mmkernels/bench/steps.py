"""One training step (or forward) per (case, provider): what each provider runs, and the work it counts.

    step, work = build_step(case, provider, device, dtype)   # step(): one synchronisable call

Every builder raises NotRun(reason) for a provider that cannot run here (a peer not installed, a
kernel that needs CUDA), so that the report lists it as "not run: <reason>" instead of dropping it.
Work is counted from what the operation needs, the same for every provider: matrix FLOPs for the
contrastive losses (6·N²·D: the logits and the two gradient products) and attention (4·d per valid
(query, key) pair forward, 8·d backward), bytes for the region ops.
"""
from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.ops._dispatch import resolve_backend
from mmkernels.testing import (eager_attention, eager_clip_loss, eager_info_nce_loss, eager_masked_region_loss,
                               eager_region_mask, eager_siglip_loss)

LOGIT_SCALE, LOGIT_BIAS = 14.3, -10.0
REGION_PROB = 0.15


class NotRun(Exception):
    """A provider that cannot run this case here; the message says why."""


def compile_options(device: torch.device) -> dict:
    """torch.compile's arguments: Inductor on CUDA; on the CPU, where Inductor's C++ build takes about a
    minute per graph, the aot_eager backend (Dynamo's capture and AOTAutograd, no code generation)
    with dynamic shapes, so that the CPU run stays short and still checks that the graph captures."""
    return {} if device.type == "cuda" else dict(backend="aot_eager", dynamic=True)


def _compiled(fn, device):
    return torch.compile(fn, **compile_options(device))


def _peer(module: str, package: str, device: torch.device):
    try:
        imported = importlib.import_module(module)
    except ImportError:
        raise NotRun(f"{package} is not installed (pip install {package})") from None
    if device.type != "cuda":
        raise NotRun(f"{package} runs on CUDA only")
    return imported


def _grad_step(forward, leaves, upstream_ones=False):
    def step():
        out = forward()
        grad_out = torch.ones_like(out) if upstream_ones else None
        return torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return step


# --------------------------------------------------------------------------- contrastive losses

_OURS = {"clip_loss": mmkernels.clip_loss, "siglip_loss": mmkernels.siglip_loss,
         "info_nce_loss": mmkernels.info_nce_loss}
_EAGER = {"clip_loss": eager_clip_loss, "siglip_loss": eager_siglip_loss, "info_nce_loss": eager_info_nce_loss}


def _contrastive_fn(provider, loss_name, device, group_ids=None):
    """A function of the leaves [image, text, log_scale, (bias)] that returns the loss (mmkernels'
    with group_ids when given)."""
    if provider == "siglip-kernel":
        fused = _peer("siglip_kernel", "siglip-kernel", device).fused_siglip_loss
        return lambda a, b, log_scale, bias: fused(a, b, log_scale, bias)
    if provider == "memeff":
        # memeff has a fixed temperature (no logit_scale gradient) and assumes normalised inputs
        # (they are): it is timed on what it computes.
        loss = _peer("memeff", "memeff", device).MemoryEfficientCLIPLoss(temperature=1 / LOGIT_SCALE,
                                                                          normalized_inputs=True)
        return lambda a, b, log_scale: loss(a, b)
    if provider == "inf-cl":
        one_way = _peer("inf_cl", "inf-cl", device).cal_inf_loss
        if loss_name == "info_nce_loss":
            return lambda a, b, log_scale: one_way(a, b, scale=log_scale.exp())
        return lambda a, b, log_scale: (one_way(a, b, scale=log_scale.exp()) + one_way(b, a, scale=log_scale.exp())) / 2
    fn = (_OURS if provider == "mmkernels" else _EAGER)[loss_name]

    groups = {} if group_ids is None else dict(group_ids=group_ids)

    def loss(a, b, log_scale, *bias):  # bias: SigLIP's only
        return fn(a, b, log_scale.exp(), *bias, **groups)
    return _compiled(loss, device) if provider == "torch.compile" else loss


def contrastive_step(case, provider, device, dtype):
    n, d = case.x_value, case.settings["D"]
    groups = case.settings.get("groups")  # each id on `groups` consecutive pairs
    group_ids = None if groups is None else torch.arange(n, device=device) // groups
    loss_fn = _contrastive_fn(provider, case.kernel, device, group_ids)
    gen = torch.Generator(device=device).manual_seed(0)
    image, text = (F.normalize(torch.randn(n, d, device=device, generator=gen), dim=-1).to(dtype).requires_grad_()
                   for _ in range(2))
    leaves = [image, text, torch.tensor(math.log(LOGIT_SCALE), device=device, requires_grad=True)]
    if case.kernel == "siglip_loss":
        leaves.append(torch.tensor(LOGIT_BIAS, device=device, requires_grad=True))
    return _grad_step(lambda: loss_fn(*leaves), leaves), dict(flops=6 * n * n * d)


# --------------------------------------------------------------------------- attention

def key_lengths(batch: int, length: int, padding: float) -> torch.Tensor:
    """(B,) key lengths evenly spread around L·(1 − padding), so that a fraction `padding` of the B·L
    keys is padding (up to rounding; at least one key per sample): the kept fractions cover
    1 − padding ± min(padding, 1 − padding) in B even steps."""
    width = 2 * min(padding, 1 - padding)
    fractions = (1 - padding) + width * (0.5 - (torch.arange(batch, dtype=torch.float64) + 0.5) / batch)
    return (fractions * length).round().clamp(min=1).long()


def attention_step(case, provider, device, dtype):
    s = case.settings
    batch, heads, head_dim, padding, length = s["B"], s["H"], s["d"], s["padding"], case.x_value
    padded = padding > 0
    kv_lens = key_lengths(batch, length, padding).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, device=device, generator=gen).to(dtype)
               for _ in range(3))
    keep = torch.arange(length, device=device)[None, :] < kv_lens[:, None]  # (B, Lk), True = real key
    leaves = [t.requires_grad_() for t in (q, k, v)]
    work = dict(flops=(4 + 8) * head_dim * heads * length * int(kv_lens.sum()))

    if provider == "mmkernels":
        lens = kv_lens if padded else None
        return _grad_step(lambda: mmkernels.cross_attention(*leaves, kv_lens=lens), leaves, True), work
    if provider in ("eager", "torch.compile"):
        additive = None
        if padded:
            additive = torch.zeros(batch, 1, 1, length, device=device, dtype=dtype)
            additive = additive.masked_fill(~keep[:, None, None, :], torch.finfo(dtype).min)
        attend = _compiled(eager_attention, device) if provider == "torch.compile" else eager_attention
        return _grad_step(lambda: attend(*leaves, attn_mask=additive), leaves, True), work
    if provider == "sdpa":
        mask = keep[:, None, None, :] if padded else None
        return _grad_step(lambda: F.scaled_dot_product_attention(*leaves, attn_mask=mask), leaves, True), work
    if provider == "flex":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError:
            raise NotRun("this torch has no FlexAttention") from None
        if device.type != "cuda":
            raise NotRun("FlexAttention has no backward on the CPU")
        flex = torch.compile(flex_attention)

        def forward():
            if not padded:
                return flex(*leaves)
            # new lengths every batch: building the block mask is part of the step
            block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx < kv_lens[b],
                                           batch, None, length, length, device=device)
            return flex(*leaves, block_mask=block_mask)
        return _grad_step(forward, leaves, True), work
    if provider == "varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            raise NotRun("this torch has no torch.nn.attention.varlen") from None
        if device.type != "cuda":
            raise NotRun("varlen_attn runs FlashAttention: CUDA only")
        # packed (total tokens, H, d) inputs, built outside the timed step
        q_packed = q.detach().transpose(1, 2).reshape(batch * length, heads, head_dim)
        k_packed, v_packed = (torch.cat([t.detach()[b, :, : kv_lens[b]].transpose(0, 1) for b in range(batch)])
                              for t in (k, v))
        packed = [t.contiguous().requires_grad_() for t in (q_packed, k_packed, v_packed)]
        zero = torch.zeros(1, dtype=torch.int32, device=device)
        cu_seq_q = torch.arange(batch + 1, dtype=torch.int32, device=device) * length
        cu_seq_k = torch.cat([zero, kv_lens.cumsum(0).to(torch.int32)])
        return _grad_step(lambda: varlen_attn(*packed, cu_seq_q, cu_seq_k, length, length), packed, True), work
    raise ValueError(f"unknown attention provider {provider!r}")


# --------------------------------------------------------------------------- region ops

def _region_backend(op, provider, x):
    """mmkernels = the Triton kernels, mmkernels-cuda = the C++ extension, mmkernels-torch = PyTorch."""
    backend = {"mmkernels": "triton", "mmkernels-cuda": "cuda", "mmkernels-torch": "torch"}[provider]
    try:
        return resolve_backend(op, backend, x)
    except (ValueError, TypeError, RuntimeError) as error:
        raise NotRun(str(error)) from None


def region_features(batch, regions, dim, device, dtype):
    """(B, R, D) features and (B,) region counts between min(10, R) and R."""
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(batch, regions, dim, generator=gen).to(device, dtype)
    lens = torch.randint(min(10, regions), regions + 1, (batch,), generator=gen).to(device)
    return feats, lens


def region_mask_step(case, provider, device, dtype):
    s = case.settings
    batch, regions, dim, mode = case.x_value, s["R"], s["D"], s["mode"]
    feats, lens = region_features(batch, regions, dim, device, dtype)
    mask_embedding = torch.randn(dim, device=device, dtype=dtype)
    work = dict(bytes=2 * feats.numel() * feats.element_size() + batch * regions)
    if provider == "eager":
        return lambda: eager_region_mask(feats, lens, REGION_PROB, mode, mask_embedding), work
    backend = _region_backend("region_mask", provider, feats)
    return (lambda: mmkernels.region_mask(feats, lens, prob=REGION_PROB, mode=mode, mask_embedding=mask_embedding,
                                          backend=backend)), work


def region_loss_step(case, provider, device, dtype):
    s = case.settings
    batch, regions, dim, kind = case.x_value, s["R"], s["D"], s["kind"]
    gen = torch.Generator().manual_seed(1)
    pred = torch.randn(batch, regions, dim, generator=gen).to(device, dtype).requires_grad_()
    target = torch.randn(batch, regions, dim, generator=gen)
    if kind == "kl":
        target = torch.softmax(target, dim=-1)
    target = target.to(device, dtype)
    feats, lens = region_features(batch, regions, 1, "cpu", torch.float32)
    mask = mmkernels.region_mask(feats, lens, prob=REGION_PROB, backend="torch").mask.to(device)
    element = pred.element_size()
    # the selected rows of pred and target read in the forward and again in the backward, the
    # gradient of pred written whole, the mask read twice
    work = dict(bytes=4 * int(mask.sum()) * dim * element + pred.numel() * element + 2 * mask.numel())
    if provider == "eager":
        return _grad_step(lambda: eager_masked_region_loss(pred, target, mask, kind), [pred]), work
    backend = _region_backend("masked_region_loss", provider, pred)
    return _grad_step(lambda: mmkernels.masked_region_loss(pred, target, mask, kind, backend=backend), [pred]), work
