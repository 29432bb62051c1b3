"""What one training step computes, per task and variant, and the held-out retrieval scores.

    task = make_task(cfg, ctx)
    loss = task.loss(model, batch, variant, step)        # scalar; batch on the device
    scores = task.scores(model, batches)                 # (N images, N texts) for retrieval

Variants: "baseline" is the model's own code; "mmkernels" is the same model after
`mmkernels.patch(model, global_loss=True)` (done by the loop), and in the fusion task also
`mmkernels.region_mask` + `mmkernels.masked_region_loss` in place of the eager masking and losses.

Clip task. One process: `model(..., return_loss=True).loss`, the loss the model computes itself
(after the patch, mmkernels' contrastive loss). Several processes: the loss of the global batch:
the baseline gathers every rank's embeddings with gradient and evaluates the eager formula on the
whole N x N logit matrix (open_clip's `gather_with_grad=True`); mmkernels takes the patched
model's own `model(..., return_loss=True).loss`, which the patch's `global_loss=True` makes the
global batch's (computed with `mmkernels.distributed`). Both give the single-process loss and,
after DDP averages the gradients, the single-process update.

Fusion task (per step, the randomness is a function of (seed, step, rank) alone): half the pairs
get another row's caption (image-text matching, cross-entropy on the pooled output); about
`mask_prob` of each image's regions (at least one) are zeroed, and on the matched pairs the model
regresses their features (mean squared error) and predicts their class distribution (KL), both
averaged over the masked regions. Loss = ITM + MRFR + MRC (MRC when the data has class
distributions).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

import mmkernels
from mmkernels.train.data import rank_sizes

VARIANTS = ("baseline", "mmkernels")


def _step_generator(seed: int, step: int, rank: int, stream: int) -> torch.Generator:
    # a CPU generator per (seed, step, rank, stream): no generator state to carry across steps
    state = np.random.SeedSequence([seed, step, rank, stream]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def unwrap(model):
    """The model inside DDP and torch.compile wrappers."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def pixel_values(batch: dict, dtype: torch.dtype) -> torch.Tensor:
    return batch["pixels"].to(dtype) / 127.5 - 1.0


def _gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows of x (ranks may hold different numbers), concatenated, with gradient."""
    import torch.distributed.nn.functional as dist_fn

    pad = max(sizes) - x.shape[0]
    padded = F.pad(x, (0, 0, 0, pad)) if pad else x
    parts = dist_fn.all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def eager_clip_loss(image, text, logit_scale):
    """CLIPModel's formula: (CE(S) + CE(S.T)) / 2 with S = scale · text @ image.T."""
    logits = logit_scale * text @ image.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def eager_siglip_loss(image, text, logit_scale, logit_bias):
    """SiglipModel's formula: -Σ log σ(label · S) / N with S = scale · text @ image.T + bias."""
    logits = logit_scale * text @ image.T + logit_bias
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


class ClipTask:
    def __init__(self, cfg, ctx, input_dtype: torch.dtype):
        self.cfg, self.ctx, self.input_dtype = cfg, ctx, input_dtype

    def forward(self, model, batch: dict, return_loss: bool):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=pixel_values(batch, self.input_dtype), return_loss=return_loss)

    def loss(self, model, batch: dict, variant: str, step: int) -> torch.Tensor:
        if not self.ctx.distributed or variant == "mmkernels":
            return self.forward(model, batch, return_loss=True).loss
        out = self.forward(model, batch, return_loss=False)
        inner = unwrap(model)
        scale = inner.logit_scale.exp()
        image, text = out.image_embeds, out.text_embeds
        sizes = rank_sizes(self.cfg.batch_size, self.ctx.world)
        image, text = _gather_rows(image, sizes), _gather_rows(text, sizes)
        if self.cfg.loss == "siglip":
            return eager_siglip_loss(image, text, scale, inner.logit_bias)
        return eager_clip_loss(image, text, scale)

    @torch.no_grad()
    def scores(self, model, batches) -> torch.Tensor:
        """(N, N) cosine similarity of held-out image i and caption j."""
        images, texts = [], []
        for batch in batches:
            out = self.forward(model, batch, return_loss=False)
            images.append(out.image_embeds.float())
            texts.append(out.text_embeds.float())
        image, text = torch.cat(images), torch.cat(texts)
        return F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T


class FusionTask:
    def __init__(self, cfg, ctx, input_dtype: torch.dtype, num_region_classes: int):
        self.cfg, self.ctx, self.input_dtype = cfg, ctx, input_dtype
        self.num_region_classes = num_region_classes

    def _forward(self, model, input_ids, attention_mask, feats, batch):
        return model(input_ids, attention_mask, feats.to(self.input_dtype),
                     batch["region_boxes"].to(self.input_dtype), batch["region_valid"])

    def _negatives(self, batch: dict, step: int):
        """(caption row of each image (B,), matched (B,) bool): half the rows take another row's caption."""
        B = batch["input_ids"].shape[0]
        g = _step_generator(self.cfg.seed, step, self.ctx.rank, 0)
        swap = torch.rand(B, generator=g) < 0.5
        if B > 1:
            shift = torch.randint(1, B, (B,), generator=g)
        else:  # a lone row has no other caption to take
            swap, shift = torch.zeros(B, dtype=torch.bool), torch.zeros(B, dtype=torch.int64)
        rows = torch.arange(B)
        source = torch.where(swap, (rows + shift) % B, rows)
        device = batch["input_ids"].device
        return source.to(device), (~swap).to(device)

    def mask_regions(self, variant: str, batch: dict, step: int):
        """(masked features (B, R, D), selected (B, R) bool): about mask_prob of each image's existing
        regions, at least one per image that has any, replaced by zeros.

        baseline: UNITER's masking in plain PyTorch (a uniform draw per region, masked_fill);
        mmkernels: mmkernels.region_mask. The two draw different regions (torch.rand against
        region_mask's counter-based hash), so their loss curves agree in distribution, not step by step.
        """
        feats, valid = batch["region_feats"], batch["region_valid"]
        g = _step_generator(self.cfg.seed, step, self.ctx.rank, 1)
        if variant == "mmkernels":
            out = mmkernels.region_mask(feats, region_lens=batch["region_lens"], prob=self.cfg.mask_prob,
                                        mode="zero", generator=g)
            return out.features, out.mask
        B, R = valid.shape
        draw = torch.rand(B, R, generator=g).to(valid.device)
        selected = (draw < self.cfg.mask_prob) & valid
        fallback = draw.masked_fill(~valid, 2.0).argmin(1)  # the existing region with the smallest draw
        force = ~selected.any(1) & valid.any(1)
        selected = selected | (F.one_hot(fallback, R).bool() & force[:, None])
        return feats.masked_fill(selected[..., None], 0.0), selected

    def region_losses(self, variant: str, feature_pred, class_logits, target_feats, target_probs, on):
        """(MRFR, MRC) over the regions `on` (B, R) bool: the mean over them of the per-region mean
        squared feature error, and of KL(target_probs || softmax(class_logits)); 0 when none is on.
        MRC is 0 when the data has no class distributions."""
        if variant == "mmkernels":
            mrfr = mmkernels.masked_region_loss(feature_pred, target_feats.to(feature_pred.dtype), on, kind="mse")
            if not self.num_region_classes:
                return mrfr, 0.0
            return mrfr, mmkernels.masked_region_loss(class_logits, target_probs.to(class_logits.dtype), on, kind="kl")
        count = on.sum().clamp(min=1)
        mrfr = (((feature_pred.float() - target_feats.float()) ** 2).mean(-1) * on).sum() / count
        if not self.num_region_classes:
            return mrfr, 0.0
        kl = F.kl_div(F.log_softmax(class_logits.float(), -1), target_probs.float(), reduction="none").sum(-1)
        return mrfr, (kl * on).sum() / count

    def loss(self, model, batch: dict, variant: str, step: int) -> torch.Tensor:
        source, matched = self._negatives(batch, step)
        masked_feats, selected = self.mask_regions(variant, batch, step)
        feature_pred, class_logits, itm_logits = self._forward(
            model, batch["input_ids"][source], batch["attention_mask"][source], masked_feats, batch)
        itm = F.cross_entropy(itm_logits.float(), matched.long())
        mrfr, mrc = self.region_losses(variant, feature_pred, class_logits, batch["region_feats"],
                                       batch["region_probs"], selected & matched[:, None])
        return itm + mrfr + mrc

    @torch.no_grad()
    def scores(self, model, batches, pair_batch: int = 256) -> torch.Tensor:
        """(N, N) image-text matching score (matched minus mismatched logit) of image i with caption j,
        from the model run on every pair, unmasked."""
        rows = {}
        for batch in batches:
            for key, value in batch.items():
                rows.setdefault(key, []).append(value)
        batch = {key: torch.cat(value) for key, value in rows.items()}
        N = batch["input_ids"].shape[0]
        scores = torch.empty(N, N, device=batch["input_ids"].device)
        pairs = torch.arange(N * N, device=scores.device)
        for chunk in pairs.split(pair_batch):
            img, txt = chunk // N, chunk % N
            sub = {key: value[img] for key, value in batch.items()}
            _, _, itm = self._forward(model, batch["input_ids"][txt], batch["attention_mask"][txt],
                                      sub["region_feats"], sub)
            scores.view(-1)[chunk] = (itm[:, 1] - itm[:, 0]).float()
        return scores


def make_task(cfg, ctx, input_dtype: torch.dtype, num_region_classes: int = 0):
    if cfg.task == "fusion":
        return FusionTask(cfg, ctx, input_dtype, num_region_classes)
    return ClipTask(cfg, ctx, input_dtype)
