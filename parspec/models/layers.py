"""Building blocks shared by the model families and the EAGLE-3 drafter."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parspec import batch_invariant
from parspec.attention import AttentionMetadata, paged_attention
from parspec.layer_kernels import add_rms_norm, rms_norm, rope_and_write_kv, rotate_half_ref, silu_and_mul


class Linear(nn.Linear):
    """nn.Linear that, in the batch-invariant mode (``batch_invariant.set_batch_invariant``),
    multiplies each row the same way whatever the number of rows."""

    batch_invariant = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_invariant:
            return batch_invariant.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual add then norm; returns (normed, new residual)."""
        return add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    # float32 throughout, as HF computes it, so positions far out rotate identically.
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else "default"
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: long wavelengths divided by `factor`, short ones kept, smooth in between.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(is_mid, mid, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding (rotate halves), cos/sin cached for all positions."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        self.args = (head_dim, max_positions, theta, scaling)
        self.register_buffer("cos", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim // 2), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the tables in float32; the loader calls this after a meta-device build."""
        head_dim, max_positions, theta, scaling = self.args
        if self.cos.is_meta:
            return
        t = torch.arange(max_positions, dtype=torch.float32, device=self.cos.device)
        freqs = torch.outer(t, rope_inv_freq(head_dim, theta, scaling).to(t.device))
        self.cos, self.sin = freqs.cos(), freqs.sin()

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].unsqueeze(-2)  # [..., T, 1, D/2]
        sin = self.sin[positions].unsqueeze(-2)
        return rotate_half_ref(q, cos, sin), rotate_half_ref(k, cos, sin)


@dataclass
class DenseKV:
    """Attention metadata for keys/values in caller-owned dense buffers, ``[rows, positions,
    kv_heads, head_dim]`` per attention layer, indexed by position (SPD's EAGLE-3 drafter chain
    and its one-process replay, which keep a few rows and roll back by overwriting positions).

    The queries are ``rows`` x ``per_row`` tokens, flattened. Each layer writes its keys/values
    at the queries' positions in its buffers, then every query attends to the keys at positions
    <= its own among the first ``span`` (fixed: a CUDA graph can capture it)."""

    buffers: dict  # attention module -> (k, v) buffers
    rows: int
    per_row: int
    span: int

    def attend(self, attn: PagedSelfAttention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, t = self.rows, self.per_row
        pos = positions.view(b, t)
        q, k, v = attn.project_qkv(x.view(b, t, -1), pos)
        k_buf, v_buf = self.buffers[attn]
        rows = torch.arange(b, device=x.device)[:, None]
        k_buf[rows, pos], v_buf[rows, pos] = k, v  # written first: a token attends to itself
        mask = torch.arange(self.span, device=x.device) <= pos[..., None]  # [b, t, span]
        return attn._dense_attention(q, k_buf[:b, :self.span], v_buf[:b, :self.span], mask)


@dataclass
class GrowingKV:
    """Attention metadata of EAGLE-3's training-time test: each layer keeps the keys/values
    (after rope) of every call that shares ``kept`` and attends over them plus its new queries',
    by ``mask`` [B, Nq, Nk] (the queries are the last Nq keys), so TTT step i runs only its own
    new entries."""

    mask: torch.Tensor
    kept: dict  # attention module -> (k, v) so far; shared by the calls of one TTT pass

    def attend(self, attn: PagedSelfAttention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        q, k, v = attn.project_qkv(x, positions)
        if attn in self.kept:
            k_old, v_old = self.kept[attn]
            k, v = torch.cat([k_old, k], dim=-3), torch.cat([v_old, v], dim=-3)
        self.kept[attn] = k, v
        return attn._dense_attention(q, k, v, self.mask)


class PagedSelfAttention(nn.Module):
    """GQA self-attention whose K/V live in the paged cache the runner binds to it.

    ``input_size`` may differ from ``hidden_size`` (EAGLE-3's first layer reads
    [embedding; feature] = 2 x hidden)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 rope: RotaryEmbedding, bias: bool = False, qk_norm_eps: float | None = None,
                 input_size: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = Linear(input_size or hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = Linear(self.q_size, hidden_size, bias=False)
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.rope = rope
        self.scale = head_dim ** -0.5
        self.k_cache: torch.Tensor | None = None  # bound by the runner
        self.v_cache: torch.Tensor | None = None
        self.batch_invariant = False  # batch_invariant.set_batch_invariant: fixed-split attention

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata | DenseKV | GrowingKV | torch.Tensor) -> torch.Tensor:
        """``meta`` is the paged-cache metadata at inference; :class:`DenseKV` for keys/values in
        the caller's dense buffers; :class:`GrowingKV` for training-time test; or, for training
        without a cache, a boolean mask ``[..., T, T]`` (True = may attend) over ``x`` of
        ``[..., T, C]``."""
        lead = x.shape[:-1]
        if isinstance(meta, torch.Tensor):
            o = self._dense_attention(*self.project_qkv(x, positions), meta)
        elif isinstance(meta, (DenseKV, GrowingKV)):
            o = meta.attend(self, x, positions)
        else:
            q, k, v = self._project_heads(x)
            q = rope_and_write_kv(q, k, v, positions, self.rope.cos, self.rope.sin,
                                  self.k_cache, self.v_cache, meta.slot_mapping)
            attend = batch_invariant.paged_attention if self.batch_invariant else paged_attention
            o = attend(q, self.k_cache, self.v_cache, meta, self.scale)
        return self.o_proj(o.reshape(*lead, self.q_size))

    def project_qkv(self, x: torch.Tensor, positions: torch.Tensor):
        """Queries, keys and values ``[..., T, heads, D]``, normed (Qwen3) and rotated."""
        q, k, v = self._project_heads(x)
        q, k = self.rope(positions, q, k)
        return q, k, v

    def _project_heads(self, x: torch.Tensor):
        """Queries, keys and values ``[..., T, heads, D]``, not yet rotated: views of one GEMM
        output, but for q and k when Qwen3 norms them."""
        lead = x.shape[:-1]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(*lead, self.num_heads, self.head_dim)
        k = k.view(*lead, self.num_kv_heads, self.head_dim)
        v = v.view(*lead, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def _dense_attention(self, q, k, v, mask):
        group = self.num_heads // self.num_kv_heads
        # [..., T, H, D] -> [..., H, T, D] for SDPA; K/V heads repeated for GQA.
        q, k, v = (t.transpose(-3, -2) for t in (q, k, v))
        k = k.repeat_interleave(group, dim=-3)
        v = v.repeat_interleave(group, dim=-3)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(-3), scale=self.scale)
        return o.transpose(-3, -2)


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


# HF checkpoint names -> (our fused parameter, shard index); the loader uses this.
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
