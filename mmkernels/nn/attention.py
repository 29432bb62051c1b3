"""`CrossModalAttention`: nn.MultiheadAttention's API on mmkernels' fused attention."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from mmkernels.ops.attention import check_lengths, cross_attention

__all__ = ["CrossModalAttention"]


def _check_mask_type(name: str, mask, bool_meaning: str) -> None:
    """nn.MultiheadAttention's rule: a mask is None, bool (`bool_meaning`) or floating (additive)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"expected {name} to be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"expected {name} to be bool (True = {bool_meaning}) or floating (additive), got {mask.dtype}")


class CrossModalAttention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's constructor, parameters and forward.

    Same arguments (embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
    batch_first, device, dtype), same parameter names (in_proj_weight, or q_proj_weight,
    k_proj_weight and v_proj_weight when kdim or vdim differ from embed_dim; in_proj_bias,
    out_proj, bias_k, bias_v) and the same initialisation, so an nn.MultiheadAttention checkpoint
    loads with `load_state_dict` and `from_torch(mha)` copies a live module.

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
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"expected embed_dim and num_heads greater than 0, got embed_dim={embed_dim} and num_heads={num_heads}"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(f"expected embed_dim divisible by num_heads, got {embed_dim} and {num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"expected dropout in [0, 1), got {dropout}")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads

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
            raise TypeError(f"expected an nn.MultiheadAttention, got {type(mha).__name__}")
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

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """In-projections, as views of the linear outputs: (N, L, E) inputs → (N, L, H, hd) each."""
        heads, head_dim, embed = self.num_heads, self.head_dim, self.embed_dim
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        if self._qkv_same_embed_dim and query is key and key is value:
            packed = F.linear(query, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, heads, head_dim))
            return packed[..., 0, :, :], packed[..., 1, :, :], packed[..., 2, :, :]
        q = F.linear(query, weights[0], biases[0]).unflatten(-1, (heads, head_dim))
        if self._qkv_same_embed_dim and key is value:
            kv_bias = self.in_proj_bias[embed:] if self.in_proj_bias is not None else None
            kv = F.linear(key, self.in_proj_weight[embed:], kv_bias).unflatten(-1, (2, heads, head_dim))
            return q, kv[..., 0, :, :], kv[..., 1, :, :]
        k = F.linear(key, weights[1], biases[1]).unflatten(-1, (heads, head_dim))
        v = F.linear(value, weights[2], biases[2]).unflatten(-1, (heads, head_dim))
        return q, k, v

    def _masks(self, key_padding_mask, attn_mask, kv_lens, batch: int, len_q: int, len_k: int, like: Tensor):
        """nn.MultiheadAttention's masks in cross_attention's conventions: key_padding_mask bool
        (B, S) True = padding; attn_mask bool True = attend, or additive, (B or 1, H or 1, L, S)."""
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(batch, self.num_heads, len_q, len_k)
            attn_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
        if key_padding_mask is not None and key_padding_mask.dtype != torch.bool:
            additive = key_padding_mask.to(like.dtype).view(batch, 1, 1, len_k)
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros(attn_mask.shape, dtype=like.dtype, device=like.device).masked_fill(
                    ~attn_mask, float("-inf")
                )
            attn_mask = additive if attn_mask is None else attn_mask + additive
            key_padding_mask = None
        extra_keys = int(self.bias_k is not None) + int(self.add_zero_attn)
        if extra_keys and (kv_lens is not None or key_padding_mask is not None):
            # The appended keys sit past every sample's length: say "padding" with a mask instead.
            padding = torch.zeros(batch, len_k, dtype=torch.bool, device=like.device)
            if kv_lens is not None:
                kv_lens = kv_lens.to(like.device, non_blocking=True)
                padding = torch.arange(len_k, device=like.device) >= kv_lens.view(batch, 1)
            if key_padding_mask is not None:
                padding = padding | key_padding_mask
            key_padding_mask, kv_lens = F.pad(padding, (0, extra_keys), value=False), None
        if extra_keys and attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, extra_keys), value=True if attn_mask.dtype == torch.bool else 0.0)
        return key_padding_mask, attn_mask, kv_lens

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
        if need_weights:
            raise ValueError(
                "CrossModalAttention never materialises the (L, S) attention weights (its kernels keep "
                "them on chip); call it with need_weights=False, or use nn.MultiheadAttention to inspect them"
            )
        _check_mask_type("key_padding_mask", key_padding_mask, "padding")
        _check_mask_type("attn_mask", attn_mask, "not allowed")
        if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                "expected query, key and value all 3-D (batched) or all 2-D (unbatched), got shapes "
                f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}"
            )
        if query.shape[-1] != self.embed_dim or key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"expected query, key and value with {self.embed_dim}, {self.kdim} and {self.vdim} features, "
                f"got {query.shape[-1]}, {key.shape[-1]} and {value.shape[-1]}"
            )
        batched = query.dim() == 3
        key_is_query, value_is_key = key is query, value is key
        padding_shape = None if key_padding_mask is None else tuple(key_padding_mask.shape)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
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
        extra_keys = self.bias_k is not None or self.add_zero_attn
        if is_causal and extra_keys and attn_mask is not None and (key_padding_mask is not None or kv_lens is not None):
            # nn.MultiheadAttention takes is_causal as a hint only without a padding mask; with one it
            # applies attn_mask, whose appended columns let every query attend bias_k and the zero key.
            is_causal = False
        attn_mask = None if is_causal else attn_mask
        attn_mask_shapes = {2: (len_q, len_k), 3: (batch * self.num_heads, len_q, len_k)}
        if attn_mask is not None and attn_mask_shapes.get(attn_mask.dim()) != attn_mask.shape:
            raise ValueError(
                f"expected attn_mask of shape (L, S) = {attn_mask_shapes[2]} or (N * num_heads, L, S) = "
                f"{attn_mask_shapes[3]}, got {tuple(attn_mask.shape)}"
            )

        q, k, v = (t.transpose(1, 2) for t in self._project(query, key, value))
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.view(1, self.num_heads, 1, self.head_dim).expand(batch, -1, -1, -1)], 2)
            v = torch.cat([v, self.bias_v.view(1, self.num_heads, 1, self.head_dim).expand(batch, -1, -1, -1)], 2)
        if self.add_zero_attn:
            k = F.pad(k, (0, 0, 0, 1))
            v = F.pad(v, (0, 0, 0, 1))
        key_padding_mask, attn_mask, kv_lens = self._masks(key_padding_mask, attn_mask, kv_lens, batch, len_q, len_k, q)
        out = cross_attention(
            q, k, v,
            kv_lens=kv_lens,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        # out: (N, H, L, hd), laid out as (N, L, H, hd).
        if batched and not self.batch_first:
            out = out.permute(2, 0, 1, 3).reshape(len_q, batch, self.embed_dim)
        else:
            out = out.transpose(1, 2).reshape(batch, len_q, self.embed_dim)
        out = self.out_proj(out)
        return (out if batched else out.squeeze(0)), None
