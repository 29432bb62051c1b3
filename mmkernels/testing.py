"""The eager baselines: what a user would run instead of mmkernels, in the inputs' dtype, written as
Hugging Face, open_clip, UNITER and LXMERT write them (the full N x N logits, eager attention, a
boolean-index gather). The tests hold each op to `docs/design.md`'s numerics rule against these
(error within 2x the baseline's, both against the float64 reference); the benchmarks time them as
the "eager" provider (and their torch.compile as "torch.compile").

    from mmkernels.testing import eager_clip_loss
    loss = eager_clip_loss(image_emb, text_emb, logit_scale)   # (N, D), (N, D), () -> ()
"""
import torch
import torch.nn.functional as F

__all__ = ["eager_attention", "eager_clip_loss", "eager_info_nce_loss", "eager_masked_region_loss",
           "eager_region_mask", "eager_siglip_loss"]


def eager_clip_loss(image_emb, text_emb, logit_scale, normalize=False, label_smoothing=0.0):
    """open_clip's ClipLoss / HF's clip_loss: (CE(S) + CE(S.T)) / 2, S = scale · a @ b.T."""
    a, b = image_emb, text_emb
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = logit_scale.to(a.dtype) * a @ b.T
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            + F.cross_entropy(logits.T, labels, label_smoothing=label_smoothing)) / 2


def eager_info_nce_loss(query, keys, logit_scale, normalize=False, label_smoothing=0.0):
    """One-directional InfoNCE as BridgeTower's contrastive head writes it: CE(S, arange(N)), S = scale · q @ k.T."""
    q, k = query, keys
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logits = logit_scale.to(q.dtype) * q @ k.T
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device), label_smoothing=label_smoothing)


def eager_siglip_loss(image_emb, text_emb, logit_scale, logit_bias, normalize=False):
    """HF's SiglipModel loss: -Σ log σ(label · S) / N, S = scale · a @ b.T + bias."""
    a, b = image_emb, text_emb
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    logits = logit_scale.to(a.dtype) * a @ b.T + logit_bias.to(a.dtype)
    labels = 2 * torch.eye(a.shape[0], dtype=a.dtype, device=a.device) - 1
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]


def eager_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None):
    """Hugging Face's eager attention: softmax(q·kᵀ·scale + mask) @ v in the inputs' dtype, with an
    additive (B, 1, Lq, Lk) mask as transformers builds it."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    if attn_mask is not None:
        scores = scores + attn_mask if attn_mask.dtype != torch.bool else scores.masked_fill(
            ~attn_mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return probs @ v


def eager_masked_region_loss(pred, target, mask, kind, beta=1.0, reduction="mean"):
    """UNITER / LXMERT: gather the selected regions, then the loss, averaged over them ("mean"),
    summed ("sum"), or scattered back to a (B, R) tensor with 0 elsewhere ("none")."""
    p, t = pred[mask], target[mask]
    if kind == "mse":
        per_region = F.mse_loss(p, t, reduction="none").mean(-1)
    elif kind == "smooth_l1":
        per_region = F.smooth_l1_loss(p, t, reduction="none", beta=beta).mean(-1)
    else:
        per_region = F.kl_div(F.log_softmax(p, dim=-1), t, reduction="none").sum(-1)
    if reduction == "mean":
        return per_region.mean()
    if reduction == "sum":
        return per_region.sum()
    return torch.zeros(mask.shape, dtype=per_region.dtype, device=mask.device).masked_scatter(mask, per_region)


def eager_region_mask(feats, lens, prob, mode, mask_embedding):
    """UNITER's _get_img_mask + _mask_img_feat ("zero"), and LXMERT's 80/10/10 random_feat split
    ("bert"), batched on the features' device. feats: (B, R, D), lens: (B,)."""
    batch, regions, dim = feats.shape
    valid = torch.arange(regions, device=feats.device)[None, :] < lens[:, None]
    mask = (torch.rand(batch, regions, device=feats.device) < prob) & valid
    # at least one masked region per sample: pick a random existing one where none was drawn
    none = ~mask.any(1) & (lens > 0)
    pick = (torch.rand(batch, device=feats.device) * lens).long()
    mask = mask | (F.one_hot(pick, regions).bool() & none[:, None])
    if mode == "zero":
        return torch.where(mask[..., None], mask_embedding, feats), mask
    action = torch.rand(batch, regions, device=feats.device)
    masked = mask & (action < 0.8)
    replaced = mask & (action >= 0.8) & (action < 0.9)
    out = torch.where(masked[..., None], mask_embedding, feats)
    existing = valid.flatten().nonzero().squeeze(1)
    n_replaced = int(replaced.sum())
    sources = existing[torch.randint(0, existing.numel(), (n_replaced,), device=feats.device)]
    out[replaced] = feats.reshape(-1, dim)[sources]
    return out, mask
