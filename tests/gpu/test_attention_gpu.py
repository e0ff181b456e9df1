"""Paged attention on CUDA: Triton vs the torch reference at Llama-3-8B shapes
(32 q heads, 8 kv heads, head_dim 128, block_size 16), CUDA-graph capture, and a timing
table (printed, not asserted). Skipped without a GPU and under TRITON_INTERPRET=1.

    pytest -q tests/gpu/test_attention_gpu.py -s
"""

from __future__ import annotations

import os

import pytest
import torch

from parspec.attention import (AttentionMetadata, _choose_num_splits, _num_sms, paged_attention_ref,
                               paged_attention_triton, write_kv_ref, write_kv_triton)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="GPU tests run the compiled kernels, not the interpreter"),
]

HQ, HKV, D, BS = 32, 8, 128, 16


def build(q_lens, seq_lens, dtype, *, seed=0, hq=HQ, hkv=HKV, d=D, block_size=BS, spare_blocks=64):
    """Random caches with shuffled block ids and padded block tables (padding -> block 0,
    which no sequence uses)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, hkv, d, device="cuda", generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, device="cuda", generator=g).to(dtype)
    perm = torch.randperm(num_blocks - 1, device="cuda", generator=g) + 1
    block_tables = torch.zeros(len(seq_lens), max(need) + 5, dtype=torch.int32, device="cuda")
    i = 0
    for b, n in enumerate(need):
        block_tables[b, :n] = perm[i:i + n].int()
        i += n
    q_start = [0]
    for n in q_lens:
        q_start.append(q_start[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=torch.full((q_start[-1],), -1, dtype=torch.int64, device="cuda"),
        query_start_loc=torch.tensor(q_start, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=block_tables, max_query_len=max(q_lens), max_seq_len=max(seq_lens))
    q = torch.randn(q_start[-1], hq, d, device="cuda", generator=g).to(dtype)
    return q, k_cache, v_cache, meta


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def reference(q, k_cache, v_cache, meta, scale):
    """fp32 reference from the same (possibly bf16) inputs."""
    return paged_attention_ref(q.float(), k_cache.float(), v_cache.float(), meta, scale)


TOL = {torch.bfloat16: 1e-2, torch.float32: 1e-4}


def random_seq_lens(batch, q_len, max_seq, seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(q_len, max_seq + 1, (batch,), generator=g).tolist()
    lens[0] = max_seq  # one at the bucket's edge (a multiple of the block size)
    if batch > 1:
        lens[1] = max(q_len, max_seq - 7)  # and one that is not
    return lens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("q_len", [1, 8])
@pytest.mark.parametrize("batch", [1, 4, 16])
def test_decode_verify_matches_reference(batch, q_len, dtype):
    seq_lens = random_seq_lens(batch, q_len, 4096, seed=batch * 10 + q_len)
    q, k_cache, v_cache, meta = build([q_len] * batch, seq_lens, dtype, seed=batch + q_len)
    scale = D ** -0.5
    ref = reference(q, k_cache, v_cache, meta, scale)
    out = paged_attention_triton(q, k_cache, v_cache, meta, scale)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL[dtype]
    # the split and unsplit paths agree
    for splits in (1, 7):
        out_s = paged_attention_triton(q, k_cache, v_cache, meta, scale, num_splits=splits)
        assert rel_err(out_s, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_1000_matches_reference(dtype):
    q, k_cache, v_cache, meta = build([1000], [1000], dtype, seed=1)
    scale = D ** -0.5
    out = paged_attention_triton(q, k_cache, v_cache, meta, scale)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(q, k_cache, v_cache, meta, scale)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mixed_batch_matches_reference(dtype):
    # prefill, decodes, verifications, a chunked prefill, a sequence with no queries
    q_lens = [1000, 1, 1, 8, 8, 200, 0, 5]
    seq_lens = [1000, 4096, 17, 2050, 9, 1500, 300, 5]
    q, k_cache, v_cache, meta = build(q_lens, seq_lens, dtype, seed=2)
    scale = D ** -0.5
    ref = reference(q, k_cache, v_cache, meta, scale)
    for splits in (None, 1, 4):
        out = paged_attention_triton(q, k_cache, v_cache, meta, scale, num_splits=splits)
        assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("head_dim,group", [(64, 4), (64, 1), (128, 2)])
def test_other_shapes_bf16(head_dim, group):
    q, k_cache, v_cache, meta = build([300, 1, 8], [300, 777, 64], torch.bfloat16, hq=4 * group,
                                      hkv=4, d=head_dim, seed=head_dim + group)
    scale = head_dim ** -0.5
    out = paged_attention_triton(q, k_cache, v_cache, meta, scale)
    assert rel_err(out, reference(q, k_cache, v_cache, meta, scale)) < 1e-2


def test_cuda_graph_capture_and_replay():
    """Capture once with fixed B / max_query_len / max_seq_len; replay with new lengths and
    block tables written in place: no host sync, right answers."""
    batch, q_len, bucket = 4, 8, 4096
    q, k_cache, v_cache, meta = build([q_len] * batch, random_seq_lens(batch, q_len, bucket, 0),
                                      torch.bfloat16, seed=3, spare_blocks=2000)
    meta.max_seq_len = bucket
    scale = D ** -0.5
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        paged_attention_triton(q, k_cache, v_cache, meta, scale)  # compile / warm up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention_triton(q, k_cache, v_cache, meta, scale)
    for seed in (1, 2):
        q2, _, _, meta2 = build([q_len] * batch, random_seq_lens(batch, q_len, bucket, seed),
                                torch.bfloat16, seed=10 + seed, spare_blocks=2000)
        q.copy_(q2)
        meta.seq_lens.copy_(meta2.seq_lens)
        meta.block_tables.zero_()
        n = min(meta.block_tables.shape[1], meta2.block_tables.shape[1])
        meta.block_tables[:, :n].copy_(meta2.block_tables[:, :n] % k_cache.shape[0])
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, reference(q, k_cache, v_cache, meta, scale)) < 1e-2


@pytest.mark.parametrize("src_dtype,cache_dtype", [
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16), (torch.float32, torch.float32)])
def test_write_kv_exact(src_dtype, cache_dtype):
    t, num_blocks = 300, 64
    k_cache = torch.randn(num_blocks, BS, HKV, D, device="cuda").to(cache_dtype)
    v_cache = torch.randn(num_blocks, BS, HKV, D, device="cuda").to(cache_dtype)
    fused = torch.randn(t, (HQ + 2 * HKV) * D, device="cuda").to(src_dtype)
    k = fused[:, HQ * D:(HQ + HKV) * D].view(t, HKV, D)
    v = fused[:, (HQ + HKV) * D:].view(t, HKV, D)
    slots = torch.randperm(num_blocks * BS, device="cuda")[:t]
    slots[::7] = -1
    kc, vc = k_cache.clone(), v_cache.clone()
    write_kv_ref(k, v, kc, vc, slots)
    write_kv_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, kc) and torch.equal(v_cache, vc)


def test_timing_table(capsys):
    """Per-call device time (CUDA-graph replay) of decode (q_len 1) and verify (q_len 8), bf16,
    all sequences at the given context; KV bytes read = B * seq * Hkv * D * 2 (K and V) * 2 bytes."""
    from tests.gpu.timing import graphed_us

    scale = D ** -0.5
    rows = []
    sms = _num_sms(torch.cuda.current_device())
    for seq in (1024, 4096):
        for q_len in (1, 8):
            for batch in (1, 4, 16):
                q, k_cache, v_cache, meta = build([q_len] * batch, [seq] * batch, torch.bfloat16,
                                                  seed=batch, spare_blocks=8)
                splits = _choose_num_splits(batch, HKV, 1, seq, sms)

                def run(ns=None):
                    return paged_attention_triton(q, k_cache, v_cache, meta, scale, num_splits=ns)

                ms = graphed_us(run) / 1e3
                ms1 = graphed_us(lambda: run(1)) / 1e3
                gbytes = batch * seq * HKV * D * 2 * 2 / 1e9
                rows.append((batch, q_len, seq, splits, ms * 1e3, gbytes / (ms * 1e-3),
                             ms1 * 1e3, gbytes / (ms1 * 1e-3)))
    with capsys.disabled():
        print(f"\npaged_attention_triton on {torch.cuda.get_device_name()} ({sms} SMs), bf16, "
              f"Hq={HQ} Hkv={HKV} D={D} block={BS}")
        print(f"{'B':>3} {'q_len':>5} {'seq':>5} {'splits':>6} {'us':>8} {'GB/s':>7} "
              f"{'us(ns=1)':>9} {'GB/s(ns=1)':>10}")
        for b, ql, s, ns, us, bw, us1, bw1 in rows:
            print(f"{b:>3} {ql:>5} {s:>5} {ns:>6} {us:>8.1f} {bw:>7.0f} {us1:>9.1f} {bw1:>10.0f}")
