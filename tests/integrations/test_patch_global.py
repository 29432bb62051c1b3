"""`mmkernels.patch(model, global_loss=True)` under torch.distributed: DDP over two gloo processes,
each holding its rows of one batch, trains as one process on the whole batch.

After the backward and DDP's averaging, every parameter's gradient, the loss (the same on both
processes) and the embeddings of each row meet the numerics rule (docs/design.md) against the
unpatched model run by one process on the concatenated batch (fp32 eager; its float64 copy the
oracle), for CLIPModel (unequal and equal local batches), SiglipModel, Siglip2Model, BlipModel,
FlavaForPreTraining (its global contrastive term) and BridgeTowerForContrastiveLearning; with
global_loss=False each process computes its local loss, as without the option (and the update is
then not the single-process one: the negative control). Without a process group global_loss=True
is the local loss. What `print(handle)` says about the loss in force.

Tiny random models, patched as tests/integrations/test_patch_hf.py patches them (attention too,
except BLIP's and FLAVA's hand-written attention), on the reference path; one spawned job runs
every case on one process group (spawning is the slow part), each case's result is then checked here.
DDP wraps a module returning the term under test and the embeddings, so that its reducer waits for
exactly the parameters that term reaches (FLAVA's output also holds its MLM, MIM, ITM and MMM heads).
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

pytest.importorskip("transformers")

import mmkernels  # noqa: E402
from test_patch_hf import build, cast, floor_sizes, inputs_for, patch_kwargs  # noqa: E402
from toolkit import (  # noqa: E402
    PICKLERS,
    assert_models_within_rule,
    bias_sizes,
    fresh_seed,
    model_outputs_and_grads,
    pickled_copy,
    run_ranks,
    use_path,
)

SPLITS = {"unequal": (3, 1), "equal": (2, 2)}  # rows per process of the 4-pair batch
EMBEDDINGS = {"bridgetower-contrastive": ("text_embeds", "image_embeds", "cross_embeds"), "flava": ()}
CASES = [("clip", "unequal"), ("clip", "equal"), ("siglip", "unequal"), ("siglip2", "unequal"), ("blip", "unequal"),
         ("flava", "unequal"), ("bridgetower-contrastive", "unequal")]
JOB_TIMEOUT_S = 240.0


class Objective(torch.nn.Module):
    """model(**inputs, return_loss=True) -> (the term under test, {name: embeddings (rows, D)})."""

    def __init__(self, name: str, model: torch.nn.Module):
        super().__init__()
        self.name, self.model = name, model

    def forward(self, **inputs):
        out = self.model(**inputs, return_loss=True)
        loss = out.loss_info.global_contrastive if self.name == "flava" else out.loss
        return loss, {k: out[k] for k in EMBEDDINGS.get(self.name, ("text_embeds", "image_embeds"))}


def make_model(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(name).eval()


def ddp_step(rank: int, name: str, sizes: tuple, seed: int, global_loss: bool) -> dict:
    """One forward and backward of DDP(the patched model) on this rank's rows of the batch."""
    model = make_model(name, seed)
    handle = mmkernels.patch(model, global_loss=global_loss, **patch_kwargs(name))
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    local = cast({k: v[rows] for k, v in inputs_for(name, seed).items()}, torch.float32)
    ddp = torch.nn.parallel.DistributedDataParallel(Objective(name, model), find_unused_parameters=True)
    loss, outputs = ddp(**local)
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
             for n, p in model.named_parameters()}
    return dict(loss=loss.detach(), outputs={k: v.detach() for k, v in outputs.items()}, grads=grads,
                printed=str(handle), fallbacks=dict(handle.fallbacks))


def flava_without_global_loss(rank: int, seed: int) -> dict:
    """FLAVA patched without global_loss under the process group: its own code for the call
    (it gathers the embeddings itself; equal local batches, as its own code needs)."""
    model = make_model("flava", seed)
    handle = mmkernels.patch(model, attention=False)
    local = cast({k: v[2 * rank: 2 * rank + 2] for k, v in inputs_for("flava", seed).items()}, torch.float32)
    model(**local)
    return dict(handle.fallbacks)


def job(rank: int, world_size: int, seed: int, cases: list) -> dict:
    os.environ["TRITON_INTERPRET"] = "0"  # the reference path
    results = {}
    for index, (name, split) in enumerate(cases):
        results[name, split] = ddp_step(rank, name, SPLITS[split], seed + index, global_loss=True)
    results["local"] = ddp_step(rank, "clip", SPLITS["unequal"], seed, global_loss=False)
    results["flava local"] = flava_without_global_loss(rank, seed)
    return results


@pytest.fixture(scope="module")
def outcome():
    seed = fresh_seed()
    return seed, run_ranks(job, 2, seed, CASES, timeout_s=JOB_TIMEOUT_S)


def single_process(name: str, seed: int):
    """The unpatched model on the whole batch in fp32 (eager) and float64 (the oracle), and floor sizes."""
    eager = make_model(name, seed)
    inputs = inputs_for(name, seed)

    def run(model):
        return Objective(name, model)(**cast(inputs, next(model.parameters()).dtype))

    sizes = {**bias_sizes(eager), **floor_sizes(eager)}
    return model_outputs_and_grads(eager, run), model_outputs_and_grads(copy.deepcopy(eager).double(), run), sizes


def gathered(ranks: list) -> tuple[dict, dict]:
    """(values, grads) as one process holds them: the loss, each embedding's rows in rank order, and
    the gradients after DDP's averaging (the same on every process)."""
    first, second = ranks
    assert torch.equal(first["loss"], second["loss"]), "the processes' losses differ"
    for name, grad in first["grads"].items():
        assert torch.equal(grad, second["grads"][name]), f"{name}: the processes' averaged gradients differ"
    outputs = {k: torch.cat([r["outputs"][k] for r in ranks]) for k in first["outputs"]}
    return {"loss": first["loss"], **outputs}, first["grads"]


@pytest.mark.parametrize("name,split", CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_ddp_gives_the_single_process_loss_and_gradients(outcome, name, split):
    seed, ranks = outcome
    seed += CASES.index((name, split))
    eager, oracle, sizes = single_process(name, seed)
    assert_models_within_rule(gathered([r[name, split] for r in ranks]), eager, oracle, torch.float32,
                              f"{name} (seed {seed})", sizes=sizes)
    for r in ranks:
        assert not r[name, split]["fallbacks"]
        assert "losses: global loss over the process group (world 2)" in r[name, split]["printed"]


def test_without_global_loss_each_process_has_its_local_loss(outcome, monkeypatch):
    """global_loss=False under the process group: each process's loss is the patched model's loss of
    its own rows, as in a process without a group; DDP's update is then not the single-process one."""
    use_path(monkeypatch, "reference")
    seed, ranks = outcome
    model = make_model("clip", seed)
    mmkernels.patch(model)
    inputs = inputs_for("clip", seed)
    for rank, r in enumerate(ranks):
        rows = slice(sum(SPLITS["unequal"][:rank]), sum(SPLITS["unequal"][: rank + 1]))
        local = model(**cast({k: v[rows] for k, v in inputs.items()}, torch.float32), return_loss=True).loss
        torch.testing.assert_close(r["local"]["loss"], local.detach(), rtol=1e-6, atol=1e-6)
        assert "losses: local loss: each process's own batch (global_loss=False)" in r["local"]["printed"]
    # Negative control: rank 0's loss and DDP's update against the single-process model's.
    values = {"loss": ranks[0]["local"]["loss"],
              **{k: torch.cat([r["local"]["outputs"][k] for r in ranks]) for k in ranks[0]["local"]["outputs"]}}
    eager, oracle, sizes = single_process("clip", seed)
    with pytest.raises(AssertionError, match="eager error"):
        assert_models_within_rule((values, ranks[0]["local"]["grads"]), eager, oracle, torch.float32,
                                  "clip, local loss", sizes=sizes)


def test_flava_without_global_loss_falls_back_under_a_process_group(outcome):
    _, ranks = outcome
    for r in ranks:
        assert r["flava local"] == {
            ("", "torch.distributed is initialized (FLAVA gathers the embeddings of every process)"): 1}


def test_without_a_process_group_global_loss_is_the_local_loss(monkeypatch):
    use_path(monkeypatch, "reference")
    assert not torch.distributed.is_initialized()
    seed = fresh_seed()
    inputs = cast(inputs_for("clip", seed), torch.float32)
    losses, printed = [], []
    for global_loss in (True, False):
        model = make_model("clip", seed)
        handle = mmkernels.patch(model, global_loss=global_loss)
        assert handle.options["global_loss"] is global_loss
        losses.append(model(**inputs, return_loss=True).loss)
        printed.append(str(handle))
    assert torch.equal(*losses)
    assert ("losses: local loss: global_loss=True, but no torch.distributed process group is initialised now"
            in printed[0])
    assert "losses: local loss: each process's own batch (global_loss=False)" in printed[1]


@pytest.mark.parametrize("how", PICKLERS)
def test_global_loss_is_an_option_copies_keep(how):
    model = make_model("siglip", fresh_seed())
    handle = mmkernels.patch(model, attention=False, global_loss=True)
    with pytest.raises(ValueError, match="already patched"):
        mmkernels.patch(model, attention=False)
    assert mmkernels.patch(model, **handle.options) is handle
    loaded = pickled_copy(model, how)
    assert loaded._mmkernels_handle.options == handle.options and loaded._mmkernels_handle.global_loss
    assert mmkernels.patch(loaded, **handle.options) is loaded._mmkernels_handle
    handle.undo()
    assert "(undone)" in str(handle)
    with pytest.raises(TypeError, match="expected global_loss to be a bool, got int"):
        mmkernels.patch(model, global_loss=1)
