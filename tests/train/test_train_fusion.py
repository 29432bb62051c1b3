"""`--task fusion`: LXMERT with masked region modeling over padded regions and image-text matching;
the eager (baseline) and mmkernels masking and region losses compute the same function."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import mmkernels
from mmkernels.train import run
from mmkernels.train.tasks import FusionTask
from toolkit import assert_within_rule, fresh_seed, seeded_generator, value_and_grads


def _task(num_classes: int, mask_prob: float = 0.3, seed: int = 0) -> FusionTask:
    cfg = SimpleNamespace(seed=seed, mask_prob=mask_prob)
    return FusionTask(cfg, SimpleNamespace(rank=0, distributed=False), torch.float32, num_classes)


def _region_batch(B=6, R=7, D=16, K=5):
    g = seeded_generator()
    lens = torch.randint(0, R + 1, (B,), generator=g)
    lens[0], lens[1] = 0, R  # a sample with no region, one with all of them
    valid = torch.arange(R)[None, :] < lens[:, None]
    feats = torch.randn(B, R, D, generator=g) * valid[..., None]
    probs = torch.softmax(torch.randn(B, R, K, generator=g), -1) * valid[..., None]
    return {"region_feats": feats, "region_valid": valid, "region_lens": lens, "region_probs": probs}


def test_fusion_task_runs_both_variants_with_masking_and_padded_regions(tmp_path, reference_path):
    report = run(["--task", "fusion", "--model", "tiny", "--steps", "6", "--batch-size", "16", "--eval-size", "12",
                  "--seed", str(fresh_seed() % 10_000), "--out", str(tmp_path / "run")])
    for name in ("baseline", "mmkernels"):
        v = report["variants"][name]
        assert len(v["losses"]) == 6 and all(torch.isfinite(torch.tensor(v["losses"])))
        assert v["retrieval"]["n"] == 12
    patched = report["variants"]["mmkernels"]["patched"]
    assert patched.startswith("mmkernels.patch(FusionPretrainer): ") and int(patched.split(": ")[1].split()[0]) > 0
    assert "agree in distribution, not step by step" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.parametrize("variant", ["baseline", "mmkernels"])
def test_masking_selects_only_existing_regions_at_least_one_each(variant):
    batch = _region_batch()
    task = _task(5, mask_prob=0.2, seed=fresh_seed())
    masked, selected = task.mask_regions(variant, batch, step=3)
    valid = batch["region_valid"]
    assert not (selected & ~valid).any(), "a padding region was selected"
    assert torch.equal(selected.any(1), valid.any(1)), "an image with regions has none masked"
    assert torch.equal(masked[selected], torch.zeros_like(masked[selected]))
    assert torch.equal(masked[~selected], batch["region_feats"][~selected])
    again, selected_again = task.mask_regions(variant, batch, step=3)
    assert torch.equal(selected, selected_again) and torch.equal(masked, again)  # a function of the step


def test_eager_masking_applies_a_selection_as_region_mask_does():
    batch = _region_batch()
    out = mmkernels.region_mask(batch["region_feats"], region_lens=batch["region_lens"], prob=0.3, mode="zero",
                                generator=seeded_generator())
    eager = batch["region_feats"].masked_fill(out.mask[..., None], 0.0)
    assert torch.equal(out.features, eager)


@pytest.mark.parametrize("kind", ["features", "classes"])
def test_region_losses_of_both_variants_are_one_function(kind, reference_path):
    batch = _region_batch()
    B, R, D = batch["region_feats"].shape
    K = batch["region_probs"].shape[-1]
    g = seeded_generator()
    on = batch["region_valid"] & (torch.rand(B, R, generator=g) < 0.5)
    on[2] = False  # a sample with no masked region
    feature_pred, class_logits = torch.randn(B, R, D, generator=g), torch.randn(B, R, K, generator=g)
    pred = feature_pred if kind == "features" else class_logits
    task = _task(K)
    index = 0 if kind == "features" else 1

    def loss_of(variant, mask):
        def fn(p):
            other = (class_logits if kind == "features" else feature_pred).to(p.dtype)
            preds = (p, other) if kind == "features" else (other, p)
            return task.region_losses(variant, *preds, batch["region_feats"].to(p.dtype),
                                      batch["region_probs"].to(p.dtype), mask)[index]
        return fn

    got = value_and_grads(loss_of("mmkernels", on), [pred])
    eager = value_and_grads(loss_of("baseline", on), [pred])
    oracle = value_and_grads(loss_of("baseline", on), [pred.double()])
    for name, a, b, c in zip(("loss", "grad"), got, eager, oracle):
        assert_within_rule(f"{kind} {name}", a, b, c, torch.float32)
    # negative control: the mask dropped (every existing region counted) fails the comparison
    broken = value_and_grads(loss_of("mmkernels", batch["region_valid"]), [pred])
    with pytest.raises(AssertionError):
        for name, a, b, c in zip(("loss", "grad"), broken, eager, oracle):
            assert_within_rule(f"{kind} {name}", a, b, c, torch.float32)
