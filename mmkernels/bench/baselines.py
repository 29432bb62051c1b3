"""What a user would run instead of mmkernels: the formulas as Hugging Face, open_clip, UNITER and
LXMERT write them, in the inputs' dtype. The benchmarks time these as the "eager" provider (and
their torch.compile as "torch.compile")."""
import torch
import torch.nn.functional as F


def eager_clip_loss(image_emb, text_emb, logit_scale):
    """open_clip's ClipLoss / HF's clip_loss: (CE(S) + CE(S.T)) / 2, S = scale · a @ b.T."""
    logits = logit_scale.to(image_emb.dtype) * image_emb @ text_emb.T
    labels = torch.arange(image_emb.shape[0], device=image_emb.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def eager_info_nce_loss(query, keys, logit_scale):
    """One-directional InfoNCE as BridgeTower's contrastive head writes it: CE(S, arange(N)), S = scale · q @ k.T."""
    logits = logit_scale.to(query.dtype) * query @ keys.T
    return F.cross_entropy(logits, torch.arange(query.shape[0], device=query.device))


def eager_siglip_loss(image_emb, text_emb, logit_scale, logit_bias):
    """HF's SiglipModel loss: -Σ log σ(label · S) / N, S = scale · a @ b.T + bias."""
    logits = logit_scale.to(image_emb.dtype) * image_emb @ text_emb.T + logit_bias.to(image_emb.dtype)
    labels = 2 * torch.eye(image_emb.shape[0], dtype=image_emb.dtype, device=image_emb.device) - 1
    return -F.logsigmoid(labels * logits).sum() / image_emb.shape[0]


def eager_attention(q, k, v, attn_mask=None, scale=None):
    """Hugging Face's eager attention: softmax(q·kᵀ·scale + mask) @ v in the inputs' dtype, with an
    additive (B, 1, 1, Lk) padding mask as transformers builds it."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if attn_mask is not None:
        scores = scores + attn_mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def eager_masked_region_loss(pred, target, mask, kind):
    """UNITER / LXMERT: gather the selected regions with a boolean index, then the loss averaged over them."""
    p, t = pred[mask], target[mask]
    if kind == "mse":
        per_region = F.mse_loss(p, t, reduction="none").mean(-1)
    elif kind == "smooth_l1":
        per_region = F.smooth_l1_loss(p, t, reduction="none").mean(-1)
    else:
        per_region = F.kl_div(F.log_softmax(p, dim=-1), t, reduction="none").sum(-1)
    return per_region.mean()


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
