"""`CrossModalAttention`: nn.MultiheadAttention's API on mmkernels' fused attention, and
`multi_head_attention_forward`, the function it computes (usable with any module's parameters)."""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from mmkernels.ops._args import check_bool, check_lengths, check_real, describe_type
from mmkernels.ops.attention import cross_attention
from mmkernels.ops.masks import AttnSpec

__all__ = ["CrossModalAttention", "multi_head_attention_forward"]


def _check_mask_type(name: str, mask, bool_meaning: str) -> None:
    """nn.MultiheadAttention's rule: a mask is None, bool (`bool_meaning`) or floating (additive)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor or None, got {describe_type(mask)}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"expected {name} to be bool (True = {bool_meaning}) or floating (additive), got {mask.dtype}")


def _check_positive_int(name: str, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"expected {name} to be an int{' or None' if optional else ''}, got {describe_type(value)}")
    if value <= 0:
        raise ValueError(f"expected {name} greater than 0, got {value}")


def _check_inputs_and_weights(query, key, value, weight: Tensor) -> None:
    """query, key and value: floating tensors of one dtype, the weights' unless autocast casts them."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected {name} to be a torch.Tensor, got {describe_type(t)}")
        if not t.is_floating_point():
            raise TypeError(f"expected {name} to be a floating-point tensor, got dtype {t.dtype}")
    dtypes = (query.dtype, key.dtype, value.dtype)
    if len(set(dtypes)) > 1:
        raise TypeError(
            f"expected query, key and value to have one dtype, got {dtypes[0]}, {dtypes[1]} and {dtypes[2]}"
        )
    if query.dtype != weight.dtype and not torch.is_autocast_enabled(query.device.type):
        raise TypeError(
            f"expected query, key and value in the module's dtype {weight.dtype}, got {query.dtype}: cast the "
            f"inputs (query.to({weight.dtype})), or the module (module.to({query.dtype})), or run under torch.autocast"
        )


def _project(query, key, value, num_heads: int, in_proj_weight, in_proj_bias, q_proj_weight, k_proj_weight,
             v_proj_weight) -> tuple[Tensor, Tensor, Tensor]:
    """In-projections, as views of the linear outputs: (N, L, ·) inputs → (N, L, H, hd) each. One
    packed projection when query is key is value (and one for k and v when key is value)."""
    embed = query.shape[-1] if in_proj_weight is None else in_proj_weight.shape[1]
    head_dim = embed // num_heads
    if in_proj_weight is not None:
        weights = in_proj_weight.chunk(3)
    else:
        weights = (q_proj_weight, k_proj_weight, v_proj_weight)
    biases = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    if in_proj_weight is not None and query is key and key is value:
        packed = F.linear(query, in_proj_weight, in_proj_bias).unflatten(-1, (3, num_heads, head_dim))
        return packed[..., 0, :, :], packed[..., 1, :, :], packed[..., 2, :, :]
    q = F.linear(query, weights[0], biases[0]).unflatten(-1, (num_heads, head_dim))
    if in_proj_weight is not None and key is value:
        kv_bias = in_proj_bias[embed:] if in_proj_bias is not None else None
        kv = F.linear(key, in_proj_weight[embed:], kv_bias).unflatten(-1, (2, num_heads, head_dim))
        return q, kv[..., 0, :, :], kv[..., 1, :, :]
    k = F.linear(key, weights[1], biases[1]).unflatten(-1, (num_heads, head_dim))
    v = F.linear(value, weights[2], biases[2]).unflatten(-1, (num_heads, head_dim))
    return q, k, v


def multi_head_attention_forward(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    num_heads: int,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    out_proj_weight: Tensor,
    out_proj_bias: Optional[Tensor],
    q_proj_weight: Optional[Tensor] = None,
    k_proj_weight: Optional[Tensor] = None,
    v_proj_weight: Optional[Tensor] = None,
    bias_k: Optional[Tensor] = None,
    bias_v: Optional[Tensor] = None,
    add_zero_attn: bool = False,
    dropout_p: float = 0.0,
    batch_first: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
    kv_lens: Optional[Tensor] = None,
) -> Tensor:
    """nn.MultiheadAttention's forward with the given parameters, its attention on `cross_attention`.

    What `CrossModalAttention.forward` computes; pass an nn.MultiheadAttention's own parameters to
    compute that module through mmkernels' kernels (dropout_p = its dropout while training, else 0):

        out = multi_head_attention_forward(x, x, x, num_heads=mha.num_heads,
            in_proj_weight=mha.in_proj_weight, in_proj_bias=mha.in_proj_bias,
            out_proj_weight=mha.out_proj.weight, out_proj_bias=mha.out_proj.bias,
            q_proj_weight=mha.q_proj_weight, k_proj_weight=mha.k_proj_weight, v_proj_weight=mha.v_proj_weight,
            bias_k=mha.bias_k, bias_v=mha.bias_v, add_zero_attn=mha.add_zero_attn,
            dropout_p=mha.dropout if mha.training else 0.0, batch_first=mha.batch_first)

    Shapes (E = embed_dim, the out-projection's size): query (L, N, E), or (N, L, E) with
    batch_first, or (L, E) unbatched; key (S, N, kdim); value (S, N, vdim). in_proj_weight (3E, E)
    and in_proj_bias (3E,), or q_proj_weight (E, E), k_proj_weight (E, kdim), v_proj_weight
    (E, vdim) when in_proj_weight is None; out_proj_weight (E, E); bias_k, bias_v (1, 1, E).
    key_padding_mask: (N, S) bool (True = padding) or additive float; attn_mask: (L, S) or
    (N · num_heads, L, S), bool (True = NOT allowed, as in nn.MultiheadAttention) or additive
    float; kv_lens: (N,) int, each sample's number of keys (a prefix; the kernels skip the rest).
    is_causal: apply the causal mask (attn_mask is then not read, except where
    nn.MultiheadAttention itself applies it: with bias_k or add_zero_attn and a padding mask).
    Returns attn_output shaped like query. A query with every key masked gets a zero attention
    vector (its out-projection is out_proj_bias), where nn.MultiheadAttention returns NaN.
    """
    _check_positive_int("num_heads", num_heads)
    separate = (q_proj_weight, k_proj_weight, v_proj_weight)
    if in_proj_weight is None and not all(isinstance(w, torch.Tensor) for w in separate):
        raise TypeError("expected in_proj_weight, or q_proj_weight, k_proj_weight and v_proj_weight, to be tensors, "
                        f"got {', '.join(describe_type(w) for w in (in_proj_weight, *separate))}")
    if not isinstance(out_proj_weight, torch.Tensor):
        raise TypeError(f"expected out_proj_weight to be a tensor, got {describe_type(out_proj_weight)}")
    if (bias_k is None) != (bias_v is None):
        raise ValueError("expected bias_k and bias_v both given or both None")
    weight = in_proj_weight if in_proj_weight is not None else q_proj_weight
    _check_inputs_and_weights(query, key, value, weight)
    embed_dim = out_proj_weight.shape[0]
    if embed_dim % num_heads != 0:
        raise ValueError(f"expected embed_dim divisible by num_heads, got {embed_dim} and {num_heads}")
    kdim = in_proj_weight.shape[1] if in_proj_weight is not None else k_proj_weight.shape[1]
    vdim = in_proj_weight.shape[1] if in_proj_weight is not None else v_proj_weight.shape[1]
    is_causal = check_bool("is_causal", is_causal)
    add_zero_attn = check_bool("add_zero_attn", add_zero_attn)
    batch_first = check_bool("batch_first", batch_first)
    check_real("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"expected dropout_p in [0, 1), got {dropout_p}")
    _check_mask_type("key_padding_mask", key_padding_mask, "padding")
    _check_mask_type("attn_mask", attn_mask, "not allowed")
    if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
        raise ValueError(
            "expected query, key and value all 3-D (batched) or all 2-D (unbatched), got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if query.shape[-1] != embed_dim or key.shape[-1] != kdim or value.shape[-1] != vdim:
        raise ValueError(
            f"expected query, key and value with {embed_dim}, {kdim} and {vdim} features, "
            f"got {query.shape[-1]}, {key.shape[-1]} and {value.shape[-1]}"
        )
    batched = query.dim() == 3
    key_is_query, value_is_key = key is query, value is key
    padding_shape = None if key_padding_mask is None else tuple(key_padding_mask.shape)
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    # Views of one input stay one object, so that _project runs one packed in-projection.
    key = query if key_is_query else key
    value = key if value_is_key else value
    if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
        raise ValueError(
            "expected query, key and value with one batch size and key and value with one length, got "
            f"(N, L) = {tuple(query.shape[:2])}, {tuple(key.shape[:2])} and {tuple(value.shape[:2])}"
        )
    # Now (N, L, E), views of the caller's tensors.
    batch, len_q = query.shape[:2]
    len_k = key.shape[1]
    check_lengths("kv_lens", kv_lens, batch, len_k, "Lk", query.device)
    if key_padding_mask is not None and key_padding_mask.shape != (batch, len_k):
        expected = f"(N, S) = ({batch}, {len_k})" if batched else f"(S,) = ({len_k},)"
        raise ValueError(f"expected key_padding_mask of shape {expected}, got {padding_shape}")
    extra_keys = int(bias_k is not None) + int(add_zero_attn)
    if is_causal and extra_keys and attn_mask is not None and (key_padding_mask is not None or kv_lens is not None):
        # nn.MultiheadAttention takes is_causal as a hint only without a padding mask; with one it
        # applies attn_mask, whose appended columns let every query attend bias_k and the zero key.
        is_causal = False
    attn_mask = None if is_causal else attn_mask
    attn_mask_shapes = {2: (len_q, len_k), 3: (batch * num_heads, len_q, len_k)}
    if attn_mask is not None and attn_mask_shapes.get(attn_mask.dim()) != attn_mask.shape:
        raise ValueError(
            f"expected attn_mask of shape (L, S) = {attn_mask_shapes[2]} or (N * num_heads, L, S) = "
            f"{attn_mask_shapes[3]}, got {tuple(attn_mask.shape)}"
        )

    head_dim = embed_dim // num_heads
    q, k, v = (t.transpose(1, 2) for t in _project(query, key, value, num_heads, in_proj_weight, in_proj_bias,
                                                   q_proj_weight, k_proj_weight, v_proj_weight))
    if bias_k is not None:
        # Cast to the projections' dtype: under autocast they are half while the parameters are not.
        k = torch.cat([k, bias_k.to(k.dtype).view(1, num_heads, 1, head_dim).expand(batch, -1, -1, -1)], 2)
        v = torch.cat([v, bias_v.to(v.dtype).view(1, num_heads, 1, head_dim).expand(batch, -1, -1, -1)], 2)
    if add_zero_attn:
        k = F.pad(k, (0, 0, 0, 1))
        v = F.pad(v, (0, 0, 0, 1))
    spec = AttnSpec.from_multihead_attention(key_padding_mask=key_padding_mask, attn_mask=attn_mask, kv_lens=kv_lens,
                                             is_causal=is_causal, num_heads=num_heads, batch=batch, len_q=len_q,
                                             len_k=len_k, extra_keys=extra_keys, like=q)
    out = cross_attention(q, k, v, spec=spec, dropout_p=float(dropout_p))
    # out: (N, H, L, hd), laid out as (N, L, H, hd).
    if batched and not batch_first:
        out = out.permute(2, 0, 1, 3).reshape(len_q, batch, embed_dim)
    else:
        out = out.transpose(1, 2).reshape(batch, len_q, embed_dim)
    out = F.linear(out, out_proj_weight, out_proj_bias)
    return out if batched else out.squeeze(0)


class CrossModalAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's constructor, parameters and forward.

    Same arguments (embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
    batch_first, device, dtype), same parameter names (in_proj_weight, or q_proj_weight,
    k_proj_weight and v_proj_weight when kdim or vdim differ from embed_dim; in_proj_bias,
    out_proj, bias_k, bias_v) and the same initialisation, so an nn.MultiheadAttention checkpoint
    loads with `load_state_dict` and `from_torch(mha)` copies a live module. The forward is
    `multi_head_attention_forward` with these parameters.

    Differences from nn.MultiheadAttention:
    - The attention weights are never materialised: `need_weights` defaults to False (so that
      `attn(q, k, v)` works unchanged) and `need_weights=True` raises ValueError. The second value
      returned is always None.
    - `kv_lens=` ((B,) int): each sample's number of keys (keys are a prefix); the kernels skip
      the padded keys' blocks instead of masking them. Combine freely with key_padding_mask.
    - `is_causal=True` applies the causal mask itself; `attn_mask` (which nn.MultiheadAttention
      requires with that hint) is then not read, except where nn.MultiheadAttention itself applies
      it: with add_bias_kv or add_zero_attn and a key padding mask (or kv_lens), where every query
      attends the appended keys.
    - A query with every key masked returns the out-projection of a zero vector (its bias), where
      nn.MultiheadAttention returns NaN.
    - Inputs must have the module's dtype (or run under torch.autocast); a mismatch raises a
      TypeError saying how to cast.
    """

    __constants__ = ["batch_first"]

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        _check_positive_int("embed_dim", embed_dim)
        _check_positive_int("num_heads", num_heads)
        _check_positive_int("kdim", kdim, optional=True)
        _check_positive_int("vdim", vdim, optional=True)
        if embed_dim % num_heads != 0:
            raise ValueError(f"expected embed_dim divisible by num_heads, got {embed_dim} and {num_heads}")
        check_real("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"expected dropout in [0, 1), got {dropout}")
        bias, add_bias_kv = check_bool("bias", bias), check_bool("add_bias_kv", add_bias_kv)
        add_zero_attn, batch_first = check_bool("add_zero_attn", add_zero_attn), check_bool("batch_first", batch_first)
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = int(embed_dim)
        self.kdim = int(kdim) if kdim is not None else self.embed_dim
        self.vdim = int(vdim) if vdim is not None else self.embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = int(num_heads)
        self.dropout = float(dropout)
        self.batch_first = batch_first
        self.head_dim = self.embed_dim // self.num_heads
        embed_dim = self.embed_dim

        # Created in nn.MultiheadAttention's order, so that one seed gives both the same weights.
        if not self._qkv_same_embed_dim:
            self.q_proj_weight = nn.Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = nn.Parameter(torch.empty((embed_dim, self.kdim), **factory_kwargs))
            self.v_proj_weight = nn.Parameter(torch.empty((embed_dim, self.vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        else:
            self.in_proj_weight = nn.Parameter(torch.empty((3 * embed_dim, embed_dim), **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, **factory_kwargs)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
            self.bias_v = nn.Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            nn.init.xavier_normal_(self.bias_v)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "CrossModalAttention":
        """A CrossModalAttention with `mha`'s configuration, a copy of its weights, and its mode."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"expected an nn.MultiheadAttention, got {describe_type(mha)}")
        weight = mha.out_proj.weight
        module = cls(
            mha.embed_dim,
            mha.num_heads,
            dropout=mha.dropout,
            bias=mha.in_proj_bias is not None,
            add_bias_kv=mha.bias_k is not None,
            add_zero_attn=mha.add_zero_attn,
            kdim=mha.kdim,
            vdim=mha.vdim,
            batch_first=mha.batch_first,
            device=weight.device,
            dtype=weight.dtype,
        )
        module.load_state_dict(mha.state_dict())
        return module.train(mha.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = False,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        *,
        kv_lens: Optional[Tensor] = None,
    ) -> tuple[Tensor, None]:
        """query: (L, N, E) (or (N, L, E) with batch_first, or (L, E) unbatched); key: (S, N, kdim);
        value: (S, N, vdim); key_padding_mask: (N, S) bool (True = padding) or additive float;
        attn_mask: (L, S) or (N · num_heads, L, S), bool (True = NOT allowed, as in
        nn.MultiheadAttention) or additive float; kv_lens: (N,) int. Returns (attn_output, None)
        with attn_output shaped like query (E features). `average_attn_weights` is accepted for
        compatibility and has no effect.
        """
        if check_bool("need_weights", need_weights):
            raise ValueError(
                "CrossModalAttention never materialises the (L, S) attention weights (its kernels keep "
                "them on chip); call it with need_weights=False, or use nn.MultiheadAttention to inspect them"
            )
        out = multi_head_attention_forward(
            query, key, value,
            num_heads=self.num_heads,
            in_proj_weight=self.in_proj_weight,
            in_proj_bias=self.in_proj_bias,
            out_proj_weight=self.out_proj.weight,
            out_proj_bias=self.out_proj.bias,
            q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight,
            v_proj_weight=self.v_proj_weight,
            bias_k=self.bias_k,
            bias_v=self.bias_v,
            add_zero_attn=self.add_zero_attn,
            dropout_p=self.dropout if self.training else 0.0,
            batch_first=self.batch_first,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
            kv_lens=kv_lens,
        )
        return out, None
