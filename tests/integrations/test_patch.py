"""`mmkernels.patch`: the machinery (handle, undo, strict, the patcher registry) and the
nn.MultiheadAttention patch, on plain modules and an open_clip-shaped CLIP built from
nn.MultiheadAttention blocks.

Every comparison is the numerics rule (docs/design.md): the patched model in fp32 against the unpatched model in
fp32 (eager), both measured against the unpatched model's float64 copy (the oracle), for every
output and every parameter's gradient. Each runs once on the reference path (TRITON_INTERPRET=0)
and once on the Triton kernels under the interpreter; negative controls drop a mask and show that
the same comparison fails.
"""
import ast
import copy
import inspect
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmkernels
from mmkernels.integrations import patching
from mmkernels.integrations.patching import StrictPatchError, call_original, register_patcher
from toolkit import PICKLERS, compare_patched, eager_clip_loss, fresh_seed, pickled_copy, use_path


@pytest.fixture
def path(kernel_path, monkeypatch):
    """(path name, reference-op calls): kernel_path's path for CPU fp32 tensors, each reference-op call recorded."""
    return kernel_path.name, use_path(monkeypatch, kernel_path.name)


def compare(make_model, run, path, patch_kwargs=None, *, got_run=None):
    """`compare_patched` with mmkernels.patch(**patch_kwargs). A `logit_scale`'s gradient
    Σ_ij G_ij·S_ij (G = dL/dS) cancels: its floor scales with Σ|G_ij·S_ij| <= 2·exp(logit_scale) for
    CLIP's loss on normalised embeddings (Σ|G| <= 2, |S_ij| <= exp(logit_scale))."""
    def sizes(model):
        scale = getattr(model, "logit_scale", None)
        return {"grad logit_scale": 2 * scale.detach().exp().item()} if isinstance(scale, torch.Tensor) else {}

    return compare_patched(make_model, run, lambda m: mmkernels.patch(m, **(patch_kwargs or {})), *path,
                           got_run=got_run, sizes=sizes)


# --------------------------------------------------------------------------- nn.MultiheadAttention


class MHAHolder(nn.Module):
    """One nn.MultiheadAttention called as `call(mha, x, context)` says."""

    def __init__(self, call, **mha_kwargs):
        super().__init__()
        self.call = call
        self.mha = nn.MultiheadAttention(**mha_kwargs)

    def forward(self, x, context):
        return self.call(self.mha, x, context)


B, L, S, E, H = 3, 5, 6, 32, 2


def lengths_mask(lengths, length, padding=True):
    """(B, length) bool: True past each length (padding) or, with padding=False, True on the kept keys."""
    past = torch.arange(length)[None, :] >= torch.tensor(lengths)[:, None]
    return past if padding else ~past


KEY_PAD = lengths_mask([6, 3, 1], S)
CAUSAL = torch.full((L, L), float("-inf")).triu(1)


def additive(mask):
    return torch.zeros(mask.shape).masked_fill(mask, float("-inf"))


def random_bool_mask(x):
    """(B·H, L, S) bool, True = not allowed, drawn from the input's values (the same in every dtype);
    key 0 is always allowed."""
    draw = x.detach().float()[:, :, :S].reshape(B, 1, L, S).expand(B, H, L, S).reshape(B * H, L, S)
    return (draw > 0.3).index_fill(-1, torch.tensor([0]), False)


MHA_CASES = {
    "self, batch_first, bool key padding": (
        dict(embed_dim=E, num_heads=H, batch_first=True),
        lambda m, x, c: m(c, c, c, key_padding_mask=KEY_PAD, need_weights=False)[0]),
    "sequence first, causal additive attn_mask (open_clip text)": (
        dict(embed_dim=E, num_heads=H),
        lambda m, x, c: m(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), attn_mask=CAUSAL,
                          need_weights=False)[0].transpose(0, 1)),
    "cross, kdim/vdim, additive key padding": (
        dict(embed_dim=E, num_heads=H, kdim=16, vdim=24, batch_first=True),
        lambda m, x, c: m(x, c[..., :16], c[..., 8:], key_padding_mask=additive(KEY_PAD), need_weights=False)[0]),
    "bias_kv, add_zero_attn, key padding": (
        dict(embed_dim=E, num_heads=H, add_bias_kv=True, add_zero_attn=True, batch_first=True),
        lambda m, x, c: m(x, c, c, key_padding_mask=KEY_PAD, need_weights=False)[0]),
    "3-D bool attn_mask (N*H, L, S)": (
        dict(embed_dim=E, num_heads=H, batch_first=True),
        lambda m, x, c: m(x, c, c, attn_mask=random_bool_mask(x), need_weights=False)[0]),
    "unbatched, is_causal with its attn_mask": (
        dict(embed_dim=E, num_heads=H),
        lambda m, x, c: m(x[0], x[0], x[0], attn_mask=CAUSAL, is_causal=True, need_weights=False)[0]),
}


def mha_run(seed):
    def run(model):
        generator = torch.Generator().manual_seed(seed)
        dtype = next(model.parameters()).dtype
        x = torch.randn(B, L, E, generator=generator, dtype=torch.float64).to(dtype)
        context = torch.randn(B, S, E, generator=generator, dtype=torch.float64).to(dtype)
        out = model(x, context)
        weights = torch.rand(out.shape, generator=generator, dtype=torch.float64).to(dtype)
        return (out * out * weights).sum(), {"out": out}  # positive terms: the loss itself does not cancel

    return run


@pytest.mark.parametrize("case", MHA_CASES)
def test_multihead_attention_matches(case, path):
    mha_kwargs, call = MHA_CASES[case]
    fresh_seed()
    seed = fresh_seed()
    handle = compare(lambda: MHAHolder(call, **mha_kwargs), mha_run(seed), path)
    assert [r.path for r in handle.records] == ["mha"]
    assert not handle.fallbacks


def test_multihead_attention_negative_control(path):
    """The same comparison fails when the patched call drops the key padding mask."""
    fresh_seed()
    mha_kwargs, call = MHA_CASES["self, batch_first, bool key padding"]
    seed = fresh_seed()
    dropped = lambda m, x, c: m(c, c, c, need_weights=False)[0]  # noqa: E731
    with pytest.raises(AssertionError, match="eager error"):
        compare(lambda: MHAHolder(call, **mha_kwargs), mha_run(seed), path,
                got_run=lambda model: mha_run(seed)(_with_call(model, dropped)))


def _with_call(model, call):
    model.call = call
    return model


def test_need_weights_falls_back_exactly_and_strict_raises():
    fresh_seed()
    model = MHAHolder(lambda m, x, c: m(x, c, c, key_padding_mask=KEY_PAD), embed_dim=E, num_heads=H, batch_first=True)
    x, c = torch.randn(B, L, E), torch.randn(B, S, E)
    out, weights = model.mha(x, c, c, key_padding_mask=KEY_PAD)
    handle = mmkernels.patch(model)
    patched_out, patched_weights = model.mha(x, c, c, key_padding_mask=KEY_PAD)
    assert torch.equal(patched_out, out) and torch.equal(patched_weights, weights)
    assert handle.fallbacks == {("mha", "need_weights=True"): 1}
    assert "need_weights=True: 1 call(s)" in str(handle)
    handle.undo()
    handle = mmkernels.patch(model, strict=True)
    with pytest.raises(StrictPatchError, match="mha.*need_weights=True"):
        model.mha(x, c, c, key_padding_mask=KEY_PAD)
    assert model.mha(x, c, c, key_padding_mask=KEY_PAD, need_weights=False)[1] is None


def test_causal_hint_without_mask_keeps_torch_error():
    model = MHAHolder(None, embed_dim=E, num_heads=H, batch_first=True)
    mmkernels.patch(model)
    x = torch.randn(B, L, E)
    with pytest.raises(RuntimeError, match="attn_mask"):
        model.mha(x, x, x, is_causal=True, need_weights=False)


def test_subclass_overriding_forward_is_left_alone():
    class Custom(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = nn.Sequential(Custom(E, H))
    handle = mmkernels.patch(model)
    assert not handle.records and "forward" not in model[0].__dict__
    assert [(s.path, s.kind) for s in handle.skipped] == [("0", "attention")]
    assert "overrides nn.MultiheadAttention.forward" in handle.skipped[0].reason


# --------------------------------------------------------------------------- an open_clip-shaped CLIP


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, 2 * width), gelu=nn.GELU(), c_proj=nn.Linear(2 * width, width)))

    def forward(self, x, attn_mask=None):
        attn_mask = attn_mask.to(x.dtype) if attn_mask is not None else None
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Blocks over (N, L, D) when batch_first, else over (L, N, D) (older open_clip)."""

    def __init__(self, width, layers, heads, batch_first):
        super().__init__()
        self.batch_first = batch_first
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        for block in self.resblocks:
            block.attn.batch_first = batch_first

    def forward(self, x, attn_mask=None):  # x: (N, L, D)
        x = x if self.batch_first else x.transpose(0, 1)
        for block in self.resblocks:
            x = block(x, attn_mask=attn_mask)
        return x if self.batch_first else x.transpose(0, 1)


class TextTower(nn.Module):
    def __init__(self, vocab, context, width, heads, layers, dim, batch_first):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(context, width) * 0.1)
        self.transformer = Transformer(width, layers, heads, batch_first)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, dim) * width ** -0.5)
        self.register_buffer("attn_mask", torch.full((context, context), float("-inf")).triu(1), persistent=False)

    def forward(self, text):  # text: (N, context) ids, end-of-text = the largest id, padding 0 after it
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


class VisionTower(nn.Module):
    def __init__(self, image, patch, width, heads, layers, dim, batch_first):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width) * 0.1)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, batch_first)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, dim) * width ** -0.5)

    def forward(self, images):
        x = self.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class OpenClipLike(nn.Module):
    def __init__(self, batch_first):
        super().__init__()
        self.visual = VisionTower(image=12, patch=4, width=32, heads=2, layers=1, dim=16, batch_first=batch_first)
        self.text = TextTower(vocab=50, context=7, width=32, heads=2, layers=2, dim=16, batch_first=batch_first)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, images, text):
        return (F.normalize(self.visual(images), dim=-1), F.normalize(self.text(text), dim=-1), self.logit_scale.exp())


def clip_inputs(seed, n=4, lengths=(7, 4, 2, 5)):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 12, 12, generator=generator, dtype=torch.float64)
    text = torch.randint(1, 49, (n, 7), generator=generator)
    for i, length in enumerate(lengths):
        text[i, length - 1] = 49
        text[i, length:] = 0
    return images, text


def open_clip_run(seed):
    images, text = clip_inputs(seed)

    def run(model):
        scale = model.logit_scale
        image_features, text_features, scale = model(images.to(scale.device, scale.dtype), text.to(scale.device))
        loss = eager_clip_loss(image_features, text_features, scale)
        return loss, {"image_features": image_features, "text_features": text_features}

    return run


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_open_clip_shaped_model_matches(batch_first, path):
    fresh_seed()
    seed = fresh_seed()
    handle = compare(lambda: OpenClipLike(batch_first), open_clip_run(seed), path, dict(losses=False))
    assert sorted(r.path for r in handle.records) == [
        "text.transformer.resblocks.0.attn", "text.transformer.resblocks.1.attn", "visual.transformer.resblocks.0.attn"]
    assert not handle.fallbacks and not handle.skipped


@pytest.mark.gpu
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "sequence_first"])
def test_open_clip_shaped_model_matches_on_the_gpu_in_bf16(batch_first, monkeypatch):
    fresh_seed()
    seed = fresh_seed()
    handle = compare(lambda: OpenClipLike(batch_first).to("cuda", torch.bfloat16), open_clip_run(seed),
                     ("cuda", use_path(monkeypatch, "cuda")), dict(losses=False))
    assert len(handle.records) == 3 and not handle.fallbacks


def test_open_clip_shaped_model_negative_control(path):
    """Without the causal mask in the patched text tower, the same comparison fails."""
    fresh_seed()
    seed = fresh_seed()
    run = open_clip_run(seed)

    def run_without_causal_mask(model):
        model.text.attn_mask = torch.zeros_like(model.text.attn_mask)
        return run(model)

    with pytest.raises(AssertionError, match="eager error"):
        compare(lambda: OpenClipLike(True), run, path, dict(losses=False), got_run=run_without_causal_mask)


def test_open_clip_loss_outside_the_model_is_reported():
    """open_clip computes its loss outside the model: the model (it owns logit_scale) is listed."""
    model = OpenClipLike(True)
    with pytest.raises(StrictPatchError, match=r"\(model\) \(loss\)"):
        mmkernels.patch(model, strict=True)
    assert not mmkernels.patch(copy.deepcopy(model), losses=False, strict=True).skipped
    handle = mmkernels.patch(model)
    assert [(s.path, s.kind) for s in handle.skipped] == [("", "loss")]


# --------------------------------------------------------------------------- the machinery


def snapshot(model):
    return {name: (t.data_ptr(), t.clone()) for name, t in model.state_dict(keep_vars=True).items()}


def test_state_untouched_and_undo_bit_identical(reference_path):
    fresh_seed()
    model = OpenClipLike(True)
    images, text = clip_inputs(fresh_seed())
    images = images.float()
    before = snapshot(model)
    params_before = [id(p) for p in model.parameters()]
    reference = model(images, text)
    handle = mmkernels.patch(model, losses=False)
    patched = snapshot(model)
    assert patched.keys() == before.keys()
    for name, (ptr, value) in before.items():
        assert patched[name][0] == ptr and torch.equal(patched[name][1], value), name
    assert [id(p) for p in model.parameters()] == params_before
    model(images, text)
    handle.undo()
    assert all(torch.equal(a, b) for a, b in zip(model(images, text), reference))
    assert snapshot(model).keys() == before.keys()
    for module in model.modules():
        assert not any(name.startswith("_mmkernels") or name == "forward" for name in module.__dict__)
    handle.undo()  # idempotent


def test_checkpoints_load_in_either_state(reference_path):
    fresh_seed()
    source, target = OpenClipLike(True), OpenClipLike(True)
    mmkernels.patch(source, losses=False)
    target.load_state_dict(source.state_dict())
    mmkernels.patch(target, losses=False)
    images, text = clip_inputs(fresh_seed())
    other = OpenClipLike(True)
    target.load_state_dict(other.state_dict())
    mmkernels.unpatch(target)
    assert all(torch.equal(a, b) for a, b in zip(target(images.float(), text), other(images.float(), text)))


def test_patch_twice_is_a_no_op_and_other_options_raise():
    model = OpenClipLike(True)
    handle = mmkernels.patch(model, losses=False)
    forwards = [m.__dict__.get("forward") for m in model.modules()]
    assert mmkernels.patch(model, losses=False) is handle
    assert [m.__dict__.get("forward") for m in model.modules()] == forwards
    with pytest.raises(ValueError, match="already patched"):
        mmkernels.patch(model, keep_logits=False)
    assert mmkernels.unpatch(model) is True and mmkernels.unpatch(model) is False
    assert mmkernels.patch(model) is not handle


def test_optimizer_built_before_the_patch_trains_the_patched_model(reference_path):
    fresh_seed()
    model = OpenClipLike(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    mmkernels.patch(model, losses=False)
    before = [p.detach().clone() for p in model.parameters()]
    images, text = clip_inputs(fresh_seed())
    eager_clip_loss(*model(images.float(), text)).backward()
    optimizer.step()
    moved = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    attention = [n for n, _ in model.named_parameters() if ".attn." in n]
    assert attention and all(m for (n, _), m in zip(model.named_parameters(), moved) if n in attention)


def test_two_models_in_one_process(monkeypatch, reference_path):
    fresh_seed()
    student = OpenClipLike(True)
    teacher = copy.deepcopy(student)
    mmkernels.patch(student, losses=False)
    calls = []
    original = mmkernels.nn.CrossModalAttention.forward
    monkeypatch.setattr(mmkernels.nn.CrossModalAttention, "forward",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    images, text = clip_inputs(fresh_seed())
    teacher(images.float(), text)
    assert not calls and all("forward" not in m.__dict__ for m in teacher.modules())
    student(images.float(), text)
    assert len(calls) == 3


def test_deepcopy_of_a_patched_model_is_patched_with_its_own_weights(reference_path):
    fresh_seed()
    model = OpenClipLike(True)
    handle = mmkernels.patch(model, losses=False)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(1.5)
    images, text = clip_inputs(fresh_seed())
    images = images.float()
    got = clone(images, text)
    assert clone._mmkernels_handle is not handle and clone._mmkernels_handle.active
    assert clone.text.transformer.resblocks[0].attn.forward.__self__ is clone.text.transformer.resblocks[0].attn
    mmkernels.unpatch(clone)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got, clone(images, text)))
    assert handle.active and "forward" in model.visual.transformer.resblocks[0].attn.__dict__


@pytest.mark.parametrize("how", PICKLERS)
def test_a_pickled_patched_model_loads_patched_with_its_own_handle(how, monkeypatch):
    """pickle / torch.save of a patched model, loaded: the copy runs the kernels on its own modules
    (bit-identical to the model it was saved from), its own handle counts its fallbacks, and undo
    restores it to the unpatched model's outputs bit for bit; the saved model stays patched."""
    reference_calls = use_path(monkeypatch, "reference")
    fresh_seed()
    model = OpenClipLike(True)
    images, text = clip_inputs(fresh_seed())
    images = images.float()
    unpatched = model(images, text)
    handle = mmkernels.patch(model, losses=False)
    patched = model(images, text)
    loaded = pickled_copy(model, how)
    loaded_handle = loaded._mmkernels_handle
    assert loaded_handle is not handle and loaded_handle.active and loaded_handle.model is loaded
    assert loaded_handle.records == handle.records and not loaded_handle.skipped
    attn = loaded.text.transformer.resblocks[0].attn
    assert attn.forward.__self__ is attn and patching.patch_state(attn).handle is loaded_handle
    assert list(inspect.signature(attn.forward).parameters) == list(
        inspect.signature(nn.MultiheadAttention(E, H).forward).parameters)
    reference_calls.clear()
    assert all(torch.equal(a, b) for a, b in zip(loaded(images, text), patched))
    assert reference_calls == ["cross_attention"] * 3
    x = torch.randn(B, L, E)
    attn(x, x, x)  # need_weights=True: the module's own forward
    assert loaded_handle.fallbacks == {("text.transformer.resblocks.0.attn", "need_weights=True"): 1}
    assert not handle.fallbacks and mmkernels.patch(loaded, losses=False) is loaded_handle
    assert mmkernels.unpatch(loaded) and not loaded_handle.active
    assert all(torch.equal(a, b) for a, b in zip(loaded(images, text), unpatched))
    for module in loaded.modules():
        assert not any(name.startswith("_mmkernels") or name == "forward" for name in module.__dict__)
    assert handle.active and "forward" in model.text.transformer.resblocks[0].attn.__dict__


def test_existing_instance_forward_is_left_alone():
    """An instance forward set before the patch (a hook library's wrapper) would be bypassed by a
    patched forward: that module is listed, not patched, and its wrapper keeps running."""
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    seen = []

    def wrapped(*args, **kwargs):
        seen.append(kwargs.get("need_weights"))
        return nn.MultiheadAttention.forward(mha, *args, **kwargs)

    mha.forward = wrapped
    model = nn.Sequential(OrderedDict(attn=mha))
    handle = mmkernels.patch(model)
    assert not handle.records and [(s.path, s.kind) for s in handle.skipped] == [("attn", "attention")]
    assert "already replaced on the instance" in handle.skipped[0].reason
    x = torch.randn(B, L, E)
    model.attn(x, x, x, need_weights=False)
    assert seen == [False] and mha.__dict__["forward"] is wrapped
    handle.undo()
    assert mha.__dict__["forward"] is wrapped


def test_undo_refuses_when_something_replaced_the_patch():
    model = nn.Sequential(OrderedDict(attn=nn.MultiheadAttention(E, H)))
    handle = mmkernels.patch(model)
    foreign = model.attn.forward
    model.attn.forward = lambda *a, **k: foreign(*a, **k)
    with pytest.raises(RuntimeError, match="changed after"):
        handle.undo()
    assert handle.active and "_mmkernels_patch" in model.attn.__dict__


def test_context_manager_and_errors():
    model = nn.Sequential(nn.MultiheadAttention(E, H))
    with mmkernels.patch(model) as handle:
        assert "forward" in model[0].__dict__
    assert not handle.active and "forward" not in model[0].__dict__
    with pytest.raises(TypeError, match="model"):
        mmkernels.patch(object())
    with pytest.raises(TypeError, match="strict"):
        mmkernels.patch(model, strict=1)


class WeirdAttention(nn.Module):
    def forward(self, x, scale=1.0):
        return x * scale


class WeirdAttentionOuter(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True)
        self.weird = WeirdAttention()


def test_strict_names_what_is_left_and_changes_nothing():
    model = nn.Sequential(OrderedDict(block=WeirdAttentionOuter()))
    handle = mmkernels.patch(model)
    # The outer module is covered by its patched nn.MultiheadAttention; the inner one is not.
    assert [(s.path, s.kind, s.reason) for s in handle.skipped] == [
        ("block.weird", "attention", "no mmkernels patch for WeirdAttention")]
    handle.undo()
    with pytest.raises(StrictPatchError, match="block.weird"):
        mmkernels.patch(model, strict=True)
    assert all("forward" not in m.__dict__ and "_mmkernels_patch" not in m.__dict__ for m in model.modules())
    assert "_mmkernels_handle" not in model.__dict__
    assert not mmkernels.patch(model, attention=False, strict=True).records


@pytest.fixture
def toy_patcher():
    """A family patcher registered the way integrations register theirs (removed afterwards)."""

    def toy_forward(self, x, scale=1.0):
        if scale != 1.0:
            return call_original(self, "scale != 1", x, scale=scale)
        return x * 2

    @register_patcher("attention")
    def patch_weird(module, path, ctx):
        if type(module) is not WeirdAttention:
            return False
        ctx.replace_forward(module, path, "attention", "toy kernel", toy_forward, falls_back="scale != 1")
        return True

    yield
    patching._PATCHERS[:] = [p for p in patching._PATCHERS if p.fn is not patch_weird]


def test_registered_patcher_extension_point(toy_patcher):
    model = nn.Sequential(OrderedDict(block=WeirdAttentionOuter()))
    handle = mmkernels.patch(model, strict=True)
    assert sorted(r.path for r in handle.records) == ["block.mha", "block.weird"]
    assert [r.piece for r in handle.records if r.path == "block.weird"] == ["toy kernel"]
    x = torch.randn(2)
    assert torch.equal(model.block.weird(x), 2 * x)
    with pytest.raises(StrictPatchError, match="scale != 1"):
        model.block.weird(x, scale=3.0)
    handle.undo()
    handle = mmkernels.patch(model)
    assert torch.equal(model.block.weird(x, scale=3.0), 3 * x)
    assert handle.fallbacks == {("block.weird", "scale != 1"): 1}


def test_a_library_without_what_a_patcher_module_imports_leaves_that_module_out(tmp_path, monkeypatch):
    """A patcher module whose library is installed in a version without a name it imports (an
    ImportError from the library, e.g. an older transformers) is left out with a warning naming the
    error; the other patchers still patch. An ImportError from mmkernels itself (a bug) surfaces."""
    (tmp_path / "mmk_old_library_patchers.py").write_text("from torch import no_such_name_in_this_version\n")
    (tmp_path / "mmk_broken_patchers.py").write_text("from mmkernels.ops import no_such_name_in_mmkernels\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = patching.PATCHER_MODULES
    monkeypatch.setattr(patching, "PATCHER_MODULES", modules + ("mmk_old_library_patchers",))
    monkeypatch.setattr(patching, "_loaded", False)
    with pytest.warns(UserWarning, match="mmk_old_library_patchers.*no_such_name_in_this_version"):
        handle = mmkernels.patch(nn.Sequential(nn.MultiheadAttention(E, H)))
    assert [r.kind for r in handle.records] == ["attention"]
    monkeypatch.setattr(patching, "PATCHER_MODULES", modules + ("mmk_broken_patchers",))
    monkeypatch.setattr(patching, "_loaded", False)
    with pytest.raises(ImportError, match="no_such_name_in_mmkernels"):
        mmkernels.patch(nn.Sequential(nn.MultiheadAttention(E, H)))


def test_patcher_modules_names_every_module_that_registers_patchers():
    """`PATCHER_MODULES`, the one list `patch()` loads, names exactly the modules under
    mmkernels/integrations whose code calls `register_patcher` (read from the source, so it holds
    with or without transformers installed), each once."""
    root = Path(patching.__file__).parent
    registering = set()
    for path in root.rglob("*.py"):
        calls = [node.func for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)]
        if any(getattr(func, "id", getattr(func, "attr", None)) == "register_patcher" for func in calls):
            parts = ("mmkernels", "integrations", *path.relative_to(root).with_suffix("").parts)
            registering.add(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    assert "mmkernels.integrations.torch_mha" in registering
    assert sorted(patching.PATCHER_MODULES) == sorted(registering)
