"""Group ids (clip_loss, info_nce_loss, siglip_loss: pairs with the same id are positives of each
other) and extra negatives (clip_loss's extra_text, info_nce_loss's extra_keys: negatives of every
row, in the row direction only) on both paths, under the numerics rule (docs/design.md) against the
float64 N×N(+K) formula written from the semantics (tests/contrastive_oracle.py: explicit targets,
log_softmax), independent of mmkernels' reference: fp32, fp16 and bf16 (bf16 on the CPU takes the
reference path), odd N and D, duplicated ids, one group of everything, label smoothing, K = 0, 1,
odd and > N. All-distinct ids are today's diagonal bit for bit; ids mean only the partition they make
(any int dtype, any values, strided); negative controls for each point of the semantics; frozen
sides; row panels of one block; autocast; torch.compile(fullgraph=True); NaN/Inf as today; errors name the
argument. The block API's internal entries with BlockGroups and extra columns (n_pair): blocks of
rows and of columns compose the global loss. The work: test_contrastive_work.py; opcheck of the
new arguments: registry.py's samples."""
import re

import pytest
import torch

import mmkernels
from contrastive_oracle import (GROUP_NAMES, check_grouped, eager_grouped_clip_loss, oracle_clip_loss,
                                oracle_siglip_loss, positives, random_leaves)
from mmkernels.ops import contrastive
from mmkernels.ops.contrastive import clip_loss_from_stats, reference
from toolkit import eager_clip_loss, eager_info_nce_loss, eager_siglip_loss, fresh_seed, value_and_grads

# NaN and Inf inputs make the interpreter's numpy arithmetic warn where the GPU computes silently
NON_FINITE_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_group_ids(kind: str | None, n: int, device, dtype=torch.int64):
    """(n,) ids of `dtype` from torch's current seed: "dups" draws each id from n//3 (at least 1)
    arbitrary values (negative ones among them), so groups of several sizes and singletons;
    "one" is one group of everything; "distinct" all different, in no particular order."""
    if kind is None:
        return None
    if kind == "one":
        ids = torch.full((n,), 42)
    elif kind == "dups":
        values = torch.randperm(200)[: max(n // 3, 1)] - 100
        ids = values[torch.randint(0, values.numel(), (n,))]
    elif kind == "distinct":
        ids = torch.randperm(n) * 3 - n
    else:
        raise ValueError(kind)
    return ids.to(dtype=dtype, device=device)


def loss_fn(loss_name: str, group_ids, normalize: bool, smoothing: float = 0.0, **kw):
    """mmkernels' loss as a function of the leaves ([image, text, scale] + [extra] or + [bias])."""
    if loss_name == "clip":
        return lambda a, b, s, *e: mmkernels.clip_loss(a, b, s, normalize=normalize, label_smoothing=smoothing,
                                                       group_ids=group_ids, **({"extra_text": e[0]} if e else {}), **kw)
    if loss_name == "info_nce":
        return lambda a, b, s, *e: mmkernels.info_nce_loss(a, b, s, normalize=normalize, label_smoothing=smoothing,
                                                           group_ids=group_ids,
                                                           **({"extra_keys": e[0]} if e else {}), **kw)
    return lambda a, b, s, c: mmkernels.siglip_loss(a, b, s, c, normalize=normalize, group_ids=group_ids, **kw)


def make_leaves(loss_name: str, n: int, d: int, k, dtype, device):
    """[image, text, scale] + [extra (k, D)] (k None: no extra argument), or + [bias] for SigLIP."""
    leaves = random_leaves(n, d, dtype, device, with_bias=loss_name == "siglip")
    if loss_name != "siglip" and k is not None:
        leaves.append(torch.randn(k, d, dtype=dtype, device=device))
    return leaves


def _skip_unsupported(kernel_path, dtype, n, d, k=0):
    if kernel_path.device.type == "cpu":
        if dtype == torch.bfloat16 and kernel_path.name == "kernels":
            pytest.skip("bf16 on the CPU takes the reference path (docs/design.md#numerics-rule)")
        if dtype != torch.float32 and n * d > 40 * 16:
            pytest.skip("fp16 and bf16 on the small shapes only on the CPU, to keep the tests fast")


def run_case(loss_name, kernel_path, dtype, n, d, normalize, smoothing, groups, k, ids_dtype=torch.int64):
    _skip_unsupported(kernel_path, dtype, n, d)
    fresh_seed()
    device = kernel_path.device
    leaves = make_leaves(loss_name, n, d, k, dtype, device)
    ids = make_group_ids(groups, n, device, ids_dtype)
    before = [t.clone() for t in leaves] + ([ids.clone()] if ids is not None else [])
    got = value_and_grads(loss_fn(loss_name, ids, normalize, smoothing), leaves)
    after = leaves + ([ids] if ids is not None else [])
    assert all(torch.equal(t, t0) for t, t0 in zip(after, before)), "the loss modified its inputs"
    assert got[0].dtype == torch.float32 and got[0].dim() == 0
    assert all(g.dtype == dtype for g in got[1:3]) and all(g.dtype == dtype for g in got[4:] if g.dim())
    what = (f"{loss_name} {kernel_path.name} N={n} D={d} K={k} {dtype} normalize={normalize} eps={smoothing} "
            f"groups={groups}")
    check_grouped(loss_name, got, leaves, dtype, what, ids, normalize, smoothing)


# (N, D, normalize, label_smoothing, groups, K): N = 1 and D = 1, sizes off the 64-wide tiles, one
# group of everything, K = 0 (an empty tensor), 1 and odd; None: that argument not given.
EXTRA_CASES = [
    (1, 5, False, 0.0, "one", 0),
    (7, 1, False, 0.1, "dups", 3),
    (37, 13, True, 0.1, "dups", 1),
    (70, 24, False, 0.2, "one", 9),
    (66, 33, True, 0.0, "dups", None),
    (65, 17, False, 0.3, None, 7),
    (9, 5, True, 0.1, "dups", 70),  # K > N: column tiles of extras only
]
SIGLIP_CASES = [
    (1, 5, False, "one"),
    (7, 1, False, "dups"),
    (37, 13, True, "dups"),
    (70, 24, False, "one"),
    (66, 33, True, "dups"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,normalize,smoothing,groups,k", EXTRA_CASES)
def test_clip_groups_and_extras_match_the_oracle(kernel_path, dtype, n, d, normalize, smoothing, groups, k):
    run_case("clip", kernel_path, dtype, n, d, normalize, smoothing, groups, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,normalize,smoothing,groups,k", EXTRA_CASES)
def test_info_nce_groups_and_extras_match_the_oracle(kernel_path, dtype, n, d, normalize, smoothing, groups, k):
    run_case("info_nce", kernel_path, dtype, n, d, normalize, smoothing, groups, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,normalize,groups", SIGLIP_CASES)
def test_siglip_groups_match_the_oracle(kernel_path, dtype, n, d, normalize, groups):
    run_case("siglip", kernel_path, dtype, n, d, normalize, 0.0, groups, None)


@pytest.mark.parametrize("loss_name", ["clip", "info_nce", "siglip"])
def test_distinct_ids_are_todays_loss_bit_for_bit(loss_name, kernel_path):
    """All-distinct ids (shuffled, arbitrary values) are today's diagonal: the loss and every
    gradient equal group_ids=None's bit for bit; so does an empty extra (K = 0), whose gradient
    is an empty (0, D) tensor."""
    fresh_seed()
    n, d = 70, 24
    leaves = make_leaves(loss_name, n, d, None, torch.float32, kernel_path.device)
    ids = make_group_ids("distinct", n, kernel_path.device)
    today = value_and_grads(loss_fn(loss_name, None, True, 0.1), leaves)
    runs = {"distinct ids": value_and_grads(loss_fn(loss_name, ids, True, 0.1), leaves)}
    if loss_name != "siglip":
        empty = torch.randn(0, d, device=kernel_path.device)
        with_empty = value_and_grads(loss_fn(loss_name, None, True, 0.1), leaves + [empty])
        assert with_empty[-1].shape == (0, d)
        runs["K = 0"] = with_empty[:-1]
        runs["distinct ids, K = 0"] = value_and_grads(loss_fn(loss_name, ids, True, 0.1), leaves + [empty])[:-1]
    for what, got in runs.items():
        for name, g, t in zip(GROUP_NAMES[loss_name], got, today):
            assert g.dtype == t.dtype and torch.equal(g, t), f"{loss_name} {kernel_path.name} {what}: {name} differs"


@pytest.mark.parametrize("loss_name", ["clip", "info_nce", "siglip"])
def test_ids_mean_only_their_partition(loss_name, kernel_path):
    """Any int dtype and any values: relabelling the groups (int16, int32, uint8, negative ids, ids
    that differ only above bit 32, a strided tensor) gives the same loss and gradients bit for bit."""
    fresh_seed()
    n, d = 37, 13
    leaves = make_leaves(loss_name, n, d, 3, torch.float32, kernel_path.device)
    compact = torch.randint(0, 9, (n,)).to(kernel_path.device)  # ids 0..8, duplicated
    relabelled = {
        "int16 negative": (compact.to(torch.int16) * -7 + 3),
        "uint8": (compact * 25 + 5).to(torch.uint8),
        # equal modulo 2^32: a kernel that narrows ids to 32 bits would merge groups
        "above bit 32": compact * (1 << 32) + 11,
        "int32, strided": torch.stack([compact * 1000, -compact]).to(torch.int32).T.reshape(-1)[::2],
    }
    assert not relabelled["int32, strided"].is_contiguous()
    base = value_and_grads(loss_fn(loss_name, compact, False, 0.1), leaves)
    for what, ids in relabelled.items():
        got = value_and_grads(loss_fn(loss_name, ids, False, 0.1), leaves)
        for name, g, t in zip(GROUP_NAMES[loss_name], got, base):
            assert torch.equal(g, t), f"{loss_name} {kernel_path.name} ids {what}: {name} differs"
    # negative control: merging two groups changes the loss (the ids are read at all)
    merged = torch.where(compact == 1, 0, compact)
    if (compact == 1).any() and (compact == 0).any():
        assert not torch.equal(value_and_grads(loss_fn(loss_name, merged, False, 0.1), leaves)[0], base[0])


def test_the_oracle_is_todays_loss_and_the_eager_formula():
    """The oracle (explicit targets and log_softmax) against two other writings in float64: without
    ids or extras it is mmkernels' reference (today's loss); with them, F.cross_entropy with
    probability targets (the eager baseline) and, for one group of everything without smoothing,
    CLIP's closed form: rows lse_i - mean_j S_ij and columns likewise."""
    fresh_seed()
    n, d, k = 9, 5, 4
    a, b, s = random_leaves(n, d, torch.float64, "cpu", with_bias=False)
    extra = torch.randn(k, d, dtype=torch.float64)
    bias = torch.tensor(-1.5, dtype=torch.float64)
    torch.testing.assert_close(oracle_clip_loss(a, b, s, normalize=True, smoothing=0.2),
                               reference.clip_loss(a, b, s, True, 0.2), rtol=1e-13, atol=0)
    torch.testing.assert_close(oracle_clip_loss(a, b, s, smoothing=0.2, directions=1),
                               reference.info_nce_loss(a, b, s, False, 0.2), rtol=1e-13, atol=0)
    torch.testing.assert_close(oracle_siglip_loss(a, b, s, bias, normalize=True),
                               reference.siglip_loss(a, b, s, bias, True), rtol=1e-13, atol=0)
    ids = torch.tensor([3, 1, 3, 3, -2, 1, 7, 3, 0])
    for directions in (1, 2):
        torch.testing.assert_close(
            oracle_clip_loss(a, b, s, extra, group_ids=ids, normalize=True, smoothing=0.3, directions=directions),
            eager_grouped_clip_loss(a, b, s, extra, group_ids=ids, normalize=True, smoothing=0.3,
                                    directions=directions), rtol=1e-13, atol=0)
    logits = s * a @ torch.cat([b, extra]).T
    one = torch.zeros(n, dtype=torch.long)
    rows = (torch.logsumexp(logits, 1) - logits[:, :n].mean(1)).mean()
    cols = (torch.logsumexp(logits[:, :n], 0) - logits[:, :n].mean(0)).mean()
    torch.testing.assert_close(oracle_clip_loss(a, b, s, extra, group_ids=one), (rows + cols) / 2,
                               rtol=1e-13, atol=0)
    labels = torch.ones(n, n, dtype=torch.float64)
    torch.testing.assert_close(oracle_siglip_loss(a, b, s, bias, group_ids=one),
                               -torch.nn.functional.logsigmoid(labels * (s * a @ b.T + bias)).sum() / n)
    # the eager baselines' group_ids=None is toolkit's eager formulas
    torch.testing.assert_close(eager_grouped_clip_loss(a, b, s, smoothing=0.1), eager_clip_loss(a, b, s, False, 0.1))
    torch.testing.assert_close(eager_grouped_clip_loss(a, b, s, smoothing=0.1, directions=1),
                               eager_info_nce_loss(a, b, s, False, 0.1))


def test_extras_are_negatives_of_the_rows_only(kernel_path):
    """An extra column that copies a text row's embedding is still a negative: the loss goes up
    against today's (the copy adds to every row's log-sum-exp), and the column direction does not
    see it: with text_emb = image_emb the extras change nothing but the rows' softmax. Checked
    against the oracle on those inputs, whose extras the rule's floor would not separate from
    positives otherwise."""
    fresh_seed()
    n, d = 12, 6
    a, b, s = random_leaves(n, d, torch.float32, kernel_path.device, with_bias=False)
    extra = b[[2, 5, 5]].clone()  # copies of positives' text embeddings
    ids = make_group_ids("dups", n, kernel_path.device)
    for loss_name in ("clip", "info_nce"):
        without = loss_fn(loss_name, ids, False)(a, b, s)
        with_copies = loss_fn(loss_name, ids, False)(a, b, s, extra)
        assert with_copies > without
        got = value_and_grads(loss_fn(loss_name, ids, False, 0.1), [a, b, s, extra])
        check_grouped(loss_name, got, [a, b, s, extra], torch.float32, f"{loss_name} {kernel_path.name} copies",
                      ids, False, 0.1)


def _wrong_clip(variant, ids, eps):
    """CLIP computed with one of the semantics' points wrong, in fp32, as an implementation might."""
    def fn(a, b, s, extra):
        logits = s * a @ torch.cat([b, extra]).T
        n, k = a.shape[0], extra.shape[0]
        p = positives(None if variant == "ids ignored" else ids, n, a.dtype, a.device)
        rows_t = torch.cat([p / p.sum(1, keepdim=True), torch.zeros(n, k)], 1)
        classes = n if variant == "row smoothing over N" else n + k
        rows_t = (1 - eps) * rows_t + eps / classes
        if variant == "extras dropped":
            rows_t, logits_rows = rows_t[:, :n] + eps * k / (n * (n + k)), logits[:, :n]
        else:
            logits_rows = logits
        rows = -(rows_t * torch.log_softmax(logits_rows, 1)).sum(1).mean()
        cols_t = (1 - eps) * p / p.sum(0, keepdim=True) + eps / n
        if variant == "extras in the columns":  # a column cross-entropy for each extra too (no positive)
            cols_t = torch.cat([cols_t, torch.full((n, k), eps / n)], 1)
            cols = -(cols_t * torch.log_softmax(logits, 0)).sum(0).mean()
        else:
            cols = -(cols_t * torch.log_softmax(logits[:, :n], 0)).sum(0).mean()
        return (rows + cols) / 2
    return fn


@pytest.mark.parametrize("variant", ["ids ignored", "row smoothing over N", "extras dropped",
                                     "extras in the columns"])
def test_the_rule_sees_each_point_of_the_semantics(variant):
    """Negative controls: a CLIP loss with one point of the semantics wrong (the ids ignored, the
    rows' smoothing over N classes, the extras left out, the extras also rows of the columns'
    softmax) fails check_grouped on the shapes the tests use."""
    fresh_seed()
    n, d, k, eps = 37, 13, 5, 0.2
    leaves = make_leaves("clip", n, d, k, torch.float32, torch.device("cpu"))
    ids = make_group_ids("dups", n, "cpu")
    got = value_and_grads(_wrong_clip(variant, ids, eps), leaves)
    with pytest.raises(AssertionError):
        check_grouped("clip", got, leaves, torch.float32, variant, ids, False, eps)
    # positive control: the same code with nothing wrong passes
    right = value_and_grads(_wrong_clip("none", ids, eps), leaves)
    check_grouped("clip", right, leaves, torch.float32, "right", ids, False, eps)


@pytest.mark.parametrize("loss_name", ["clip", "info_nce"])
@pytest.mark.parametrize("frozen", ["text", "extra"])
def test_frozen_sides_with_extras(loss_name, frozen, kernel_path):
    """A side that does not require grad gets none; the extras get theirs whether or not the text
    side does, and the text side whether or not the extras do; every gradient there meets the rule."""
    fresh_seed()
    device = kernel_path.device
    leaves = make_leaves(loss_name, 37, 13, 5, torch.float32, device)
    ids = make_group_ids("dups", 37, device)
    frozen_idx = {"text": [1], "extra": [3]}[frozen]
    inputs = [t.clone().requires_grad_(i not in frozen_idx) for i, t in enumerate(leaves)]
    loss = loss_fn(loss_name, ids, True, 0.1)(*inputs)
    loss.backward()
    for i, t in enumerate(inputs):
        assert (t.grad is None) == (i in frozen_idx), f"{frozen} frozen: leaf {i} grad {t.grad is not None}"
    got = [loss.detach(), inputs[0].grad, inputs[1].grad, inputs[2].grad, inputs[3].grad]
    check_grouped(loss_name, got, leaves, torch.float32, f"{loss_name} {kernel_path.name} {frozen} frozen", ids,
                  True, 0.1)


def test_compile_fullgraph_with_groups_and_extras(kernel_path):
    """torch.compile(fullgraph=True) (aot_eager: the ops' fakes and autograd as Inductor traces them)
    of the three losses with group ids and extras gives the eager call's loss and gradients, on
    both paths: docs/design.md's "no graph break" holds with the new arguments too."""
    torch._dynamo.reset()
    fresh_seed()
    device = kernel_path.device
    a, b, s = random_leaves(13, 24, torch.float32, device, with_bias=False)
    extra = torch.randn(3, 24, device=device)
    ids = make_group_ids("dups", 13, device)

    def losses(a, b, s, e):
        return (mmkernels.clip_loss(a, b, s, label_smoothing=0.1, group_ids=ids, extra_text=e)
                + mmkernels.info_nce_loss(a, b, s, normalize=True, group_ids=ids, extra_keys=e)
                + mmkernels.siglip_loss(a, b, s, -1.0, group_ids=ids))

    compiled = torch.compile(losses, fullgraph=True, backend="aot_eager")
    got = value_and_grads(compiled, [a, b, s, extra])
    want = value_and_grads(losses, [a, b, s, extra])
    for name, g, w in zip(["loss", "d image_emb", "d text_emb", "d logit_scale", "d extra"], got, want):
        torch.testing.assert_close(g, w, msg=lambda m: f"{kernel_path.name} {name}: {m}")


@pytest.mark.parametrize("loss_name", ["clip", "info_nce", "siglip"])
def test_groups_and_extras_in_panels_of_one_block(loss_name, device):
    """A workspace of one block of rows: S in several row panels (and the statistics' column splits),
    each reading its rows' ids at its own offset; against the oracle. Then the minimum that a too-small
    workspace's error names, with the extra columns counted, runs forward and backward."""
    from mmkernels.ops._common import HAS_TRITON
    from mmkernels.ops.contrastive import plan

    if not HAS_TRITON:
        pytest.skip("needs triton")
    fresh_seed()
    n, d, k = 150, 16, None if loss_name == "siglip" else 9
    cols = n + (k or 0)
    block = plan.tile_config(d, torch.float32, device)["BLOCK_M"]
    workspace = max(plan.stats_panel_bytes(block, cols, d, torch.float32, device),
                    plan.panel_bytes(block, cols, d, torch.float32, device, True, True, torch.float32))
    assert plan.panel_workspace(n, cols, d, torch.float32, device, True, True, torch.float32, workspace) < n
    leaves = make_leaves(loss_name, n, d, k, torch.float32, device)
    ids = make_group_ids("dups", n, device)
    got = value_and_grads(loss_fn(loss_name, ids, True, 0.1 if loss_name != "siglip" else 0.0,
                                  workspace_bytes=workspace), leaves)
    check_grouped(loss_name, got, leaves, torch.float32, f"{loss_name} panels of one block", ids, True,
                  0.1 if loss_name != "siglip" else 0.0)
    a = leaves[0].clone().requires_grad_()
    with pytest.raises(ValueError, match="expected workspace_bytes >= ") as raised:
        loss_fn(loss_name, ids, True, workspace_bytes=1)(a, *leaves[1:])
    needed = int(re.search(r"expected workspace_bytes >= (\d+) ", str(raised.value)).group(1))
    with pytest.raises(ValueError, match=f"expected workspace_bytes >= {needed} "):
        loss_fn(loss_name, ids, True, workspace_bytes=needed - 1)(a, *leaves[1:])
    (d_image,) = torch.autograd.grad(loss_fn(loss_name, ids, True, workspace_bytes=needed)(a, *leaves[1:]), a)
    assert torch.isfinite(d_image).all()


@pytest.mark.parametrize("loss_name", ["clip", "info_nce", "siglip"])
def test_autocast_computes_as_without(loss_name, kernel_path):
    """Under torch.autocast (bf16) the losses with group ids and extras compute as without it (the
    contract's dtypes), loss and every gradient bit for bit."""
    fresh_seed()
    device = kernel_path.device
    leaves = make_leaves(loss_name, 37, 13, 5, torch.float32, device)
    ids = make_group_ids("dups", 37, device)
    plain = value_and_grads(loss_fn(loss_name, ids, True, 0.1 if loss_name != "siglip" else 0.0), leaves)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = value_and_grads(loss_fn(loss_name, ids, True, 0.1 if loss_name != "siglip" else 0.0), leaves)
    for name, g, p in zip(GROUP_NAMES[loss_name], got, plain):
        assert g.dtype == p.dtype and torch.equal(g, p), f"{loss_name} {kernel_path.name}: {name} differs"


# --------------------------------------------------------------------------- NaN and Inf


@NON_FINITE_WARNINGS
@pytest.mark.parametrize("interpret", ["1", "0"])
@pytest.mark.parametrize("loss_name", ["clip", "info_nce", "siglip"])
def test_non_finite_inputs_give_nan(loss_name, interpret, monkeypatch):
    """An Inf or NaN in any embedding (an extra one included) gives NaN, with group ids and extras,
    as today."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    fresh_seed()
    sides = ("image", "text") if loss_name == "siglip" else ("image", "text", "extra")
    for i, (bad, side) in enumerate((bad, side) for bad in (float("nan"), float("inf"), float("-inf"))
                                    for side in sides):
        normalize = i % 2 == 1
        leaves = make_leaves(loss_name, 70, 16, 5, torch.float32, torch.device("cpu"))
        ids = make_group_ids("dups", 70, "cpu")
        tensor = leaves[{"image": 0, "text": 1, "extra": 3}[side]]
        tensor[tensor.shape[0] // 2, 5] = bad
        loss = loss_fn(loss_name, ids, normalize)(*leaves)
        assert torch.isnan(loss), f"{loss_name}: {bad} in {side} (normalize={normalize}) gave {loss}"


# --------------------------------------------------------------------------- errors

R = torch.randn
EXTRA_NAME = {"clip": "extra_text", "info_nce": "extra_keys"}


@pytest.mark.parametrize("loss_name", ["clip", "info_nce", "siglip"])
@pytest.mark.parametrize(
    "ids,exc",
    [
        (torch.zeros(5, dtype=torch.long), ValueError),  # one id per pair: N = 4
        (torch.zeros(4, 1, dtype=torch.long), ValueError),
        (torch.zeros((), dtype=torch.long), ValueError),
        (torch.zeros(4), TypeError),  # float ids
        (torch.zeros(4, dtype=torch.complex64), TypeError),
        ([0, 1, 2, 3], TypeError),
        (torch.zeros(4, dtype=torch.long, device="meta"), ValueError),
    ],
)
def test_bad_group_ids_raise(loss_name, ids, exc):
    leaves = make_leaves(loss_name, 4, 8, None, torch.float32, torch.device("cpu"))
    with pytest.raises(exc, match="group_ids"):
        loss_fn(loss_name, ids, False)(*leaves)


@pytest.mark.parametrize("loss_name", ["clip", "info_nce"])
@pytest.mark.parametrize(
    "extra,exc",
    [
        (R(3, 6), ValueError),  # D = 8
        (R(3, 8).half(), TypeError),
        (torch.randint(0, 3, (3, 8)), TypeError),
        (R(8), ValueError),
        (R(3, 8, 1), ValueError),
        (R(3, 8, device="meta"), ValueError),
        ([[0.0] * 8], TypeError),
    ],
)
def test_bad_extras_raise(loss_name, extra, exc):
    leaves = make_leaves(loss_name, 4, 8, None, torch.float32, torch.device("cpu"))
    with pytest.raises(exc, match=EXTRA_NAME[loss_name]):
        loss_fn(loss_name, None, False)(*leaves, extra)


def test_eager_baselines_are_the_toolkits_without_groups():
    """The rule's baselines with group_ids=None are tests/toolkit.py's eager formulas (SigLIP too)."""
    fresh_seed()
    from contrastive_oracle import eager_grouped_siglip_loss

    a, b, s, c = random_leaves(6, 4, torch.float32, "cpu", with_bias=True)
    torch.testing.assert_close(eager_grouped_siglip_loss(a, b, s, c), eager_siglip_loss(a, b, s, c))


# --------------------------------------------------------------------------- the block API
# The internal entries that mmkernels.distributed composes (clip_block_stats_unchecked,
# clip_block_grads_unchecked, siglip_block_unchecked) with BlockGroups and extra columns (n_pair):
# blocks of rows, and blocks of columns (the ring's decomposition), compose the global loss and its
# gradients, under the rule against the float64 oracle of the whole batch.


def _block_groups(ids, counts, rows, cols):
    if ids is None:
        return None
    return contrastive.BlockGroups(row_ids=ids[rows[0]:rows[1]], row_count=counts[rows[0]:rows[1]],
                                   col_ids=ids[cols[0]:cols[1]], col_count=counts[cols[0]:cols[1]])


def compose_grouped_clip(a, b, scale, extra, ids, cuts, normalize, eps, directions=2):
    """CLIP (directions=2) or InfoNCE (1) with groups and extra columns from blocks of rows, each
    against all N + K columns (n_pair = N): [loss, d image, d text, d scale] (+ [d extra])."""
    n, d = a.shape
    k = 0 if extra is None else extra.shape[0]
    cols = b if extra is None else torch.cat([b, extra])
    counts = None if ids is None else contrastive.group_counts(ids)
    ws = contrastive.resolve_workspace_bytes(None)
    blocks = list(zip([0, *cuts], [*cuts, n]))
    stats = [contrastive.clip_block_stats_unchecked(
        a[p0:p1], cols, scale, p0, normalize, ws, groups=_block_groups(ids, counts, (p0, p1), (0, n)), n_pair=n,
        columns=directions == 2) for p0, p1 in blocks]
    for st in stats:
        assert (st.extra_sum is None) == (k == 0), "extra_sum is None exactly when there are no extra columns"
    loss = sum(clip_loss_from_stats(n, eps, rows=st, directions=directions, row_classes=n + k) for st in stats)
    col_lse = None
    if directions == 2:
        col_lse = contrastive.merge_column_stats(torch.stack([st.col_max[:n] for st in stats]),
                                                 torch.stack([st.col_sumexp[:n] for st in stats]))
        loss = loss + clip_loss_from_stats(n, eps, col_lse=col_lse, directions=2)
    one = torch.ones((), device=a.device)
    grads = [contrastive.clip_block_grads_unchecked(
        a[p0:p1], cols, scale, st.row_lse, col_lse, p0, n, eps, normalize, True, True, one, ws,
        groups=_block_groups(ids, counts, (p0, p1), (0, n)), n_pair=n, row_classes=n + k, directions=directions)
        for (p0, p1), st in zip(blocks, stats)]
    d_cols = torch.stack([g.text_grad for g in grads]).sum(0)
    got = [loss, torch.cat([g.image_grad for g in grads]), d_cols[:n], torch.stack([g.scale_grad for g in grads]).sum()]
    return got + ([d_cols[n:]] if extra is not None else [])


BLOCK_GROUP_CASES = [
    # (N, D, normalize, label_smoothing, groups, K, cuts): one empty block, an extra-only case
    (9, 7, True, 0.1, "dups", 3, [4]),
    (70, 24, False, 0.2, "dups", 5, [3, 3, 40]),
    (37, 13, True, 0.0, "one", None, [20]),
    (66, 33, False, 0.1, None, 7, [33]),
]


@pytest.mark.parametrize("loss_name", ["clip", "info_nce"])
@pytest.mark.parametrize("n,d,normalize,smoothing,groups,k,cuts", BLOCK_GROUP_CASES)
def test_clip_blocks_with_groups_and_extras_compose_the_loss(kernel_path, loss_name, n, d, normalize, smoothing,
                                                            groups, k, cuts):
    fresh_seed()
    device = kernel_path.device
    leaves = make_leaves(loss_name, n, d, k, torch.float32, device)
    ids = make_group_ids(groups, n, device)
    got = compose_grouped_clip(leaves[0], leaves[1], leaves[2], leaves[3] if k is not None else None, ids, cuts,
                               normalize, smoothing, directions=2 if loss_name == "clip" else 1)
    check_grouped(loss_name, got, leaves, torch.float32,
                  f"{loss_name} blocks {kernel_path.name} N={n} D={d} K={k} groups={groups} cuts={cuts}", ids,
                  normalize, smoothing)


def _logaddexp_all(parts):
    out = parts[0]
    for p in parts[1:]:
        out = torch.logaddexp(out, p)
    return out


@pytest.mark.parametrize("n,d,normalize,smoothing,cuts", [(9, 7, True, 0.1, [4]), (70, 24, False, 0.2, [30, 31])])
def test_clip_column_blocks_with_groups_compose_the_loss(kernel_path, n, d, normalize, smoothing, cuts):
    """The ring's decomposition: all rows against each block of columns (offset None; a row's
    positives may sit in any block, found by id): row statistics merged over the blocks (log-sum-
    exps, and the linear diag and row_sum), each block's column statistics complete; the image
    gradient summed over the blocks, each block's text gradient its own."""
    fresh_seed()
    device = kernel_path.device
    a, b, scale = random_leaves(n, d, torch.float32, device, with_bias=False)
    ids = make_group_ids("dups", n, device)
    counts = contrastive.group_counts(ids)
    ws = contrastive.resolve_workspace_bytes(None)
    blocks = list(zip([0, *cuts], [*cuts, n]))
    stats = [contrastive.clip_block_stats_unchecked(a, b[q0:q1], scale, None, normalize, ws,
                                                    groups=_block_groups(ids, counts, (0, n), (q0, q1)))
             for q0, q1 in blocks]
    row_lse = _logaddexp_all([st.row_lse for st in stats])
    rows = stats[0]._replace(row_lse=row_lse, diag=sum(st.diag for st in stats),
                             row_sum=sum(st.row_sum for st in stats))
    col_lse = [contrastive.merge_column_stats(st.col_max[None], st.col_sumexp[None]) for st in stats]
    loss = clip_loss_from_stats(n, smoothing, rows=rows, col_lse=torch.cat(col_lse))
    one = torch.ones((), device=device)
    grads = [contrastive.clip_block_grads_unchecked(
        a, b[q0:q1], scale, row_lse, lse, None, n, smoothing, normalize, True, True, one, ws,
        groups=_block_groups(ids, counts, (0, n), (q0, q1))) for (q0, q1), lse in zip(blocks, col_lse)]
    got = [loss, sum(g.image_grad for g in grads), torch.cat([g.text_grad for g in grads]),
           sum(g.scale_grad for g in grads)]
    check_grouped("clip", got, [a, b, scale], torch.float32, f"CLIP column blocks {kernel_path.name} N={n}", ids,
                  normalize, smoothing)


@pytest.mark.parametrize("n,d,normalize,groups,cuts", [(9, 7, True, "dups", [4]), (70, 24, False, "dups", [3, 3, 40]),
                                                       (37, 13, True, "one", [20])])
def test_siglip_ring_blocks_with_groups_compose_the_loss(kernel_path, n, d, normalize, groups, cuts):
    """Each rank's rows against every rank's texts, positives by id wherever they sit (offset not
    read with groups: None for the other ranks' blocks, as the ring passes it): the global loss and
    gradients."""
    fresh_seed()
    device = kernel_path.device
    leaves = random_leaves(n, d, torch.float32, device, with_bias=True)
    a, b, scale, bias = leaves
    ids = make_group_ids(groups, n, device)
    counts = contrastive.group_counts(ids)
    ws = contrastive.resolve_workspace_bytes(None)
    ranks = list(zip([0, *cuts], [*cuts, n]))
    loss, d_image, d_text = 0.0, torch.zeros_like(a), torch.zeros_like(b)
    d_scale, d_bias = torch.zeros((), device=device), torch.zeros((), device=device)
    for r0, r1 in ranks:
        for q0, q1 in ranks:
            if q0 == q1:
                continue
            part = contrastive.siglip_block_unchecked(
                a[r0:r1], b[q0:q1], scale, bias, 0 if q0 == r0 else None, n, normalize, True, True, True, ws,
                groups=_block_groups(ids, counts, (r0, r1), (q0, q1)))
            loss = loss + part.loss
            d_image[r0:r1] += part.image_grad
            d_text[q0:q1] += part.text_grad
            d_scale, d_bias = d_scale + part.scale_grad, d_bias + part.bias_grad
    check_grouped("siglip", [loss, d_image, d_text, d_scale, d_bias], leaves, torch.float32,
                  f"SigLIP ring blocks {kernel_path.name} N={n} groups={groups} cuts={cuts}", ids, normalize)


def test_block_stats_with_groups_and_extras(kernel_path):
    """The statistics' new fields against their float64 definitions: diag_i = Σ_j P_ij S_ij / c_i over
    the paired columns, row_sum over the paired columns, extra_sum over the extra ones (None without
    them), row_lse over all N + K columns."""
    fresh_seed()
    n, k, d, p0, p1 = 40, 5, 12, 7, 29
    device = kernel_path.device
    a, b, scale = random_leaves(n, d, torch.float32, device, with_bias=False)
    extra = torch.randn(k, d, device=device)
    ids = make_group_ids("dups", n, device)
    counts = contrastive.group_counts(ids)
    assert counts.dtype == torch.int64
    torch.testing.assert_close(counts.cpu(), positives(ids.cpu(), n, torch.int64, "cpu").sum(1))
    cols = torch.cat([b, extra])
    st = contrastive.clip_block_stats_unchecked(a[p0:p1], cols, scale, p0, False,
                                                contrastive.resolve_workspace_bytes(None),
                                                groups=_block_groups(ids, counts, (p0, p1), (0, n)), n_pair=n)
    logits = scale.double() * a[p0:p1].double() @ cols.double().T
    p = positives(ids.cpu(), n, torch.float64, "cpu")[p0:p1].to(device)
    expected = {"row_lse": torch.logsumexp(logits, 1), "diag": (p * logits[:, :n]).sum(1) / p.sum(1),
                "row_sum": logits[:, :n].sum(1), "extra_sum": logits[:, n:].sum(1)}
    terms = {"row_lse": logits.abs().max(1).values + 1, "diag": logits[:, :n].abs().max(1).values,
             "row_sum": logits[:, :n].abs().sum(1), "extra_sum": logits[:, n:].abs().sum(1)}
    for name, want in expected.items():
        got = getattr(st, name).double()
        assert (got - want).abs().le(1e-5 * terms[name]).all(), f"{name}: {got} against {want}"
    plain = contrastive.clip_block_stats_unchecked(a[p0:p1], b, scale, p0, False,
                                                   contrastive.resolve_workspace_bytes(None),
                                                   groups=_block_groups(ids, counts, (p0, p1), (0, n)))
    assert plain.extra_sum is None


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_name", ["clip", "info_nce", "siglip"])
def test_gpu_groups_and_extras_match_the_oracle(loss_name, dtype):
    """The GPU's tiles on a batch of several thousand pairs, off every block size: duplicated ids
    and 257 extra columns, against the float64 oracle."""
    from types import SimpleNamespace

    run_case(loss_name, SimpleNamespace(name="kernels", device=torch.device("cuda")), dtype, 4095, 512, True, 0.1,
             "dups", None if loss_name == "siglip" else 257)


@pytest.mark.gpu
def test_gpu_groups_and_extras_do_not_sync():
    """Group ids (their sizes from a sort and binary searches) and extra columns reach the kernels
    without a host synchronisation, forward and backward."""
    from toolkit import assert_no_host_sync

    a = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(512, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    extra = torch.randn(37, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 100, (512,), device="cuda")

    def step():
        loss = (mmkernels.clip_loss(a, b, 14.0, normalize=True, label_smoothing=0.1, group_ids=ids, extra_text=extra)
                + mmkernels.siglip_loss(a, b, 10.0, -10.0, normalize=True, group_ids=ids)
                + mmkernels.info_nce_loss(a, b, 14.0, normalize=True, group_ids=ids, extra_keys=extra))
        torch.autograd.grad(loss, (a, b, extra))

    assert_no_host_sync(step)
