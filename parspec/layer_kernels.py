"""Fused per-layer kernels of a decoder layer: RMSNorm (with the residual add), SiLU-and-mul,
and rotary embedding fused with the paged KV-cache write.

With them a decoder layer is: add_rms_norm, qkv GEMM, rope_and_write_kv, paged attention,
o_proj GEMM, add_rms_norm, gate_up GEMM, silu_and_mul, down GEMM.

Maths, with ``dtype`` the activations' dtype and every step in float32 unless rounded:

* ``rms_norm(x, w, eps) = w * dtype(x / sqrt(mean(x^2) + eps))``: the normalisation is
  float32, rounded to ``dtype``, then multiplied by the weight and rounded again (the
  order HF uses, so the product is rounded once, after the multiply).
* ``add_rms_norm(x, r, w, eps) = (rms_norm(s, w, eps), s)`` with ``s = dtype(x + r)``:
  the new residual is rounded before it is normalised.
* ``silu_and_mul([g; u]) = dtype(dtype(g * sigmoid(g)) * u)`` = ``F.silu(g) * u``.
* ``rope_and_write_kv``: neox rotary (rotate halves) of q and k at ``positions``,
  ``[x1; x2] -> dtype([x1 cos - x2 sin; x2 cos + x1 sin])`` with float32 ``cos``/``sin``
  tables ``[max_positions, D/2]``; the rotated keys and the values go to their cache
  slots (slot -1 skips the token), and the rotated queries are returned.

Each op has a torch reference (``*_ref``; the model's CPU arithmetic, bit for bit), a
Triton twin (``*_triton``) and a dispatcher (no suffix) that takes Triton for CUDA tensors
and the reference otherwise, or whenever autograd has to see the op (training). The
Triton wrappers never read a device tensor on the host, so they can be captured in a
CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parspec.attention import write_kv_ref

__all__ = [
    "rms_norm", "rms_norm_ref", "rms_norm_triton",
    "add_rms_norm", "add_rms_norm_ref", "add_rms_norm_triton",
    "silu_and_mul", "silu_and_mul_ref", "silu_and_mul_triton",
    "rotate_half_ref",
    "rope_and_write_kv", "rope_and_write_kv_ref", "rope_and_write_kv_triton",
]

MAX_NORM_SIZE = 65536  # one row is one register tile; wider rows would spill


# --------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------

def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def rotate_half_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox rotary of ``x [..., D]`` by ``cos``/``sin`` broadcastable to ``[..., D/2]``."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def rope_and_write_kv_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                          cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                          v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotate q ``[T, Hq, D]`` and k ``[T, Hkv, D]``, write k and v ``[T, Hkv, D]`` to the
    caches at ``slot_mapping`` (-1 skips); returns the rotated q."""
    cos = cos[positions].unsqueeze(-2)  # [T, 1, D/2]
    sin = sin[positions].unsqueeze(-2)
    write_kv_ref(rotate_half_ref(k, cos, sin), v, k_cache, v_cache, slot_mapping)
    return rotate_half_ref(q, cos, sin)


# --------------------------------------------------------------------------------------
# dispatchers
# --------------------------------------------------------------------------------------

def _use_triton(*tensors: torch.Tensor) -> bool:
    # The Triton twins have no backward, so a graph autograd must differentiate stays in torch.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return tensors[0].is_cuda and not needs_grad


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_triton(x, weight):
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(x, residual, weight):
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_ref(x, residual, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if _use_triton(gate_up):
        return silu_and_mul_triton(gate_up)
    return silu_and_mul_ref(gate_up)


def rope_and_write_kv(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping) -> torch.Tensor:
    if _use_triton(q, k, v):
        return rope_and_write_kv_triton(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)
    return rope_and_write_kv_ref(q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping)


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------
#
# All three are memory bound: one pass over their inputs, float32 inside, and the
# reference's roundings reproduced step by step. Rotary is launched with
# enable_fp_fusion=False so ``x1 cos - x2 sin`` is two rounded products and a
# subtraction, as in torch, rather than a fused multiply-add.


# -- rms_norm / add_rms_norm --------------------------------------------------------------

@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
                     rows_inner, eps,
                     stride_xa, stride_xb, stride_ra, stride_rb,
                     HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    # Rows are [A, B] (e.g. tokens x heads of a strided q view); outputs are contiguous.
    row = tl.program_id(0).to(tl.int64)
    a = row // rows_inner
    b = row % rows_inner
    offs = tl.arange(0, BLOCK)
    mask = offs < HIDDEN
    x = tl.load(x_ptr + a * stride_xa + b * stride_xb + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + a * stride_ra + b * stride_rb + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * HIDDEN + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(xf * xf, 0) / HIDDEN + eps)
    normed = (xf * inv_rms).to(x.dtype)
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * HIDDEN + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., H]`` as ``[A, B, H]`` with unit stride along H, a view whenever possible.

    Tokens go along A: tokens x hidden is ``[T, 1, H]`` and tokens x heads x head_dim
    ``[T, Hq, D]``, so B and the strides are the model's sizes, never the token count (a
    kernel argument that followed T would compile a new variant for new values of T)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def _norm_launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"norm weight has shape {tuple(weight.shape)}, rows have size {hidden}")
    if hidden > MAX_NORM_SIZE:
        raise ValueError(f"rows of size {hidden} exceed the one-tile limit {MAX_NORM_SIZE}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != input shape {tuple(x.shape)}")
    x3 = _as_rows(x)
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, res_dtype), device=x.device)
    if residual is None:
        r3, residual_out = x3, out  # unused
    else:
        r3 = _as_rows(residual)
        residual_out = torch.empty(x.shape, dtype=res_dtype, device=x.device)
    rows = x3.shape[0] * x3.shape[1]
    if rows == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden)
    _rms_norm_kernel[(rows,)](
        x3, r3, weight.contiguous(), out, residual_out, x3.shape[1], float(eps),
        x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1),
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=max(1, min(16, block // 512)))  # ~16 elements a thread: 8 warps at 4096
    return out, residual_out


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton twin of :func:`rms_norm_ref`; ``x [..., H]`` may be a strided view (contiguous out)."""
    return _norm_launch(x, None, weight, eps)[0]


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`add_rms_norm_ref`: one pass reads x and residual, writes both outputs."""
    return _norm_launch(x, residual, weight, eps)


# -- silu_and_mul ------------------------------------------------------------------------

@triton.jit
def _silu_and_mul_kernel(gate_up_ptr, out_ptr, stride_row,
                         INTER: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < INTER
    gate = tl.load(gate_up_ptr + row * stride_row + offs, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * stride_row + INTER + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    silu = tl.math.div_rn(g, 1.0 + tl.exp(-g)).to(gate.dtype)  # F.silu rounds here
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * INTER + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


SILU_BLOCK = 1024


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`silu_and_mul_ref`: ``[..., 2I] -> [..., I]`` (contiguous out)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim must be even (gate then up), got {gate_up.shape[-1]}")
    inter = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
    rows2d = gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()
    rows2d = rows2d.reshape(-1, 2 * inter)
    if rows2d.shape[0] == 0 or inter == 0:
        return out
    block = min(SILU_BLOCK, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(rows2d.shape[0], triton.cdiv(inter, block))](
        rows2d, out, rows2d.stride(0), INTER=inter, BLOCK=block, num_warps=4)
    return out


# -- rope_and_write_kv -------------------------------------------------------------------

@triton.jit
def _rotate_tile(x_ptr, stride_h, stride_d, cos, sin, offs_h, offs_d, mask,
                 HALF: tl.constexpr, DTYPE: tl.constexpr):
    """Rotated ``[BLOCK_H, BLOCK_HALF]`` halves of one token's heads, rounded to DTYPE."""
    base = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :] * stride_d
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF * stride_d, mask=mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(DTYPE)
    out2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(DTYPE)
    return out1, out2


@triton.jit
def _rope_and_write_kv_kernel(
        q_ptr, k_ptr, v_ptr, positions_ptr, cos_ptr, sin_ptr,
        k_cache_ptr, v_cache_ptr, slot_ptr, q_out_ptr,
        stride_qt, stride_qh, stride_qd,
        stride_kt, stride_kh, stride_kd,
        stride_vt, stride_vh, stride_vd,
        stride_cos, stride_sin,
        stride_kcb, stride_kcs, stride_kch, stride_kcd,
        stride_vcb, stride_vcs, stride_vch, stride_vcd,
        NUM_Q_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
        BLOCK_HALF: tl.constexpr):
    # One program per token: its cos/sin row is read once for all its q and k heads.
    t = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = HEAD_DIM // 2
    pos = tl.load(positions_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    d_ok = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + offs_d, mask=d_ok, other=0.0).to(tl.float32)

    offs_hq = tl.arange(0, BLOCK_HQ)
    q_mask = (offs_hq < NUM_Q_HEADS)[:, None] & d_ok[None, :]
    q1, q2 = _rotate_tile(q_ptr + t * stride_qt, stride_qh, stride_qd, cos, sin, offs_hq, offs_d,
                          q_mask, HALF, q_out_ptr.dtype.element_ty)
    q_out = q_out_ptr + t * (NUM_Q_HEADS * HEAD_DIM) + offs_hq[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(q_out, q1, mask=q_mask)
    tl.store(q_out + HALF, q2, mask=q_mask)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    safe_slot = tl.maximum(slot, 0)  # masked below; keeps -1 from forming a wild address
    blk = safe_slot // BLOCK_SIZE
    off = safe_slot % BLOCK_SIZE
    offs_hk = tl.arange(0, BLOCK_HKV)
    kv_mask = (offs_hk < NUM_KV_HEADS)[:, None] & d_ok[None, :] & (slot >= 0)
    k1, k2 = _rotate_tile(k_ptr + t * stride_kt, stride_kh, stride_kd, cos, sin, offs_hk, offs_d,
                          kv_mask, HALF, k_ptr.dtype.element_ty)
    kc = (k_cache_ptr + blk * stride_kcb + off * stride_kcs
          + offs_hk[:, None] * stride_kch + offs_d[None, :] * stride_kcd)
    tl.store(kc, k1.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(kc + HALF * stride_kcd, k2.to(k_cache_ptr.dtype.element_ty), mask=kv_mask)

    v_src = v_ptr + t * stride_vt + offs_hk[:, None] * stride_vh + offs_d[None, :] * stride_vd
    vc = (v_cache_ptr + blk * stride_vcb + off * stride_vcs
          + offs_hk[:, None] * stride_vch + offs_d[None, :] * stride_vcd)
    v1 = tl.load(v_src, mask=kv_mask, other=0.0)
    v2 = tl.load(v_src + HALF * stride_vd, mask=kv_mask, other=0.0)
    tl.store(vc, v1.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(vc + HALF * stride_vcd, v2.to(v_cache_ptr.dtype.element_ty), mask=kv_mask)


def rope_and_write_kv_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                             cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                             v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`rope_and_write_kv_ref`, one launch, grid ``(T,)``.

    q, k and v may be strided views (e.g. of one fused qkv output); the returned q is a
    new contiguous ``[T, Hq, D]`` tensor."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if head_dim % 2:
        raise ValueError(f"rotary needs an even head_dim, got {head_dim}")
    if k.shape != (num_tokens, num_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must both be "
                         f"[{num_tokens}, Hkv, {head_dim}] like q {tuple(q.shape)}")
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not hold "
                         f"{num_kv_heads} heads of {head_dim}")
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.shape[-1] != head_dim // 2:
        raise ValueError(f"cos/sin must be [max_positions, {head_dim // 2}] with unit last stride, "
                         f"got {tuple(cos.shape)} / {tuple(sin.shape)}")
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out
    block_hq = triton.next_power_of_2(num_q_heads)
    block_half = triton.next_power_of_2(head_dim // 2)
    _rope_and_write_kv_kernel[(num_tokens,)](
        q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, q_out,
        *q.stride(), *k.stride(), *v.stride(), cos.stride(0), sin.stride(0),
        *k_cache.stride(), *v_cache.stride(),
        NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], BLOCK_HQ=block_hq, BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=block_half,
        num_warps=8 if block_hq * block_half >= 4096 else 4,  # 32 heads x 64: 16 elements a thread
        enable_fp_fusion=False)
    return q_out
