"""Attention over the paged KV cache.

Layout: each layer owns a key cache and a value cache of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; a token's slot is
``block_id * block_size + offset``. One call handles prefill, decode and
verification alike: sequence ``b`` brings ``q_len_b`` new query tokens that sit at
the END of its ``seq_lens[b]`` cached tokens, and each attends causally. With
``query_positions`` set, each query instead sees the keys at positions up to its own
(a drafter's padded layout, where some queries are discarded and others skip ahead).

``paged_attention_ref`` is the torch reference (CPU and GPU); the Triton kernels
below it compute the same; ``paged_attention`` dispatches to Triton on CUDA tensors and
to the reference elsewhere. The model layers write K/V with the rotary fused in
(``parspec.layer_kernels.rope_and_write_kv``, whose reference is ``write_kv_ref``);
``write_kv_triton`` stays the plain scatter, for a caller with K/V already rotated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class AttentionMetadata:
    """Per-step attention metadata for a flattened batch of ``T`` query tokens."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot each new token's K/V is written to; -1 skips
    query_start_loc: torch.Tensor  # [B + 1] int32: token offsets of each sequence's queries
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence, new tokens included
    block_tables: torch.Tensor  # [B, max_blocks] int32: block ids of each sequence (padding ignored)
    max_query_len: int
    max_seq_len: int
    # [T] int64, optional: query t sees keys at positions <= query_positions[t] (all below
    # seq_lens of its sequence). None: the queries are the last q_len positions, in order.
    query_positions: torch.Tensor | None = None

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

    Computed in float32 over dense, padded copies of each sequence's keys and values:
    sequences with the same query length go together (a decode or verify step is one
    group), so thousands of short sequences cost a few tensor ops, not a Python loop."""
    starts = meta.query_start_loc.tolist()
    lens = meta.seq_lens.tolist()
    groups: dict[int, list[int]] = {}
    for b in range(len(lens)):
        if starts[b + 1] > starts[b]:
            groups.setdefault(starts[b + 1] - starts[b], []).append(b)
    out = torch.empty_like(q)
    for q_len, seqs in groups.items():
        rows = torch.tensor([starts[b] for b in seqs], device=q.device)[:, None] + torch.arange(q_len, device=q.device)
        seq_lens = torch.tensor([lens[b] for b in seqs], device=q.device)
        q_pos = None if meta.query_positions is None else meta.query_positions[rows]
        o = _attend_padded(q[rows], k_cache, v_cache, meta.block_tables[seqs], seq_lens, max(lens[b] for b in seqs),
                           scale, q_pos)
        out[rows.flatten()] = o.flatten(0, 1).to(q.dtype)
    return out


def _attend_padded(q, k_cache, v_cache, block_tables, seq_lens, max_len: int, scale: float,
                   q_pos: torch.Tensor | None = None) -> torch.Tensor:
    """q ``[G, Q, Hq, D]``: the last Q tokens of G sequences of lengths ``seq_lens``, or
    the tokens at positions ``q_pos`` ``[G, Q]`` when given."""
    num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
    group = q.shape[2] // num_kv_heads
    q_len = q.shape[1]
    n = (max_len + block_size - 1) // block_size
    tables = block_tables[:, :n].long().clamp(0, num_blocks - 1)  # padding entries read junk, masked below
    k_pos = torch.arange(max_len, device=q.device)
    present = (k_pos[None] < seq_lens[:, None])[:, :, None, None]  # [G, S, 1, 1]
    # Zero what lies past each sequence's end so junk (even NaN) never reaches the output.
    k = k_cache[tables].flatten(1, 2)[:, :max_len].float().masked_fill(~present, 0.0)
    v = v_cache[tables].flatten(1, 2)[:, :max_len].float().masked_fill(~present, 0.0)
    k = k.repeat_interleave(group, dim=2)  # [G, S, Hq, D]
    v = v.repeat_interleave(group, dim=2)
    scores = torch.einsum("gqhd,gshd->ghqs", q.float(), k) * scale
    if q_pos is None:
        q_pos = seq_lens[:, None] - q_len + torch.arange(q_len, device=q.device)  # [G, Q]
    visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & present[:, None, :, 0, 0]  # causal, inside
    scores.masked_fill_(~visible[:, None], float("-inf"))
    return torch.einsum("ghqs,gshd->gqhd", scores.softmax(dim=-1), v)


def paged_attention(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    if q.is_cuda:
        return paged_attention_triton(q, k_cache, v_cache, meta, scale)
    return paged_attention_ref(q, k_cache, v_cache, meta, scale)


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------
#
# ``write_kv_triton`` scatters one token per program.
#
# ``paged_attention_triton`` is a single flash-attention style kernel for prefill,
# decode and verification. A program owns one *query tile* of one sequence and one
# KV head: ``BLOCK_M`` rows, row ``r`` being query token ``r // GROUP`` of the tile
# and query head ``kv_head * GROUP + r % GROUP``, so the GROUP query heads that share
# a KV head read each K/V tile once. Keys are visited ``BLOCK_N`` at a time, gathered
# slot by slot through the block table (a tile may span several cache blocks), with
# an online softmax in float32 (base-2 exponentials, the log2(e) factor folded into
# the scale). Tiles entirely below the causal diagonal run without masks; the last
# few tiles up to the tile's last visible key are masked.
#
# Split-KV (flash-decoding): the grid has a third axis of ``num_splits``. Each program
# takes a contiguous, BLOCK_N-aligned chunk of the keys its tile can see (the chunking
# is computed per sequence on the device, so short sequences in a long batch get short
# chunks and possibly empty ones), and writes its normalised partial output and
# log-sum-exp to a float32 scratch buffer; ``_attn_reduce_kernel`` merges them.
#
# Compiled variants: Triton compiles once per value of each constexpr and, for plain
# integers, per (== 1, divisible by 16) class. Everything here that follows the step (the
# token count, the split count, the block-table width of a host-built batch, max_seq_len)
# is a runtime integer left unspecialised, so only the query tile (``_attn_config``), split
# or not (both compiled at once) and the call site's flags pick a variant; a request of a
# new length never waits for a compile.
#
# Batch-invariant mode (``batch_invariant=True``, parspec.batch_invariant): the default
# sizes BLOCK_M from the step's query length and cuts a tile's keys into a split count
# chosen from the batch, so a row's arithmetic follows its neighbours. In the mode the
# query tile is fixed (``invariant_block_m``), split ``s`` is always keys [s*SPLIT_KEYS,
# (s+1)*SPLIT_KEYS) of the sequence, and the splits of a row merge one after another in
# split order (``_merge_split``): over a split grid reduced by ``_attn_merge_kernel``, or
# inside the program when a grid would not pay. A split past a row's keys is empty and
# merges as an exact no-op, so neither a tile's other rows nor the grid's depth (from
# max_seq_len) reach a row's bits. Both paths run without fused multiply-adds, so the two
# merge loops round identically.


# -- write_kv ---------------------------------------------------------------------------

@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_kd,
                     stride_vt, stride_vh, stride_vd,
                     stride_kcb, stride_kcs, stride_kch, stride_kcd,
                     stride_vcb, stride_vcs, stride_vch, stride_vcd,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs = tl.arange(0, BLOCK)
    mask = offs < NUM_KV_HEADS * HEAD_DIM
    h = offs // HEAD_DIM
    d = offs % HEAD_DIM
    t64 = t.to(tl.int64)
    k = tl.load(k_ptr + t64 * stride_kt + h * stride_kh + d * stride_kd, mask=mask)
    v = tl.load(v_ptr + t64 * stride_vt + h * stride_vh + d * stride_vd, mask=mask)
    tl.store(k_cache_ptr + blk * stride_kcb + off * stride_kcs + h * stride_kch + d * stride_kcd,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d * stride_vcd,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Triton twin of :func:`write_kv_ref`: one program per token, slot < 0 skipped.

    ``k``/``v`` ``[T, Hkv, D]`` may be strided views (e.g. slices of a fused qkv);
    values are cast to the cache dtype on store. No host synchronisation.
    """
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    assert k.shape == v.shape == (num_tokens, num_kv_heads, head_dim), (k.shape, v.shape, k_cache.shape)
    assert v_cache.shape == k_cache.shape and slot_mapping.shape[0] == num_tokens
    block = triton.next_power_of_2(num_kv_heads * head_dim)
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK=block,
        num_warps=4 if block >= 1024 else 2)


# -- paged attention --------------------------------------------------------------------

_LOG2E = 1.4426950408889634

# Split-KV heuristic knobs (see _choose_num_splits).
SPLIT_TARGET_PROGRAMS_PER_SM = 2  # aim for about this many attention programs per SM
SPLIT_MIN_KEYS = 128  # never give a split fewer keys than this (of max_seq_len)
SPLIT_MAX = 64  # upper bound on num_splits
_DEFAULT_NUM_SMS = 132  # H100 SXM; used when the tensors are not on a GPU (interpreter)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _choose_num_splits(num_seqs: int, num_kv_heads: int, num_m_tiles: int, max_seq_len: int,
                       num_sms: int) -> int:
    """Split-KV factor from host ints only (never reads a device tensor).

    Without splitting the grid has ``num_seqs * num_kv_heads * num_m_tiles`` programs.
    If that already fills the GPU (>= num_sms) we do not split. Otherwise we split so the
    grid reaches about ``SPLIT_TARGET_PROGRAMS_PER_SM * num_sms`` programs, but never into
    chunks shorter than ``SPLIT_MIN_KEYS`` keys of ``max_seq_len``, and at most SPLIT_MAX.
    E.g. H100 (132 SMs), 8 kv heads, q_len 1..8 (one tile): batch 1 at 4096 -> 32 splits,
    batch 1 at 1024 -> 8, batch 4 at 4096 -> 9, batch 16 -> 3 (128 programs < 132).
    """
    base = num_seqs * num_kv_heads * num_m_tiles
    if base >= num_sms or max_seq_len <= SPLIT_MIN_KEYS:
        return 1
    want = -(-SPLIT_TARGET_PROGRAMS_PER_SM * num_sms // base)
    by_len = max(1, max_seq_len // SPLIT_MIN_KEYS)
    return max(1, min(want, by_len, SPLIT_MAX))


def _attn_config(dtype: torch.dtype, block_d: int, group: int, max_query_len: int, block_m: int | None = None):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) from host ints only; ``block_m`` fixes the
    query tile (the batch-invariant mode) instead of sizing it from ``max_query_len``.

    The query tile is the one compile-time choice that follows the step: a power of two from
    16 to 128 (64 when wide), so at most four per model and dtype (each with its split twin,
    see _compile_split_sibling), which ``LLMEngine.warm_up`` compiles with prompts of every
    size class."""
    wide = dtype == torch.float32 or block_d > 128
    if block_m is None:
        rows = max(max_query_len * group, triton.next_power_of_2(group))
        block_m = max(16, triton.next_power_of_2(rows))
        block_m = min(block_m, 64 if wide else 128)
        block_m = max(block_m, triton.next_power_of_2(group))
    block_n = 32 if wide else 64
    num_warps = 8 if block_m >= 128 else 4
    num_stages = 3 if block_m <= 32 else 2
    return block_m, block_n, num_warps, num_stages


@triton.jit
def _attn_step(acc, l_i, m_i, q, k_base, v_base, bt_row, start, kv_hi, q_pos, qk_scale,
               stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
               offs_n0, offs_d,
               HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
               EVEN_D: tl.constexpr, DOT_IEEE: tl.constexpr):
    offs_n = start + offs_n0
    n_mask = offs_n < kv_hi
    if MASKED:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    else:
        blk = tl.load(bt_row + offs_n // BLOCK_SIZE).to(tl.int64)
    within = offs_n % BLOCK_SIZE
    k_ptrs = k_base + (blk * stride_kb + within * stride_ks)[:, None] + offs_d[None, :] * stride_kd
    v_ptrs = v_base + (blk * stride_vb + within * stride_vs)[:, None] + offs_d[None, :] * stride_vd
    if MASKED:
        if EVEN_D:
            k = tl.load(k_ptrs, mask=n_mask[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=n_mask[:, None], other=0.0)
        else:
            kv_mask = n_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        if EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_mask = (offs_d < HEAD_DIM)[None, :]
            k = tl.load(k_ptrs, mask=d_mask, other=0.0)
            v = tl.load(v_ptrs, mask=d_mask, other=0.0)
    k = k.to(q.dtype)
    if DOT_IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DOT_IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, l_i, m_new


# Integers that follow the step (token count, split count, the block-table width of a
# host-built batch) are not specialised: a new value must never mean a new compile.
@triton.jit(do_not_specialize=["num_tokens", "num_splits", "stride_bt"])
def _paged_attn_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_part_ptr, o_part_ptr,
        query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, q_pos_ptr,
        qk_scale, num_tokens, num_splits,
        stride_qt, stride_qh, stride_qd,
        stride_ot, stride_oh, stride_od,
        stride_kb, stride_ks, stride_kh, stride_kd,
        stride_vb, stride_vs, stride_vh, stride_vd,
        stride_bt,
        NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
        TOKENS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_IEEE: tl.constexpr, HAS_QPOS: tl.constexpr,
        SPLIT_KEYS: tl.constexpr, MERGE_IN_PROGRAM: tl.constexpr, SPLIT: tl.constexpr):
    # Heaviest (last, most keys) query tiles first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // NUM_KV_HEADS
    kvh = pid_bh % NUM_KV_HEADS

    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    m_start = pid_m * TOKENS
    if m_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len  # absolute position of the sequence's first query

    offs_r = tl.arange(0, BLOCK_M)
    tok = offs_r // GROUP
    head = kvh * GROUP + offs_r % GROUP
    q_idx = m_start + tok
    row_valid = (tok < TOKENS) & (q_idx < q_len)
    q_rows = (q_start + q_idx).to(tl.int64)
    if HAS_QPOS:
        q_pos = tl.load(q_pos_ptr + q_rows, mask=row_valid, other=0).to(tl.int32)
    else:
        q_pos = ctx + q_idx
    offs_d = tl.arange(0, BLOCK_D)
    EVEN_D: tl.constexpr = BLOCK_D == HEAD_DIM
    d_ok = offs_d < HEAD_DIM

    q_ptrs = q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_valid[:, None] & d_ok[None, :], other=0.0)

    # Keys this tile can see: [0, kv_visible). Keys < full_end are seen by every row.
    if HAS_QPOS:
        kv_visible = tl.max(tl.where(row_valid, q_pos, -1), 0) + 1
        full_end = ((tl.min(tl.where(row_valid, q_pos, 2147483647), 0) + 1) // BLOCK_N) * BLOCK_N
    else:
        last_q = tl.minimum(m_start + TOKENS, q_len) - 1
        kv_visible = ctx + last_q + 1
        full_end = ((ctx + m_start + 1) // BLOCK_N) * BLOCK_N
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_base = k_cache_ptr + kvh * stride_kh
    v_base = v_cache_ptr + kvh * stride_vh
    offs_n0 = tl.arange(0, BLOCK_N)
    st_mask = row_valid[:, None] & d_ok[None, :]
    o_ptrs = out_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :] * stride_od

    if SPLIT_KEYS == 0:
        # Default: the tile's keys cut into num_splits equal, BLOCK_N-aligned chunks.
        n_tiles = tl.cdiv(kv_visible, BLOCK_N)
        tiles_per_split = tl.cdiv(n_tiles, num_splits)
        kv_lo = pid_s * tiles_per_split * BLOCK_N
        kv_hi = tl.minimum(kv_lo + tiles_per_split * BLOCK_N, kv_visible)
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_base, v_base, bt_row, kv_lo, kv_hi, full_end, q_pos,
                                     qk_scale, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                                     offs_n0, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N, EVEN_D, DOT_IEEE)
        if not SPLIT:
            has = l_i > 0.0
            o = acc / tl.where(has, l_i, 1.0)[:, None]
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=st_mask)
        else:
            o, lse = _split_result(acc, l_i, m_i)
            row_id = (pid_s * num_tokens + q_rows) * NUM_Q_HEADS + head  # [S, T, Hq] scratch
            tl.store(lse_part_ptr + row_id, lse, mask=row_valid)
            tl.store(o_part_ptr + row_id[:, None] * HEAD_DIM + offs_d[None, :], o, mask=st_mask)
    elif MERGE_IN_PROGRAM:
        # Batch-invariant, one program per tile: the same splits of SPLIT_KEYS keys as the
        # split grid below, attended and merged in split order exactly as _attn_merge_kernel does.
        m_run = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        w_run = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc_run = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for s in range(0, tl.cdiv(kv_visible, SPLIT_KEYS)):
            kv_lo = s * SPLIT_KEYS
            kv_hi = tl.minimum(kv_lo + SPLIT_KEYS, kv_visible)
            acc, l_i, m_i = _attend_keys(tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
                                         tl.zeros([BLOCK_M], dtype=tl.float32),
                                         tl.full([BLOCK_M], float("-inf"), dtype=tl.float32),
                                         q, k_base, v_base, bt_row, kv_lo, kv_hi, full_end, q_pos,
                                         qk_scale, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                                         offs_n0, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N, EVEN_D, DOT_IEEE)
            o, lse = _split_result(acc, l_i, m_i)
            m_run, w_run, acc_run = _merge_split(m_run, w_run, acc_run, lse, o)
        o = acc_run / tl.where(w_run > 0.0, w_run, 1.0)[:, None]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=st_mask)
    else:
        # Batch-invariant split grid: split pid_s is keys [pid_s * SPLIT_KEYS, + SPLIT_KEYS),
        # whatever the batch; splits past a tile's keys are empty (lse -inf, merged as no-ops).
        kv_lo = pid_s * SPLIT_KEYS
        kv_hi = tl.minimum(kv_lo + SPLIT_KEYS, kv_visible)
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_base, v_base, bt_row, kv_lo, kv_hi, full_end, q_pos,
                                     qk_scale, stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd,
                                     offs_n0, offs_d, HEAD_DIM, BLOCK_SIZE, BLOCK_N, EVEN_D, DOT_IEEE)
        o, lse = _split_result(acc, l_i, m_i)
        row_id = (pid_s * num_tokens + q_rows) * NUM_Q_HEADS + head
        tl.store(lse_part_ptr + row_id, lse, mask=row_valid)
        tl.store(o_part_ptr + row_id[:, None] * HEAD_DIM + offs_d[None, :], o, mask=st_mask)


@triton.jit
def _attend_keys(acc, l_i, m_i, q, k_base, v_base, bt_row, kv_lo, kv_hi, full_end, q_pos, qk_scale,
                 stride_kb, stride_ks, stride_kd, stride_vb, stride_vs, stride_vd, offs_n0, offs_d,
                 HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 EVEN_D: tl.constexpr, DOT_IEEE: tl.constexpr):
    """Online softmax over keys [kv_lo, kv_hi): tiles below ``full_end`` (seen by every row)
    without masks, the rest masked."""
    unmasked_end = tl.maximum(tl.minimum(full_end, kv_hi), kv_lo)
    for start in range(kv_lo, unmasked_end, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, bt_row, start, kv_hi, q_pos,
                                   qk_scale, stride_kb, stride_ks, stride_kd,
                                   stride_vb, stride_vs, stride_vd, offs_n0, offs_d,
                                   HEAD_DIM, BLOCK_SIZE, False, EVEN_D, DOT_IEEE)
    for start in range(unmasked_end, kv_hi, BLOCK_N):
        acc, l_i, m_i = _attn_step(acc, l_i, m_i, q, k_base, v_base, bt_row, start, kv_hi, q_pos,
                                   qk_scale, stride_kb, stride_ks, stride_kd,
                                   stride_vb, stride_vs, stride_vd, offs_n0, offs_d,
                                   HEAD_DIM, BLOCK_SIZE, True, EVEN_D, DOT_IEEE)
    return acc, l_i, m_i


@triton.jit
def _split_result(acc, l_i, m_i):
    """A split's normalised output and log2-sum-exp (-inf for a row that saw no key)."""
    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    return o, lse


@triton.jit
def _merge_split(m_run, w_run, acc_run, lse, o):
    """Folds one split (log2-sum-exp ``lse``, output ``o``) into a running merge; an empty
    split (lse -inf) leaves it exactly as it was. Both batch-invariant paths merge through
    this one function, in split order."""
    m_new = tl.maximum(m_run, lse)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    a = tl.math.exp2(m_run - m_safe)
    b = tl.math.exp2(lse - m_safe)
    return m_new, w_run * a + b, acc_run * a[:, None] + o * b[:, None]


@triton.jit
def _reduce_splits(lse_part_ptr, o_part_ptr, t, h, num_tokens, num_splits,
                   NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   SPLITS_PAD: tl.constexpr):
    """One token-head's splits (at most SPLITS_PAD of them) merged: its normalised output."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    row_id = (offs_s * num_tokens + t) * NUM_Q_HEADS + h
    lse = tl.load(lse_part_ptr + row_id, mask=s_ok, other=float("-inf"))
    mx = tl.max(lse, 0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.math.exp2(lse - mx)  # 0 for empty splits
    denom = tl.sum(w, 0)
    o = tl.load(o_part_ptr + row_id[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    return tl.sum(o * w[:, None], 0) / tl.where(denom > 0.0, denom, 1.0)


@triton.jit(do_not_specialize=["num_tokens", "num_splits"])
def _attn_reduce_kernel(lse_part_ptr, o_part_ptr, out_ptr, num_tokens, num_splits,
                        stride_ot, stride_oh, stride_od,
                        NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # One compiled kernel for every split count (a runtime value), with a body specialised for
    # each power-of-two bound up to SPLIT_MAX: a uniform branch picks the smallest that holds
    # them, so two splits are not read as sixty-four (the reduce costs what the read tile holds).
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    if num_splits <= 2:
        res = _reduce_splits(lse_part_ptr, o_part_ptr, t, h, num_tokens, num_splits, NUM_Q_HEADS, HEAD_DIM, BLOCK_D, 2)
    elif num_splits <= 4:
        res = _reduce_splits(lse_part_ptr, o_part_ptr, t, h, num_tokens, num_splits, NUM_Q_HEADS, HEAD_DIM, BLOCK_D, 4)
    elif num_splits <= 8:
        res = _reduce_splits(lse_part_ptr, o_part_ptr, t, h, num_tokens, num_splits, NUM_Q_HEADS, HEAD_DIM, BLOCK_D, 8)
    elif num_splits <= 16:
        res = _reduce_splits(lse_part_ptr, o_part_ptr, t, h, num_tokens, num_splits, NUM_Q_HEADS, HEAD_DIM, BLOCK_D,
                             16)
    elif num_splits <= 32:
        res = _reduce_splits(lse_part_ptr, o_part_ptr, t, h, num_tokens, num_splits, NUM_Q_HEADS, HEAD_DIM, BLOCK_D,
                             32)
    else:
        res = _reduce_splits(lse_part_ptr, o_part_ptr, t, h, num_tokens, num_splits, NUM_Q_HEADS, HEAD_DIM, BLOCK_D,
                             64)
    offs_d = tl.arange(0, BLOCK_D)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d * stride_od,
             res.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit(do_not_specialize=["num_tokens", "num_splits"])
def _attn_merge_kernel(lse_part_ptr, o_part_ptr, out_ptr, num_tokens, num_splits,
                       stride_ot, stride_oh, stride_od,
                       NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """Batch-invariant reduce: one token's heads, its splits merged one after another in split
    order (the in-program path's order and arithmetic), never as a tree whose shape would
    follow the number of splits. The split count is a runtime loop bound (it follows
    max_seq_len): an unrolled loop would round the same, but compile once per count."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    h_ok = offs_h < NUM_Q_HEADS
    mask = h_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    m_run = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    w_run = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc_run = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        row_id = (s * num_tokens + t) * NUM_Q_HEADS + offs_h
        lse = tl.load(lse_part_ptr + row_id, mask=h_ok, other=float("-inf"))
        o = tl.load(o_part_ptr + row_id[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        m_run, w_run, acc_run = _merge_split(m_run, w_run, acc_run, lse, o)
    res = acc_run / tl.where(w_run > 0.0, w_run, 1.0)[:, None]
    tl.store(out_ptr + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :] * stride_od,
             res.to(out_ptr.dtype.element_ty), mask=mask)


# Batch-invariant mode (parspec.batch_invariant): attention keys are cut into splits of this
# many keys, counted from key 0 of each sequence, whatever the batch, so a row's splits, and
# the order they merge in, depend on its own position only. A multiple of every BLOCK_N.
SPLIT_KEYS = 256
# Past this much float32 scratch (splits x tokens x heads x head_dim) a batch-invariant call
# merges its splits inside each program instead of over a split grid: the same arithmetic.
INVARIANT_SCRATCH_BYTES = 256 << 20


def invariant_block_m(group: int) -> int:
    """The query tile of the batch-invariant mode: a function of the head grouping only, never
    of the query length, so a decode row, a verify row and a prefill row share one compiled
    kernel and its arithmetic."""
    return max(32, triton.next_power_of_2(group))


# Per-config launch fallbacks found necessary at run time (OutOfResources), keyed by config.
_ATTN_FALLBACK: dict[tuple, tuple[int, int]] = {}
# Launch configurations whose other SPLIT variant is compiled (_compile_split_sibling).
_SPLIT_SIBLINGS: set[tuple] = set()


def _compile_split_sibling(key: tuple, args: tuple, consts: dict, block_n: int, num_stages: int) -> None:
    """Compiles, without launching, this launch's twin with the other SPLIT, once per config.

    SPLIT (write the output, or a split's partial result for the reduce) is a constexpr: as a
    runtime branch the two epilogues cost the kernel 1-2% (H200, bf16). Which one a step takes
    follows the batch (its size and max_seq_len), so a warm-up cannot be relied on to meet both;
    compiling the twin with the first launch of either keeps serving steps from compiling it."""
    twin = key[:-1] + (not key[-1],)
    config = (twin, consts["NUM_Q_HEADS"], consts["BLOCK_SIZE"], consts["HAS_QPOS"], block_n, num_stages,
              args[0].device)
    if config in _SPLIT_SIBLINGS:
        return
    _SPLIT_SIBLINGS.add(config)
    _ATTN_FALLBACK.setdefault(twin, (block_n, num_stages))  # its launch takes the variant compiled here
    _paged_attn_kernel.warmup(*args, **dict(consts, SPLIT=twin[-1]), BLOCK_N=block_n, num_stages=num_stages,
                              grid=(1,))


def _launch_config(q: torch.Tensor, k_cache: torch.Tensor, group: int, head_dim: int, block_m, block_n,
                   max_query_len: int, batch_invariant: bool):
    """(block_m, block_n, num_warps, num_stages, fallback key) from host ints only."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    fixed_m = invariant_block_m(group) if batch_invariant else None
    cfg_m, cfg_n, num_warps, num_stages = _attn_config(q.dtype, block_d, group, max_query_len, block_m=fixed_m)
    block_m = block_m or cfg_m
    block_n = block_n or cfg_n
    assert block_m >= group, "a query tile must hold at least one token's group of heads"
    # One key for both batch-invariant variants: a fallback to a smaller BLOCK_N then changes
    # both alike, never one path's arithmetic alone.
    key = (q.dtype, k_cache.dtype, head_dim, group, block_m, block_n, "invariant" if batch_invariant else None)
    return block_m, block_n, num_warps, num_stages, key


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           meta: AttentionMetadata, scale: float, *, num_splits: int | None = None,
                           block_m: int | None = None, block_n: int | None = None,
                           batch_invariant: bool = False, split_keys: int | None = None,
                           merge_in_program: bool | None = None) -> torch.Tensor:
    """Triton twin of :func:`paged_attention_ref`: causal paged attention, ``[T, Hq, D]`` out.

    One launch (plus a small reduce launch when split-KV is on) for any mix of prefill,
    chunked prefill, decode and verification sequences. Never synchronises with the host,
    so it can be captured in a CUDA graph.

    Grid: ``(num_m_tiles, B * Hkv, num_splits)`` with ``num_m_tiles = cdiv(max_query_len,
    BLOCK_M // group)``; reduce grid ``(T, Hq)``. It is therefore fixed by the host ints
    ``T = q.shape[0]``, ``B = seq_lens.shape[0]``, ``meta.max_query_len``,
    ``meta.max_seq_len`` (through the split heuristic only), the model shape/dtype and the
    GPU's SM count. For CUDA-graph capture the caller must keep those fixed per graph
    (e.g. capture with the bucket's max_seq_len; ``max_seq_len`` only tunes performance,
    any value is correct). ``meta.max_query_len`` MUST be >= every sequence's query count
    (tiles past it are not launched). Rows of ``out`` beyond ``query_start_loc[B]`` are
    left unspecified, as in the reference. Call once before capturing (Triton compiles
    on the first call of each configuration).

    ``batch_invariant=True`` (parspec.batch_invariant): a row's arithmetic depends on its
    own position and keys only. The query tile is :func:`invariant_block_m`, the keys are
    cut into splits of ``split_keys`` (default :data:`SPLIT_KEYS`) counted from key 0, and
    the splits merge in order, either over a split grid of ``cdiv(max_seq_len, split_keys)``
    (then ``meta.max_seq_len`` MUST bound every sequence's length) with a sequential reduce,
    or inside each program (``merge_in_program``; default: when the grid would already fill
    the GPU or its scratch would pass INVARIANT_SCRATCH_BYTES); both give the same bits. Every
    launch of the mode is compiled without fused multiply-adds, so the two merge loops round alike.

    Keyword-only knobs (tests / tuning): ``num_splits`` forces the split-KV factor
    (default: :func:`_choose_num_splits`; not with ``batch_invariant``), ``block_m`` /
    ``block_n`` force tile sizes (powers of two >= 16; ``block_m`` >= group).
    """
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, head_dim_k = k_cache.shape
    assert head_dim_k == head_dim and v_cache.shape == k_cache.shape
    assert num_q_heads % num_kv_heads == 0
    group = num_q_heads // num_kv_heads
    num_seqs = meta.seq_lens.shape[0]
    assert meta.query_positions is None or meta.query_positions.is_contiguous(), "query_positions must be contiguous"
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0 or meta.max_query_len <= 0:
        return out

    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages, key = _launch_config(
        q, k_cache, group, head_dim, block_m, block_n, meta.max_query_len, batch_invariant)
    tokens = block_m // group
    num_m_tiles = triton.cdiv(meta.max_query_len, tokens)
    sms = _num_sms(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
        if q.is_cuda else _DEFAULT_NUM_SMS

    if batch_invariant:
        if num_splits is not None:
            raise ValueError(f"num_splits={num_splits} cannot be forced in the batch-invariant mode: "
                             "its splits are split_keys long")
        split_keys = split_keys or SPLIT_KEYS
        if split_keys % block_n:
            raise ValueError(f"split_keys={split_keys} must be a multiple of BLOCK_N={block_n}")
        num_splits = triton.cdiv(max(meta.max_seq_len, 1), split_keys)
        if merge_in_program is None:
            scratch = num_splits * num_tokens * num_q_heads * head_dim * 4
            merge_in_program = (num_seqs * num_kv_heads * num_m_tiles >= sms
                                or scratch > INVARIANT_SCRATCH_BYTES)
        if merge_in_program or num_splits == 1:
            merge_in_program, num_splits = True, 1
    else:
        split_keys, merge_in_program = 0, False
        if num_splits is None:
            num_splits = _choose_num_splits(num_seqs, num_kv_heads, num_m_tiles, meta.max_seq_len, sms)
        num_splits = max(1, int(num_splits))
        if num_splits > SPLIT_MAX:
            raise ValueError(f"num_splits={num_splits} exceeds SPLIT_MAX={SPLIT_MAX}, the most the reduce merges")

    if num_splits > 1:
        lse_part = torch.empty((num_splits, num_tokens, num_q_heads), dtype=torch.float32, device=q.device)
        o_part = torch.empty((num_splits, num_tokens, num_q_heads, head_dim), dtype=torch.float32,
                             device=q.device)
    else:  # unused; float32 like the scratch, so the unsplit variant's signature is its split twin's
        lse_part = o_part = torch.empty(0, dtype=torch.float32, device=q.device)

    split = num_splits > 1 and not batch_invariant
    key = key + (split,) if not batch_invariant else key
    candidates = [(block_n, num_stages), (block_n, 1), (max(16, block_n // 2), 1)]
    if key in _ATTN_FALLBACK:
        candidates = [_ATTN_FALLBACK[key]]
    grid = (num_m_tiles, num_seqs * num_kv_heads, num_splits)
    args = (q, k_cache, v_cache, out, lse_part, o_part, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            meta.query_positions if meta.query_positions is not None else meta.seq_lens,
            float(scale) * _LOG2E, num_tokens, num_splits,
            *q.stride(), *out.stride(), *k_cache.stride(), *v_cache.stride(), meta.block_tables.stride(0))
    consts = dict(NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, GROUP=group, TOKENS=tokens,
                  HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_SIZE=block_size, BLOCK_M=block_m,
                  DOT_IEEE=q.dtype == torch.float32, HAS_QPOS=meta.query_positions is not None,
                  SPLIT_KEYS=split_keys, MERGE_IN_PROGRAM=merge_in_program, SPLIT=split,
                  num_warps=num_warps, enable_fp_fusion=not batch_invariant)
    err = None
    for bn, stages in candidates:
        try:
            _paged_attn_kernel[grid](*args, **consts, BLOCK_N=bn, num_stages=stages)
            _ATTN_FALLBACK[key] = (bn, stages)
            err = None
            break
        except triton.runtime.errors.OutOfResources as e:  # shared memory: retry smaller
            err = e
    if err is not None:
        raise err
    if not batch_invariant:
        _compile_split_sibling(key, args, consts, *_ATTN_FALLBACK[key])

    if num_splits > 1 and batch_invariant:
        _attn_merge_kernel[(num_tokens,)](
            lse_part, o_part, out, num_tokens, num_splits, *out.stride(),
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_q_heads),
            BLOCK_D=block_d, num_warps=4, enable_fp_fusion=False)
    elif num_splits > 1:
        _attn_reduce_kernel[(num_tokens, num_q_heads)](
            lse_part, o_part, out, num_tokens, num_splits, *out.stride(),
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, num_warps=4)
    return out
