"""Batch-invariant mode: every op on the target's path computes a row the same way whatever
else is in the batch, so greedy speculative output equals non-speculative output bit for bit,
in bfloat16 on the GPU as in float32 on the CPU.

Why it is needed: a verify step multiplies K + 1 rows per sequence, a decode step one, a
prefill hundreds. GEMM libraries and GPU kernels choose their algorithm, tiling, split-K and
reduction order from those shapes, so the same row is rounded differently in each. At a
near-tie of the target's top two logits the two paths then pick different tokens and the
sequences part for good (``benchmarks/results/divergence_p-eagle_k2_cpu_fp32.log``). The mode
fixes every row's arithmetic: it depends on the row's own values, its position and the
weights, never on the rows around it, the number of query tokens of its sequence (prefill
chunk, decode, verify) or the batch's longest context.

What the mode changes (``LLM(batch_invariant=True)``; :func:`set_batch_invariant` on the
target only; the default path keeps its kernels and speed):

* linears (qkv, o, gate/up, down, lm_head): on the GPU :func:`matmul_triton`, one Triton
  GEMM with a fixed BLOCK_M, a BLOCK_N and BLOCK_K chosen from the weight's shape and the
  GPU (never from the number of rows), no split-K and the K loop walked in order. On the
  CPU :func:`linear_rows`: rows go through GEMMs of ONE fixed shape ``[ROW_CHUNK, K]``,
  after a probe has shown the library computes a row of that shape the same way at every
  position of the chunk (else one row per GEMM).
* attention: on the GPU the paged-attention kernel with a fixed query tile and fixed splits
  of ``attention.SPLIT_KEYS`` keys, merged in split order
  (``attention.paged_attention_triton(..., batch_invariant=True)``); on the CPU
  :func:`paged_attention_rows`, each query row over exactly the keys it sees.
* RMSNorm (with the residual add), SiLU-and-mul and rotary + KV write are per row already:
  their Triton kernels give each row (token) its own program, configured from the row's
  width only, and their torch references reduce each row on its own (tests prove both).

The drafters keep the default kernels. A draft only decides how many tokens a step
accepts, never which, so losslessness needs only the target invariant; drafts (and hence
acceptance and speed) may still vary with the batch.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from parspec.attention import AttentionMetadata, _DEFAULT_NUM_SMS, _num_sms, paged_attention_triton

log = logging.getLogger("parspec")

__all__ = ["set_batch_invariant", "is_batch_invariant", "linear", "linear_rows", "matmul_ref", "matmul_triton",
           "matmul_tiles", "paged_attention", "paged_attention_rows", "ROW_CHUNK"]


def set_batch_invariant(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Switches every module of ``model`` that has a batch-invariant path (parspec's Linear
    and PagedSelfAttention) to it, or back; returns the model."""
    found = False
    for module in model.modules():
        if hasattr(module, "batch_invariant"):
            module.batch_invariant = enabled
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no module with a batch-invariant path")
    return model


def is_batch_invariant(model: torch.nn.Module) -> bool:
    flags = [m.batch_invariant for m in model.modules() if hasattr(m, "batch_invariant")]
    return bool(flags) and all(flags)


# --------------------------------------------------------------------------------------
# linears
# --------------------------------------------------------------------------------------

def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` computed per row the same way whatever the number of rows."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if x.is_cuda and not needs_grad:
        return matmul_triton(x, weight, bias)
    return linear_rows(x, weight, bias)


ROW_CHUNK = 16  # rows per CPU GEMM of a linear in the mode: every call has this one shape


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                chunk: int = ROW_CHUNK) -> torch.Tensor:
    """Torch path of :func:`linear`: the rows in chunks of ``chunk`` (the last one padded
    with zero rows), each chunk one GEMM of the fixed shape ``[chunk, K] x [K, N]`` in a
    fresh buffer, so every call the library sees has the same shape and alignment. Where the
    probe (:func:`chunk_gemm_is_position_invariant`) finds that a chunk's row depends on its
    place in the chunk, each row is its own ``[1, K]`` GEMM instead (slower, same guarantee).
    bfloat16 / float16 operands are multiplied in float32 (exact products, float32 sums,
    one rounding at the end, as :func:`matmul_ref`): CPUs without native units for them
    run their GEMMs several times slower."""
    k, n = x.shape[-1], weight.shape[0]
    if weight.shape[-1] != k:
        raise ValueError(f"linear: input rows have {k} features, weight {tuple(weight.shape)} expects "
                         f"{weight.shape[-1]}")
    rows = x.reshape(-1, k)
    w = weight.float()
    if not chunk_gemm_is_position_invariant(k, n, w.dtype, torch.get_num_threads(), chunk, w.stride(-1) == 1):
        chunk = 1
    parts = []
    for i in range(0, rows.shape[0], chunk):
        m = min(chunk, rows.shape[0] - i)
        buf = rows.new_zeros(chunk, k, dtype=w.dtype)
        buf[:m] = rows[i:i + m]
        parts.append(F.linear(buf, w)[:m])
    out = torch.cat(parts) if parts else w.new_empty(0, n)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], n)


@functools.lru_cache(maxsize=None)
def chunk_gemm_is_position_invariant(k: int, n: int, dtype: torch.dtype, num_threads: int,
                                     chunk: int = ROW_CHUNK, row_major: bool = True) -> bool:
    """Whether this process's CPU GEMM of shape ``[chunk, k] x [k, n]`` in ``dtype`` (the
    weight ``[n, k]`` row-major or, if not, a transposed view) gives a row the same bits at
    every position of the chunk, among any other rows. Checked once per shape, layout and
    thread count on random data, where a position-dependent summation order shows in almost
    every output (numpy's OpenBLAS, for one, rounds rows 6-11 of a tile unlike rows 0-5)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(n, k, generator=g).to(dtype) if row_major else torch.randn(k, n, generator=g).to(dtype).t()
    row = torch.randn(k, generator=g).to(dtype)
    first = None
    for pos in range(chunk):
        buf = torch.randn(chunk, k, generator=g).to(dtype)
        buf[pos] = row
        got = F.linear(buf, weight)[pos]
        if first is None:
            first = got
        elif not torch.equal(got, first):
            log.warning("batch-invariant mode: the CPU GEMM [%d, %d] x [%d, %d] (%s) rounds a row by its "
                        "position; falling back to one row per GEMM", chunk, k, k, n, dtype)
            return False
    return True


def matmul_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Torch reference of :func:`matmul_triton`: float32 products and sums, one rounding."""
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# The GEMM's tiling. BLOCK_M is one constant; BLOCK_N and BLOCK_K follow the weight and the
# GPU. Nothing follows M, so a row is multiplied by the same compiled kernel, the same MMA
# instructions and the same K order whatever the number of rows.
MATMUL_BLOCK_M = 64


def matmul_tiles(n: int, k: int, dtype: torch.dtype, num_sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for a weight of ``n`` outputs and
    ``k`` inputs. BLOCK_N is the widest of 128/64/32 that still gives every SM a column of
    tiles: a decode step has one row tile, and without split-K the N tiles are all the
    parallelism a small batch has."""
    block_n = next((bn for bn in (128, 64) if triton.cdiv(n, bn) >= num_sms), 32)
    block_k = 32 if dtype == torch.float32 else 64
    return MATMUL_BLOCK_M, block_n, block_k, 4, 3 if dtype == torch.float32 else 4


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K,
                   stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_IEEE: tl.constexpr):
    # Grouped tile order (for L2 reuse of weight tiles): it decides which program computes a
    # tile, never how. M is not specialised, so M = 1 compiles to the same code as any M.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # no split-K: one program walks all of K, in order
        k_ok = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if DOT_IEEE:
            acc = tl.dot(x, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def matmul_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Triton twin of :func:`matmul_ref` for ``x [..., K]`` and an nn.Linear ``weight [N, K]``:
    one launch, grid ``cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N)``, fixed by ``M`` and the weight,
    so it can be captured in a CUDA graph. A row's result is bit-identical whatever ``M``."""
    k, n = x.shape[-1], weight.shape[0]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"matmul: input rows have {k} features, weight {tuple(weight.shape)} expects "
                         f"{weight.shape[-1]}")
    if weight.dtype != x.dtype:
        raise ValueError(f"matmul: input dtype {x.dtype} differs from the weight's {weight.dtype}")
    rows = x.reshape(-1, k)
    m = rows.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    sms = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.is_cuda else _DEFAULT_NUM_SMS
    block_m, block_n, block_k, num_warps, num_stages = matmul_tiles(n, k, x.dtype, sms)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    err = None
    for stages in (num_stages, 2, 1):  # software pipelining depth: never changes the arithmetic
        try:
            _matmul_kernel[grid](
                rows, weight, bias if bias is not None else weight, out, m, n, k,
                rows.stride(0), rows.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
                HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                DOT_IEEE=x.dtype == torch.float32, num_warps=num_warps, num_stages=stages)
            return out.view(*x.shape[:-1], n)
        except triton.runtime.errors.OutOfResources as e:
            err = e
    raise err


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------

def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    """Batch-invariant paged attention: the Triton kernel's fixed-split mode on CUDA tensors,
    :func:`paged_attention_rows` elsewhere."""
    if q.is_cuda:
        return paged_attention_triton(q, k_cache, v_cache, meta, scale, batch_invariant=True)
    return paged_attention_rows(q, k_cache, v_cache, meta, scale)


ATTENTION_KEY_BLOCK = 64  # keys per score block of the torch path, counted from key 0
ATTENTION_ROW_CHUNK = 64  # query rows per GEMM of the torch path


def paged_attention_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                         scale: float) -> torch.Tensor:
    """Torch path of the mode: what ``attention.paged_attention_ref`` computes (float32,
    exact softmax), with a row's arithmetic fixed by its own position. The reference pads a
    group of sequences to the longest, so the shapes, and the rounding, of a row follow its
    neighbours. Here the keys are cut into blocks of ATTENTION_KEY_BLOCK from key 0, every
    product is a fixed-shape GEMM (:func:`linear_rows`: ``[64 rows, D] x [D, 64 keys]`` for
    the scores, ``[64 rows, 64 keys] x [64 keys, D]`` for the output), and the blocks are
    summed one after another in key order. Keys past a row's position (or past the context)
    weigh exactly 0, so more of them change nothing."""
    starts = meta.query_start_loc.tolist()
    lens = meta.seq_lens.tolist()
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // num_kv_heads
    kb = ATTENTION_KEY_BLOCK
    out = torch.empty_like(q)
    for b, seq_len in enumerate(lens):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        if meta.query_positions is not None:
            pos = meta.query_positions[lo:hi].long()
        else:
            pos = torch.arange(seq_len - (hi - lo), seq_len, device=q.device)
        pos = pos.repeat_interleave(group)  # one row per (query, head of the group)
        blocks = meta.block_tables[b, :triton.cdiv(seq_len, block_size)].long()
        n_kb = triton.cdiv(seq_len, kb)
        # Fresh zero-padded float32 copies: key block j is the same bits at the same offset whatever seq_len.
        k = q.new_zeros(n_kb * kb, num_kv_heads, head_dim, dtype=torch.float32)
        v = torch.zeros_like(k)
        k[:seq_len] = k_cache[blocks].flatten(0, 1)[:seq_len]
        v[:seq_len] = v_cache[blocks].flatten(0, 1)[:seq_len]
        qh = q[lo:hi].float().view(hi - lo, num_kv_heads, group, head_dim)
        for h in range(num_kv_heads):
            rows = qh[:, h].reshape(-1, head_dim)
            out[lo:hi, h * group:(h + 1) * group] = _attend_blocks(rows, k[:, h], v[:, h], pos, scale).view(
                hi - lo, group, head_dim).to(q.dtype)
    return out


def _attend_blocks(rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """Rows ``[R, D]`` at positions ``pos`` over keys/values ``[n * KB, D]`` (zero past the
    context): softmax(q k^T * scale) v over keys 0..pos, blockwise in key order."""
    kb = ATTENTION_KEY_BLOCK
    scores = []
    for j in range(0, k.shape[0], kb):
        s = linear_rows(rows, k[j:j + kb], chunk=ATTENTION_ROW_CHUNK) * scale
        visible = torch.arange(j, j + kb, device=rows.device)[None, :] <= pos[:, None]
        scores.append(s.masked_fill(~visible, float("-inf")))
    peak = torch.stack([s.amax(dim=-1) for s in scores]).amax(dim=0)  # a max: order-free and exact
    total = torch.zeros_like(peak)
    acc = torch.zeros_like(rows)
    for i, s in enumerate(scores):
        e = torch.exp(s - peak[:, None])  # 0 where masked
        total = total + e.sum(dim=-1)
        acc = acc + linear_rows(e, v[i * kb:(i + 1) * kb].t(), chunk=ATTENTION_ROW_CHUNK)
    return acc / total[:, None]
