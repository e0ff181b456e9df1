"""Fused layer kernels on CUDA: Triton vs the torch reference in bfloat16 at Llama-3-8B
shapes (hidden 4096, intermediate 14336, 32 q heads, 8 kv heads, head_dim 128), CUDA-graph
capture, the autograd fallback, one decoder layer both ways, and a timing table (printed,
not asserted). Skipped without a GPU and under TRITON_INTERPRET=1.

    pytest -q tests/gpu/test_layer_kernels_gpu.py -s
"""

from __future__ import annotations

import os

import pytest
import torch

from parspec import layer_kernels
from parspec.config import ModelConfig
from parspec.kv_cache import allocate_kv_cache, bind_kv_cache
from parspec.layer_kernels import (add_rms_norm, add_rms_norm_ref, add_rms_norm_triton, rms_norm, rms_norm_ref,
                                   rms_norm_triton, rope_and_write_kv_ref, rope_and_write_kv_triton,
                                   silu_and_mul_ref, silu_and_mul_triton)
from parspec.metadata import build_attention_metadata
from parspec.models.layers import RotaryEmbedding
from parspec.models.llama import LlamaForCausalLM

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="GPU tests run the compiled kernels, not the interpreter"),
]

H, INTER, HQ, HKV, D, BS = 4096, 14336, 32, 8, 128, 16
MAX_POS, NUM_BLOCKS = 8192, 256
BF16 = torch.bfloat16


def randn(*shape, seed, scale=1.0, dtype=BF16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, device="cuda")).to(dtype)


def assert_bf16_matches(out, ref):
    """Equal but for rare one-step rounding flips (the float32 sums and exp differ in order
    and ulps from torch's, which moves a value across a bfloat16 rounding boundary)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=2 * 2.0 ** -8)
    assert (out == ref).float().mean() > 0.999


def rope_case(num_tokens, seed=0):
    """q, k, v as views of one fused qkv output; slots in shuffled blocks, every 5th -1."""
    qkv = randn(num_tokens, (HQ + 2 * HKV) * D, seed=seed, scale=2.0)
    q = qkv[:, :HQ * D].view(num_tokens, HQ, D)
    k = qkv[:, HQ * D:(HQ + HKV) * D].view(num_tokens, HKV, D)
    v = qkv[:, (HQ + HKV) * D:].view(num_tokens, HKV, D)
    g = torch.Generator(device="cuda").manual_seed(seed)
    positions = torch.randint(0, MAX_POS, (num_tokens,), generator=g, device="cuda")
    slots = torch.randperm(NUM_BLOCKS * BS, generator=g, device="cuda")[:num_tokens]
    slots[::5] = -1
    k_cache = torch.full((NUM_BLOCKS, BS, HKV, D), float("nan"), dtype=BF16, device="cuda")
    rope = RotaryEmbedding(D, MAX_POS, 500000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192}).cuda()
    return q, k, v, positions, rope.cos, rope.sin, k_cache, k_cache.clone(), slots


@pytest.mark.parametrize("num_tokens", [1, 7, 512])
def test_norms_match_reference(num_tokens):
    x = randn(num_tokens, H, seed=0, scale=3.0)
    residual = randn(num_tokens, H, seed=1, scale=3.0)
    weight = 1.0 + randn(H, seed=2, scale=0.2)
    assert_bf16_matches(rms_norm_triton(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5))
    normed, new_residual = add_rms_norm_triton(x, residual, weight, 1e-5)
    ref_normed, ref_residual = add_rms_norm_ref(x, residual, weight, 1e-5)
    assert torch.equal(new_residual, ref_residual)
    assert_bf16_matches(normed, ref_normed)


def test_norm_8192_and_qk_norm_rows():
    x = randn(7, 8192, seed=0)
    weight = 1.0 + randn(8192, seed=1, scale=0.2)
    assert_bf16_matches(rms_norm_triton(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6))
    q = rope_case(64)[0]  # per-head rows of a strided view, as Qwen3's q_norm sees them
    w = 1.0 + randn(D, seed=3, scale=0.2)
    assert_bf16_matches(rms_norm_triton(q, w, 1e-6), rms_norm_ref(q, w, 1e-6))


@pytest.mark.parametrize("num_tokens", [1, 7, 512])
def test_silu_and_mul_matches_reference(num_tokens):
    gate_up = randn(num_tokens, 2 * INTER, seed=num_tokens, scale=3.0)
    assert_bf16_matches(silu_and_mul_triton(gate_up), silu_and_mul_ref(gate_up))


@pytest.mark.parametrize("num_tokens", [1, 7, 512])
def test_rope_and_write_kv_exact(num_tokens):
    """Unfused products (enable_fp_fusion=False) make rotary bit-identical to torch."""
    q, k, v, positions, cos, sin, k_cache, v_cache, slots = rope_case(num_tokens)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    ref_q = rope_and_write_kv_ref(q, k, v, positions, cos, sin, ref_k_cache, ref_v_cache, slots)
    out_q = rope_and_write_kv_triton(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    assert torch.equal(out_q, ref_q)
    for cache, ref in ((k_cache, ref_k_cache), (v_cache, ref_v_cache)):
        assert torch.equal(cache.isnan(), ref.isnan())  # the same slots written, no others
        assert torch.equal(cache.nan_to_num(), ref.nan_to_num())


def test_cuda_graph_capture_and_replay():
    """All four kernels captured once, replayed on new inputs copied in place."""
    num_tokens = 8
    x, residual = randn(num_tokens, H, seed=0), randn(num_tokens, H, seed=1)
    weight = 1.0 + randn(H, seed=2, scale=0.2)
    gate_up = randn(num_tokens, 2 * INTER, seed=3)
    q, k, v, positions, cos, sin, k_cache, v_cache, slots = rope_case(num_tokens)

    def step():
        normed, new_residual = add_rms_norm_triton(x, residual, weight, 1e-5)
        q_rot = rope_and_write_kv_triton(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
        return normed, new_residual, q_rot, silu_and_mul_triton(gate_up)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile / warm up
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (1, 2):
        x.copy_(randn(num_tokens, H, seed=10 + seed))
        gate_up.copy_(randn(num_tokens, 2 * INTER, seed=20 + seed))
        q2, k2, v2, positions2, *_, slots2 = rope_case(num_tokens, seed=seed)
        for static, new in ((q, q2), (k, k2), (v, v2), (positions, positions2), (slots, slots2)):
            static.copy_(new)
        k_cache.fill_(float("nan"))
        v_cache.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_k_cache = torch.full_like(k_cache, float("nan"))
        ref_v_cache = ref_k_cache.clone()
        ref_normed, ref_residual = add_rms_norm_ref(x, residual, weight, 1e-5)
        assert_bf16_matches(outs[0], ref_normed)
        assert torch.equal(outs[1], ref_residual)
        ref_q = rope_and_write_kv_ref(q, k, v, positions, cos, sin, ref_k_cache, ref_v_cache, slots)
        assert torch.equal(outs[2], ref_q)
        assert torch.equal(k_cache.nan_to_num(), ref_k_cache.nan_to_num())
        assert torch.equal(v_cache.nan_to_num(), ref_v_cache.nan_to_num())
        assert_bf16_matches(outs[3], silu_and_mul_ref(gate_up))


def test_autograd_keeps_the_reference():
    """Training on the GPU differentiates through the norms: the dispatcher must not pick
    the Triton twin (no backward) while autograd records."""
    x = randn(4, 256, seed=0, dtype=torch.float32)
    weight = torch.ones(256, device="cuda", requires_grad=True)
    out = rms_norm(x, weight, 1e-6)
    out.sum().backward()
    assert weight.grad is not None
    with torch.no_grad():
        normed, _ = add_rms_norm(x, x, weight, 1e-6)
    assert normed.grad_fn is None


def test_decoder_layer_triton_vs_reference(monkeypatch):
    """One 8B-shaped layer in bf16, prefill then decode, fused kernels vs torch ops (both
    with the Triton paged attention)."""
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=1024, hidden_size=H, intermediate_size=INTER,
                      num_hidden_layers=1, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
                      rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=MAX_POS)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to("cuda", BF16).eval()
    model.model.layers[0].self_attn.rope.reset_buffers()
    tables = [[3, 7, 9], [12, 1, 5]]
    steps = [([0, 0], [list(range(5, 40)), list(range(100, 117))]), ([35, 17], [[4], [60]])]

    def run(triton_path: bool):
        monkeypatch.setattr(layer_kernels, "_use_triton", lambda *t: triton_path and t[0].is_cuda)
        bind_kv_cache(model.attention_layers, allocate_kv_cache(1, 16, BS, HKV, D, BF16, "cuda"))
        outs = []
        for starts, tokens in steps:
            positions, meta = build_attention_metadata(tables, starts, [len(t) for t in tokens], BS, "cuda")
            with torch.no_grad():
                outs.append(model(torch.tensor([t for s in tokens for t in s], device="cuda"), positions, meta)[0])
        return outs

    for out, ref in zip(run(True), run(False)):
        rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        assert rel < 1e-2, rel


def test_timing_table(capsys):
    """Per-call time of each fused kernel against the torch ops it replaces, bf16, and the
    bandwidth the kernel reaches (bytes = inputs read + outputs written). The kernels' time is
    the device's (CUDA-graph replays); the torch ops' is eager calls (their reference write
    synchronises, so it cannot be captured), as the engine ran them before."""
    from triton.testing import do_bench

    from tests.gpu.timing import graphed_us

    rows = []
    for num_tokens in (1, 64, 512):
        x, residual = randn(num_tokens, H, seed=0), randn(num_tokens, H, seed=1)
        weight = 1.0 + randn(H, seed=2, scale=0.2)
        gate_up = randn(num_tokens, 2 * INTER, seed=3)
        q, k, v, positions, cos, sin, k_cache, v_cache, slots = rope_case(num_tokens)
        cases = [
            ("add_rms_norm", lambda: add_rms_norm_ref(x, residual, weight, 1e-5),
             lambda: add_rms_norm_triton(x, residual, weight, 1e-5), 4 * num_tokens * H * 2),
            ("silu_and_mul", lambda: silu_and_mul_ref(gate_up), lambda: silu_and_mul_triton(gate_up),
             3 * num_tokens * INTER * 2),
            ("rope_and_write_kv",
             lambda: rope_and_write_kv_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slots),
             lambda: rope_and_write_kv_triton(q, k, v, positions, cos, sin, k_cache, v_cache, slots),
             2 * num_tokens * (HQ + 2 * HKV) * D * 2),
        ]
        for name, ref, fused, nbytes in cases:
            ms_ref = do_bench(ref, warmup=25, rep=100, return_mode="median")
            ms = graphed_us(fused) / 1e3
            rows.append((name, num_tokens, ms_ref * 1e3, ms * 1e3, nbytes / (ms * 1e-3) / 1e9))
    with capsys.disabled():
        print(f"\nfused layer kernels on {torch.cuda.get_device_name()}, bf16, H={H} I={INTER} "
              f"Hq={HQ} Hkv={HKV} D={D}")
        print(f"{'kernel':>18} {'T':>4} {'torch us':>9} {'triton us':>9} {'GB/s':>6}")
        for name, t, us_ref, us, bw in rows:
            print(f"{name:>18} {t:>4} {us_ref:>9.1f} {us:>9.1f} {bw:>6.0f}")
