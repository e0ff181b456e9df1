"""Fused layer kernels: each Triton twin (run by the interpreter on CPU) against its torch
reference, and a whole model forward through the Triton path against the reference path.
Run with TRITON_INTERPRET=1 (the Makefile sets it).

float32 agrees to 1e-6 (rotary exactly), float16 to within a rounding step and mostly
bit for bit. bfloat16 is checked to within a few rounding steps only: the interpreter
(triton 3.6) rounds float32 -> bfloat16 toward zero where torch and the GPU round to
nearest even; tests/gpu/test_layer_kernels_gpu.py holds bfloat16 to the reference on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from parspec import layer_kernels
from parspec.config import ModelConfig
from parspec.kv_cache import allocate_kv_cache, bind_kv_cache
from parspec.layer_kernels import (add_rms_norm_ref, add_rms_norm_triton, rms_norm_ref, rms_norm_triton,
                                   rope_and_write_kv_ref, rope_and_write_kv_triton, silu_and_mul_ref,
                                   silu_and_mul_triton)
from parspec.metadata import build_attention_metadata
from parspec.models.layers import RotaryEmbedding
from parspec.models.llama import LlamaForCausalLM

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton needs a GPU or TRITON_INTERPRET=1")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Allowed |triton - ref| <= atol + rtol |ref|: rtol in units of the dtype's rounding step.
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-6),
       torch.float16: dict(atol=1e-5, rtol=2 * 2.0 ** -10),
       torch.bfloat16: dict(atol=1e-4, rtol=4 * 2.0 ** -7)}


@pytest.fixture
def nan_empty(monkeypatch):
    """torch.empty hands out NaN-filled float tensors, so an output element a kernel fails
    to write shows up as NaN."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def assert_matches(out, ref, dtype):
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape, out.dtype, ref.dtype)
    assert not out.isnan().any(), "an output element was never written"
    torch.testing.assert_close(out, ref, **TOL[dtype])
    if dtype == torch.float16:  # a rounding step apart only where float32 lands near a tie
        assert (out == ref).float().mean() > 0.99


def randn(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


def strided_rows(shape, dtype, seed=0):
    """A ``[T, heads, D]`` view into the middle of a wider fused tensor (like k of a qkv output)."""
    t, heads, d = shape
    fused = randn(t, (heads + 3) * d, dtype=dtype, seed=seed)
    return fused[:, d:(heads + 1) * d].view(t, heads, d)


# -- rms_norm / add_rms_norm ----------------------------------------------------------------

NORM_SHAPES = [(1, 96), (7, 1000), (7, 8192), (2, 3, 40), (2, 3, 4, 40)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
def test_rms_norm_matches_reference(nan_empty, shape, dtype):
    x = randn(*shape, dtype=dtype, scale=3.0)
    weight = 1.0 + randn(shape[-1], dtype=dtype, seed=1, scale=0.2)
    assert_matches(rms_norm_triton(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_of_strided_head_view(nan_empty, dtype):
    """Qwen3's q/k norm runs on per-head rows of a view into the fused qkv output."""
    x = strided_rows((7, 5, 48), dtype)
    assert not x.is_contiguous()
    weight = 1.0 + randn(48, dtype=dtype, seed=1, scale=0.2)
    out = rms_norm_triton(x, weight, 1e-6)
    assert out.is_contiguous()
    assert_matches(out, rms_norm_ref(x, weight, 1e-6), dtype)


def test_rms_norm_fp32_weight_on_half_input(nan_empty):
    """A float32 weight promotes the product, as ``weight * x.to(dtype)`` does in torch."""
    x = randn(7, 1000, dtype=torch.float16)
    weight = 1.0 + randn(1000, dtype=torch.float32, seed=1, scale=0.2)
    ref = rms_norm_ref(x, weight, 1e-5)
    assert ref.dtype == torch.float32
    assert_matches(rms_norm_triton(x, weight, 1e-5), ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 96), (7, 1000), (2, 3, 40)], ids=str)
def test_add_rms_norm_matches_reference(nan_empty, shape, dtype):
    x = randn(*shape, dtype=dtype, scale=3.0)
    residual = randn(*shape, dtype=dtype, seed=2, scale=3.0)
    weight = 1.0 + randn(shape[-1], dtype=dtype, seed=1, scale=0.2)
    normed, new_residual = add_rms_norm_triton(x, residual, weight, 1e-5)
    ref_normed, ref_residual = add_rms_norm_ref(x, residual, weight, 1e-5)
    assert_matches(normed, ref_normed, dtype)
    if dtype == torch.bfloat16:
        assert_matches(new_residual, ref_residual, dtype)
    else:  # one rounded add: identical
        assert torch.equal(new_residual, ref_residual)


def test_norm_rejects_mismatched_shapes():
    x = torch.zeros(3, 8)
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm_triton(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="residual shape"):
        add_rms_norm_triton(x, torch.zeros(3, 7), torch.ones(8), 1e-6)


# -- silu_and_mul ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 96), (7, 2 * 1000), (3, 2 * 1500), (2, 3, 2 * 40)], ids=str)
def test_silu_and_mul_matches_reference(nan_empty, shape, dtype):
    gate_up = randn(*shape, dtype=dtype, scale=3.0)
    assert_matches(silu_and_mul_triton(gate_up), silu_and_mul_ref(gate_up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_of_strided_rows(nan_empty, dtype):
    gate_up = randn(7, 2 * 100 + 16, dtype=dtype, scale=3.0)[:, :2 * 100]
    assert not gate_up.is_contiguous()
    assert_matches(silu_and_mul_triton(gate_up), silu_and_mul_ref(gate_up), dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, inside the interpreter
def test_silu_and_mul_saturates_like_torch():
    """Large |gate|: exp overflows to inf and silu goes to -0 / gate, as in torch."""
    gate_up = torch.tensor([[-200.0, -90.0, 0.0, 90.0, 1.0, 1.0, 1.0, 1.0]])
    torch.testing.assert_close(silu_and_mul_triton(gate_up), silu_and_mul_ref(gate_up), atol=0, rtol=0)


# -- rope_and_write_kv ----------------------------------------------------------------------

MAX_POS, BLOCK_SIZE, NUM_BLOCKS = 300, 4, 8


def rope_case(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, seed=0):
    """q, k, v as strided views of one fused qkv output; positions; slots in shuffled
    blocks, every third token's slot -1; NaN caches."""
    g = torch.Generator().manual_seed(seed)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    qkv = (2 * torch.randn(num_tokens, q_size + 2 * kv_size, generator=g)).to(dtype)
    q = qkv[:, :q_size].view(num_tokens, num_q_heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_dim)
    positions = torch.randperm(MAX_POS, generator=g)[:num_tokens]
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=g)[:num_tokens]
    slots[1::3] = -1
    k_cache = torch.full((NUM_BLOCKS, BLOCK_SIZE, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    rope = RotaryEmbedding(head_dim, MAX_POS, 10000.0, None)
    return q, k, v, positions, rope.cos, rope.sin, k_cache, k_cache.clone(), slots


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,num_q_heads,num_kv_heads,head_dim", [
    (1, 4, 4, 64),  # decode, MHA
    (7, 6, 2, 64),  # GQA, slot -1 entries
    (7, 12, 3, 48),  # head counts and D/2 = 24 not powers of two
    (5, 8, 1, 128),  # MQA
])
def test_rope_and_write_kv_matches_reference(nan_empty, num_tokens, num_q_heads, num_kv_heads, head_dim, dtype):
    q, k, v, positions, cos, sin, k_cache, v_cache, slots = rope_case(
        num_tokens, num_q_heads, num_kv_heads, head_dim, dtype)
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    ref_q = rope_and_write_kv_ref(q, k, v, positions, cos, sin, ref_k_cache, ref_v_cache, slots)
    out_q = rope_and_write_kv_triton(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    assert out_q.is_contiguous()
    if dtype == torch.bfloat16:
        assert_matches(out_q, ref_q, dtype)
    else:  # two rounded products and a rounded sum, exactly as torch does them
        assert torch.equal(out_q, ref_q)

    written = torch.zeros(NUM_BLOCKS * BLOCK_SIZE, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    written = written.view(NUM_BLOCKS, BLOCK_SIZE)
    for cache, ref in ((k_cache, ref_k_cache), (v_cache, ref_v_cache)):
        assert not cache[written].isnan().any(), "a kept token's slot was not written"
        assert cache[~written].isnan().all(), "a slot outside slot_mapping was written"
    assert torch.equal(v_cache[written], ref_v_cache[written])  # a copy
    if dtype == torch.bfloat16:
        assert_matches(k_cache[written], ref_k_cache[written], dtype)
    else:
        assert torch.equal(k_cache[written], ref_k_cache[written])


def test_rope_and_write_kv_converts_to_cache_dtype(nan_empty):
    q, k, v, positions, cos, sin, k_cache, v_cache, slots = rope_case(7, 6, 2, 64, torch.float32)
    k_cache, v_cache = k_cache.half(), v_cache.half()
    ref_k_cache, ref_v_cache = k_cache.clone(), v_cache.clone()
    rope_and_write_kv_ref(q, k, v, positions, cos, sin, ref_k_cache, ref_v_cache, slots)
    rope_and_write_kv_triton(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    assert torch.equal(k_cache.nan_to_num(), ref_k_cache.nan_to_num())
    assert torch.equal(v_cache.nan_to_num(), ref_v_cache.nan_to_num())


# -- the model through the Triton path ------------------------------------------------------

def tiny_config(qk_norm: bool) -> ModelConfig:
    return ModelConfig(architecture="Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM",
                       vocab_size=128, hidden_size=96, intermediate_size=80, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                       max_position_embeddings=64, qk_norm=qk_norm)


def run_model(model, steps, monkeypatch, triton_path: bool):
    """Prefill two sequences, then decode one token each; returns the hidden states of each step."""
    monkeypatch.setattr(layer_kernels, "_use_triton", lambda *tensors: triton_path)
    cfg = model.config
    bind_kv_cache(model.attention_layers, allocate_kv_cache(
        cfg.num_hidden_layers, 16, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim, torch.float32, "cpu"))
    tables, outs = [[3, 7], [12, 1]], []
    for starts, tokens in steps:
        positions, meta = build_attention_metadata(tables, starts, [len(t) for t in tokens], BLOCK_SIZE, "cpu")
        with torch.no_grad():
            outs.append(model(torch.tensor([t for seq in tokens for t in seq]), positions, meta)[0])
    return outs


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
def test_model_forward_through_triton_path(monkeypatch, qk_norm):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(qk_norm)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
    steps = [([0, 0], [[5, 9, 2, 77, 31], [8, 8, 100]]), ([5, 3], [[4], [60]])]
    ref = run_model(model, steps, monkeypatch, triton_path=False)
    out = run_model(model, steps, monkeypatch, triton_path=True)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


def test_dispatchers_take_the_differentiable_reference_on_cpu():
    x = torch.randn(3, 8)
    w = torch.ones(8, requires_grad=True)
    out = layer_kernels.rms_norm(x, w, 1e-6)
    assert torch.equal(out, rms_norm_ref(x, w, 1e-6))
    out.sum().backward()  # training reaches the norm weights
    assert w.grad is not None
    assert torch.equal(layer_kernels.silu_and_mul(x), silu_and_mul_ref(x))
