"""Paged attention: Triton kernels (run by the interpreter on CPU) vs the torch reference,
and the reference vs dense causal SDPA. Run with TRITON_INTERPRET=1 (the Makefile sets it)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from parspec.attention import (AttentionMetadata, _choose_num_splits, paged_attention_ref,
                               paged_attention_triton, write_kv_ref, write_kv_triton)

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton needs a GPU or TRITON_INTERPRET=1")

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def make_case(q_lens, seq_lens, num_kv_heads, group, head_dim, block_size, *, dtype=torch.float32,
              seed=0, pad_blocks=3, poison=True, device="cpu"):
    """Random paged cache + metadata. Block ids are shuffled; block 0 is never used and the
    block tables are padded with it. With ``poison`` the unused block, the unused blocks and
    every slot past a sequence's end are NaN, so any read the kernel must not make shows up."""
    g = torch.Generator().manual_seed(seed)
    num_q_heads = num_kv_heads * group
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + 4
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    if poison:
        used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    max_blocks = max(need) + pad_blocks
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    i = 0
    for b, (s, n) in enumerate(zip(seq_lens, need)):
        ids = perm[i:i + n]
        i += n
        block_tables[b, :n] = torch.tensor(ids, dtype=torch.int32)
        if poison:
            for j, blk in enumerate(ids):
                used[blk, :min(block_size, s - j * block_size)] = True
    if poison:
        k_cache[~used] = float("nan")
        v_cache[~used] = float("nan")
    q_start = [0]
    for n in q_lens:
        q_start.append(q_start[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.full((q_start[-1],), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(q_start, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    q = torch.randn(q_start[-1], num_q_heads, head_dim, generator=g)
    return (q.to(device, dtype), k_cache.to(device, dtype), v_cache.to(device, dtype), meta)


# prefill (q_len = seq_len > block size), decode, verification, chunked prefill,
# a sequence with no queries this step, and a decode with a context shorter than a block
MIXED_Q = [21, 1, 5, 11, 0, 1]
MIXED_S = [21, 37, 30, 26, 9, 3]


def _check(out, ref, tol):
    assert out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tol, f"max abs diff {err}"


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("group", [1, 4])
def test_triton_matches_reference_mixed_batch(group, head_dim, block_size, num_splits):
    q, k_cache, v_cache, meta = make_case(MIXED_Q, MIXED_S, 2, group, head_dim, block_size,
                                          seed=group * 100 + head_dim + block_size, device=DEV)
    scale = head_dim ** -0.5
    ref = paged_attention_ref(q, k_cache, v_cache, meta, scale)
    # Small tiles so the 21-token prefill spans several query tiles and each KV tile
    # spans several cache blocks (block_size 4) or is a whole one (block_size 16).
    block_n = 16 if block_size == 4 else 32
    out = paged_attention_triton(q, k_cache, v_cache, meta, scale, num_splits=num_splits,
                                 block_m=16, block_n=block_n)
    _check(out, ref, 1e-5)


@needs_interpreter
def test_triton_default_config_and_heuristic_split():
    """No overrides: tile sizes and split factor from the host heuristics (which split here),
    with max_query_len / max_seq_len given as loose bucket bounds, as a CUDA graph would."""
    q_lens, seq_lens = [1, 4, 1], [300, 170, 5]
    q, k_cache, v_cache, meta = make_case(q_lens, seq_lens, 2, 4, 32, 16, seed=7, device=DEV)
    assert _choose_num_splits(3, 2, 1, 300, 132) > 1
    scale = 32 ** -0.5
    ref = paged_attention_ref(q, k_cache, v_cache, meta, scale)
    out = paged_attention_triton(q, k_cache, v_cache, meta, scale)
    _check(out, ref, 1e-5)
    meta.max_query_len, meta.max_seq_len = 8, 1024
    out2 = paged_attention_triton(q, k_cache, v_cache, meta, scale)
    _check(out2, ref, 1e-5)


@needs_interpreter
def test_triton_odd_group_and_head_dim():
    """group 3 (tile rows not a multiple of the group) and head_dim 24 (padded to 32)."""
    q, k_cache, v_cache, meta = make_case([7, 1, 3], [12, 20, 9], 2, 3, 24, 4, seed=3, device=DEV)
    scale = 24 ** -0.5
    ref = paged_attention_ref(q, k_cache, v_cache, meta, scale)
    for splits in (1, 2):
        out = paged_attention_triton(q, k_cache, v_cache, meta, scale, num_splits=splits,
                                     block_m=16, block_n=16)
        _check(out, ref, 1e-5)


@needs_interpreter
def test_triton_strided_query():
    """q as a view into a fused projection (non-contiguous token stride)."""
    q, k_cache, v_cache, meta = make_case([5, 1], [9, 14], 2, 2, 16, 4, seed=11, device=DEV)
    fused = torch.randn(q.shape[0], 3, q.shape[1], q.shape[2], device=q.device)
    fused[:, 1] = q
    qv = fused[:, 1]
    assert not qv.is_contiguous()
    ref = paged_attention_ref(q, k_cache, v_cache, meta, 0.3)
    out = paged_attention_triton(qv, k_cache, v_cache, meta, 0.3, num_splits=2, block_m=16, block_n=16)
    _check(out, ref, 1e-5)


def test_choose_num_splits_heuristic():
    # a full grid is never split
    assert _choose_num_splits(64, 8, 1, 4096, 132) == 1
    assert _choose_num_splits(1, 8, 40, 4096, 132) == 1
    # short contexts are not split
    assert _choose_num_splits(1, 8, 1, 100, 132) == 1
    # batch-1 decode at 4k fills the GPU; chunks never shorter than SPLIT_MIN_KEYS
    assert _choose_num_splits(1, 8, 1, 4096, 132) == 32
    assert _choose_num_splits(1, 8, 1, 1024, 132) == 8
    assert _choose_num_splits(4, 8, 1, 4096, 132) == 9
    assert _choose_num_splits(16, 8, 1, 4096, 132) == 3


# -- write_kv -------------------------------------------------------------------------------

@needs_interpreter
@pytest.mark.parametrize("src_dtype,cache_dtype", [
    (torch.float32, torch.float32), (torch.float32, torch.float16), (torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.bfloat16)])
def test_write_kv_matches_reference(src_dtype, cache_dtype):
    g = torch.Generator().manual_seed(5)
    num_blocks, block_size, hkv, d, t = 6, 4, 2, 16, 9
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(DEV, cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(DEV, cache_dtype)
    # k/v as strided views of a fused projection, like the model passes them
    fused = torch.randn(t, 3 * hkv * d, generator=g).to(DEV, src_dtype)
    if src_dtype == torch.float32 and cache_dtype == torch.bfloat16 and DEV == "cpu":
        # The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even
        # (checked exactly in tests/gpu); give it values bf16 holds exactly.
        fused = fused.to(torch.bfloat16).float()
    k = fused[:, hkv * d:2 * hkv * d].view(t, hkv, d)
    v = fused[:, 2 * hkv * d:].view(t, hkv, d)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slots[[1, 4, 8]] = -1
    slot_mapping = slots.to(DEV, torch.int64)
    kc_ref, vc_ref = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, v, kc_ref, vc_ref, slot_mapping)
    write_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, kc_ref)
    assert torch.equal(v_cache, vc_ref)
    # the skipped tokens really were skipped
    assert not torch.equal(kc_ref, k_cache.new_zeros(()).expand_as(kc_ref))


@needs_interpreter
def test_write_kv_all_skipped_and_empty():
    k_cache = torch.randn(2, 4, 1, 16, device=DEV)
    v_cache = torch.randn(2, 4, 1, 16, device=DEV)
    before = k_cache.clone(), v_cache.clone()
    k = torch.randn(3, 1, 16, device=DEV)
    write_kv_triton(k, k, k_cache, v_cache, torch.full((3,), -1, dtype=torch.int64, device=DEV))
    write_kv_triton(k[:0], k[:0], k_cache, v_cache, torch.empty(0, dtype=torch.int64, device=DEV))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])


# -- the reference itself -------------------------------------------------------------------

def _dense_sdpa(q, k, v, q_len, seq_len, group, scale):
    """q [Q, Hq, D], k/v [S, Hkv, D] contiguous; causal with the queries at the end."""
    qh = q.transpose(0, 1)[None]  # [1, Hq, Q, D]
    kh = k.repeat_interleave(group, dim=1).transpose(0, 1)[None]
    vh = v.repeat_interleave(group, dim=1).transpose(0, 1)[None]
    q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
    allowed = torch.arange(seq_len)[None, :] <= q_pos  # [Q, S]
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed, scale=scale)
    return o[0].transpose(0, 1)


@pytest.mark.parametrize("group,q_lens,seq_lens", [
    (1, [6, 1, 13], [6, 10, 13]),
    (4, [3, 1, 9], [17, 5, 9]),
])
def test_reference_matches_dense_sdpa(group, q_lens, seq_lens):
    g = torch.Generator().manual_seed(group)
    hkv, d, block_size = 2, 16, 4
    hq = hkv * group
    dense_k = [torch.randn(s, hkv, d, generator=g) for s in seq_lens]
    dense_v = [torch.randn(s, hkv, d, generator=g) for s in seq_lens]
    qs = [torch.randn(n, hq, d, generator=g) for n in q_lens]
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + 2
    k_cache = torch.zeros(num_blocks, block_size, hkv, d)
    v_cache = torch.zeros(num_blocks, block_size, hkv, d)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    block_tables = torch.full((len(seq_lens), max(need) + 1), num_blocks - 1, dtype=torch.int32)
    i = 0
    for b, s in enumerate(seq_lens):
        ids = perm[i:i + need[b]]
        i += need[b]
        block_tables[b, :need[b]] = torch.tensor(ids, dtype=torch.int32)
        slots = torch.tensor([ids[p // block_size] * block_size + p % block_size for p in range(s)])
        write_kv_ref(dense_k[b], dense_v[b], k_cache, v_cache, slots)
    q_start = [0]
    for n in q_lens:
        q_start.append(q_start[-1] + n)
    meta = AttentionMetadata(torch.full((q_start[-1],), -1, dtype=torch.int64),
                             torch.tensor(q_start, dtype=torch.int32),
                             torch.tensor(seq_lens, dtype=torch.int32), block_tables,
                             max(q_lens), max(seq_lens))
    scale = 0.37
    out = paged_attention_ref(torch.cat(qs), k_cache, v_cache, meta, scale)
    expect = torch.cat([_dense_sdpa(qs[b], dense_k[b], dense_v[b], q_lens[b], seq_lens[b], group, scale)
                        for b in range(len(seq_lens))])
    assert (out - expect).abs().max().item() < 1e-5


# -- per-query positions (a drafter's padded layout) -----------------------------------------

def _with_query_positions(meta: AttentionMetadata, seed: int) -> AttentionMetadata:
    """Each query gets its own position below its sequence's length, in no particular order
    (some repeat, some jump back), as in a drafter step with discarded and skipped entries."""
    g = torch.Generator().manual_seed(seed)
    starts, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    pos = torch.cat([torch.randint(0, lens[b], (starts[b + 1] - starts[b],), generator=g)
                     for b in range(len(lens))])
    meta.query_positions = pos.to(meta.seq_lens.device)
    return meta


def _brute_force(q, k_cache, v_cache, meta, scale):
    """Query by query: softmax over the keys at positions 0..query_positions[t]."""
    group = q.shape[1] // k_cache.shape[2]
    bs = k_cache.shape[1]
    out = torch.zeros_like(q, dtype=torch.float32)
    starts = meta.query_start_loc.tolist()
    for b in range(meta.num_seqs):
        for t in range(starts[b], starts[b + 1]):
            n = int(meta.query_positions[t]) + 1
            slots = [int(meta.block_tables[b, p // bs]) * bs + p % bs for p in range(n)]
            k = k_cache.flatten(0, 1)[slots].float().repeat_interleave(group, dim=1)  # [n, Hq, D]
            v = v_cache.flatten(0, 1)[slots].float().repeat_interleave(group, dim=1)
            w = (torch.einsum("hd,nhd->hn", q[t].float(), k) * scale).softmax(-1)
            out[t] = torch.einsum("hn,nhd->hd", w, v)
    return out


def test_reference_query_positions_match_brute_force():
    q, k_cache, v_cache, meta = make_case([7, 1, 14, 3], [9, 30, 21, 3], 2, 2, 16, 4, seed=11)
    meta = _with_query_positions(meta, 11)
    out = paged_attention_ref(q, k_cache, v_cache, meta, 0.25)
    _check(out, _brute_force(q, k_cache, v_cache, meta, 0.25), 1e-5)


@needs_interpreter
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("block_size", [4, 16])
def test_triton_query_positions_match_reference(block_size, num_splits):
    q, k_cache, v_cache, meta = make_case([7, 1, 14, 3, 0], [9, 70, 21, 3, 5], 2, 4, 16, block_size,
                                          seed=block_size + num_splits, device=DEV)
    meta = _with_query_positions(meta, block_size)
    ref = paged_attention_ref(q, k_cache, v_cache, meta, 0.25)
    out = paged_attention_triton(q, k_cache, v_cache, meta, 0.25, num_splits=num_splits, block_m=16, block_n=16)
    _check(out, ref, 1e-5)
