"""Attention over the paged KV cache.

Layout: each layer owns a key cache and a value cache of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; a token's slot is
``block_id * block_size + offset``. One call handles prefill, decode and
verification alike: sequence ``b`` brings ``q_len_b`` new query tokens that sit at
the END of its ``seq_lens[b]`` cached tokens, and each attends causally.

``paged_attention_ref`` is the torch reference (CPU and GPU); the Triton kernels
below it compute the same; ``paged_attention`` / ``write_kv`` dispatch to Triton on
CUDA tensors and to the reference elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Per-step attention metadata for a flattened batch of ``T`` query tokens."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V is written to; -1 skips
    query_start_loc: torch.Tensor  # [B + 1] int32: token offsets of each sequence's queries
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence, new tokens included
    block_tables: torch.Tensor  # [B, max_blocks] int32: block ids of each sequence (padding ignored)
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


def write_kv_ref(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values ``[T, Hkv, D]`` into their slots; slot -1 is skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k[keep].to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of queries ``[T, Hq, D]`` over the paged cache; returns ``[T, Hq, D]``.

    Computed in float32 one sequence at a time: slow, obviously right.
    """
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = meta.query_start_loc.tolist()
    lens = meta.seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        q0, q1 = starts[b], starts[b + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        n_blocks = (seq_len + block_size - 1) // block_size
        blocks = meta.block_tables[b, :n_blocks].long()
        k = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        v = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:seq_len].float()
        k = k.repeat_interleave(group, dim=1)  # [S, Hq, D]
        v = v.repeat_interleave(group, dim=1)
        qb = q[q0:q1].float()  # [Q, Hq, D]
        scores = torch.einsum("qhd,shd->hqs", qb, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        scores.masked_fill_((k_pos[None, :] > q_pos[:, None])[None], float("-inf"))
        probs = scores.softmax(dim=-1)
        out[q0:q1] = torch.einsum("hqs,shd->qhd", probs, v).to(q.dtype)
    return out


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    if k.is_cuda:
        write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    if q.is_cuda:
        return paged_attention_triton(q, k_cache, v_cache, meta, scale)
    return paged_attention_ref(q, k_cache, v_cache, meta, scale)
