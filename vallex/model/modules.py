"""Building blocks of the VALL-E X model (see ``vallex.model.vallex`` for how they fit together).

Attribute names follow the public reference (Plachtaa/VALL-E-X ``modules/``, itself lifeiteng/vall-e's
``valle/modules/``) so that its ``vallex-checkpoint.pt`` loads key for key:

- ``TokenEmbedding.word_embeddings``                       (``modules/embedding.py``)
- ``SinePositionalEmbedding.alpha``                        (``modules/embedding.py``)
- ``SelfAttention.in_proj_weight / in_proj_bias / out_proj`` (``modules/activation.py``, packed q|k|v)
- ``TransformerLayer.self_attn / linear1 / linear2 / norm1 / norm2`` (``modules/transformer.py``)
- ``AdaptiveLayerNorm.project_layer / norm``               (``modules/transformer.py``)
- ``Transformer.layers / norm``                            (``modules/transformer.py`` TransformerEncoder)

Every parameter is only ever read inside the forward of the module that owns it: DeepSpeed ZeRO-3 gathers
a module's parameters in a pre-forward hook, so reaching into ``child.weight`` from a parent would see an
empty, partitioned tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KVCache = tuple[torch.Tensor, torch.Tensor]  # (keys, values), each [B, nhead, L, head_dim]


class TokenEmbedding(nn.Module):
    """``nn.Embedding`` under the reference's attribute name (keys ``*.word_embeddings.weight``)."""

    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, dim)  # N(0, 1) init, as the reference

    @property
    def weight(self) -> nn.Parameter:
        return self.word_embeddings.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings(ids)


class SinePositionalEmbedding(nn.Module):
    """``x + alpha * PE[offset : offset + T]`` with the fixed sinusoids of Vaswani et al. (2017), then dropout.

    ``alpha`` is one scalar; the reference learns it for the AR streams and freezes it at 1 for the NAR
    (``alpha=True/False`` in ``models/vallex.py``), so a learnable alpha lets the AR rescale position
    against content. The table is recomputed per call (``T x d/2`` sin/cos, negligible next to attention),
    so nothing but ``alpha`` lands in the state dict and ``offset`` serves KV-cached decoding.
    """

    def __init__(self, dim: int, dropout: float, learnable_alpha: bool):
        super().__init__()
        if dim % 2:
            raise ValueError(f"sine positions need an even width, got d_model={dim}")
        self.dim = dim
        self.alpha = nn.Parameter(torch.ones(1), requires_grad=learnable_alpha)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        T = x.size(1)
        pos = torch.arange(offset, offset + T, device=x.device, dtype=torch.float32)[:, None]
        inv_freq = torch.exp(
            torch.arange(0, self.dim, 2, device=x.device, dtype=torch.float32)
            * (-math.log(10000.0) / self.dim)
        )
        pe = torch.stack([torch.sin(pos * inv_freq), torch.cos(pos * inv_freq)], dim=-1).flatten(
            1
        )  # sin, cos interleaved
        return self.dropout(x + self.alpha * pe.to(x.dtype))


class AdaptiveLayerNorm(nn.Module):
    """AdaLN: ``g(c) * LayerNorm(x) + b(c)`` with ``[g, b] = Linear(c)``; ``c`` is the NAR stage embedding.

    One NAR transformer serves all 7 stages; the stage enters only through these gains and biases
    (VALL-E paper sec. 4.2.2, "AdaLN(h, i) = a_i LayerNorm(h) + b_i"). Note the gain is ``g``, not
    ``1 + g``: the reference's parametrisation, kept so its checkpoint means the same thing here.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.project_layer = nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gain, bias = self.project_layer(cond).split(self.dim, dim=-1)  # cond [B, 1, d] broadcasts over time
        return gain * self.norm(x) + bias


class SelfAttention(nn.Module):
    """Multi-head self-attention with packed q|k|v weights (``nn.MultiheadAttention``'s layout) on SDPA."""

    def __init__(self, dim: int, nhead: int, dropout: float):
        super().__init__()
        self.nhead = nhead
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention._reset_parameters
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, past_kv: KVCache | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """x [B, T, d]; mask bool, True = may attend, broadcastable to [B, nhead, T, L_past + T]."""
        B, T, C = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.nhead, C // self.nhead).transpose(1, 2) for t in (q, k, v))
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class TransformerLayer(nn.Module):
    """One encoder layer: self-attention and a ReLU feed-forward, each a residual branch.

    Pre-norm (``norm_first``) is the reference's setting for VALL-E X: ``x + f(norm(x))``. With
    ``adaptive`` the two norms are AdaLN conditioned on the NAR stage.
    """

    def __init__(
        self,
        dim: int,
        nhead: int,
        dim_ff: int,
        dropout: float,
        attention_dropout: float,
        norm_first: bool,
        adaptive: bool,
    ):
        super().__init__()
        self.norm_first = norm_first
        self.adaptive = adaptive
        self.self_attn = SelfAttention(dim, nhead, attention_dropout)
        self.linear1 = nn.Linear(dim, dim_ff)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_ff, dim)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm1 = AdaptiveLayerNorm(dim) if adaptive else nn.LayerNorm(dim)
        self.norm2 = AdaptiveLayerNorm(dim) if adaptive else nn.LayerNorm(dim)

    def _norm(self, norm: nn.Module, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return norm(x, cond) if self.adaptive else norm(x)

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x)))))

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cond: torch.Tensor | None = None,
        past_kv: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        if self.norm_first:
            a, kv = self.self_attn(self._norm(self.norm1, x, cond), mask, past_kv)
            x = x + self.dropout1(a)
            x = x + self._ff(self._norm(self.norm2, x, cond))
        else:
            a, kv = self.self_attn(x, mask, past_kv)
            x = self._norm(self.norm1, x + self.dropout1(a), cond)
            x = self._norm(self.norm2, x + self._ff(x), cond)
        return x, kv


class Transformer(nn.Module):
    """A stack of ``TransformerLayer`` plus, for pre-norm, a final (Adaptive)LayerNorm."""

    def __init__(
        self,
        dim: int,
        nhead: int,
        num_layers: int,
        dim_ff: int,
        dropout: float,
        attention_dropout: float,
        norm_first: bool,
        adaptive: bool,
        activation_checkpointing: bool = False,
    ):
        super().__init__()
        self.adaptive = adaptive
        self.activation_checkpointing = activation_checkpointing
        self.layers = nn.ModuleList(
            TransformerLayer(dim, nhead, dim_ff, dropout, attention_dropout, norm_first, adaptive)
            for _ in range(num_layers)
        )
        # Post-norm layers already end in a norm; pre-norm needs one before the output projection.
        self.norm = (AdaptiveLayerNorm(dim) if adaptive else nn.LayerNorm(dim)) if norm_first else None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cond: torch.Tensor | None = None,
        past_kvs: list[KVCache] | None = None,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, list[KVCache] | None]:
        """Returns the output and, with ``use_cache``, each layer's (keys, values) for KV-cached decoding."""
        use_ckpt = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        kvs = [] if use_cache else None
        for i, layer in enumerate(self.layers):
            past = None if past_kvs is None else past_kvs[i]
            if use_ckpt:
                # Recompute the layer in backward instead of storing its activations (~L x less memory).
                x, kv = checkpoint(layer, x, mask, cond, past, use_reentrant=False)
            else:
                x, kv = layer(x, mask, cond, past)
            if kvs is not None:
                kvs.append(kv)
        if self.norm is not None:
            x = self.norm(x, cond) if self.adaptive else self.norm(x)
        return x, kvs
