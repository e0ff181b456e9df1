"""Verification of speculative drafts for a whole batch.

Every function takes a batch of ``B`` sequences with up to ``K`` drafts each:

* ``draft_tokens``  ``[B, K]`` int64; entries at positions ``>= num_drafts[b]`` are
  arbitrary (never read, may be out of vocabulary range).
* ``num_drafts``    ``[B]`` int32, values ``0..K`` (may differ per row).

and returns ``(output_tokens [B, K + 1] int64, num_accepted [B] int32)``: row ``b``
holds its ``num_accepted[b]`` accepted drafts, then exactly ONE more token (the
target's correction at the first rejected position, or the bonus token after the
last draft when every draft was accepted), then ``PLACEHOLDER``.  So
``num_accepted[b] + 1`` tokens are emitted per row.

Each operation has a torch reference (``*_ref``, loop-free, no host sync, runs on
CPU and GPU), a Triton kernel (``*_triton``) that produces IDENTICAL integer
outputs, and a dispatcher (no suffix) that takes Triton for CUDA tensors and the
reference otherwise.

Rejection sampling (lossless), for target distribution ``p_i`` and draft
distribution ``q_i`` at draft position ``i`` and draft token ``x = x_i``:

* Acceptance rule (the single rule both paths use)::

      a(x) = min(1, p(x) / q(x))        if q(x) > 0   (float32, correctly rounded /)
      a(x) = 1 if p(x) > 0 else 0       if q(x) == 0  (draft token the drafter "couldn't" propose)
      accept  <=>  u < a(x),            u = uniforms[b, i] ~ U[0, 1)

  so ``P(accept) = a(x) = min(1, p(x)/q(x))`` (up to the 2**-24 grid of float32 ``u``).
  ``draft_probs=None`` means a deterministic drafter (n-gram): ``q`` is one-hot at the
  draft token, hence ``a(x) = p(x)``.  The one-hot is never materialised in the kernel.
* At the first rejected position ``j`` the emitted token is drawn from the residual
  ``r = normalize(max(p_j - q_j, 0))`` (falling back to ``p_j`` when that is all zero,
  i.e. ``p_j == q_j``) with the exponential race ``argmax_v r_v / E_v``,
  ``E = exp_noise[b] ~ Exp(1)`` i.i.d.; ``P(argmax = v) = r_v / sum(r)``, so the
  normalisation is unnecessary.  Ties go to the smallest index in both paths.
* If all ``n = num_drafts[b]`` drafts are accepted, the bonus token is
  ``argmax_v p_n(v) / E_v`` -- the same race with ``q := 0`` (so the residual is ``p_n``).

``rejection_components_*`` expose ``a(x)`` and the normalised residual distribution,
computed by the SAME helpers the sampling paths use, so the tests can check exactly
that the implied distribution of the emitted token equals ``p``.

Greedy requests in a mixed batch are verified by passing one-hot target rows: then
``a(x) = [x == argmax]`` and the residual is the one-hot itself, which reduces exactly
to greedy verification.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parspec.transfer import to_device

PLACEHOLDER = -1
BLOCK_V = 1024
# The vocabulary size is a tl.constexpr in the kernels: it is fixed per model, so this
# costs one compilation and lets the compiler unroll the vocabulary loop bounds.

__all__ = [
    "PLACEHOLDER",
    "verify_greedy", "verify_greedy_ref", "verify_greedy_triton",
    "verify_rejection", "verify_rejection_ref", "verify_rejection_triton",
    "rejection_components_ref", "rejection_components_triton",
    "accept_prob_ref", "residual_ref",
    "draw_verification_noise",
]


# --------------------------------------------------------------------------------------
# torch reference
# --------------------------------------------------------------------------------------

def accept_prob_ref(p_x: torch.Tensor, q_x: torch.Tensor) -> torch.Tensor:
    """``a(x) = min(1, p(x)/q(x))``; for ``q(x) == 0``: 1 if ``p(x) > 0`` else 0."""
    pos = q_x > 0
    ratio = p_x / torch.where(pos, q_x, torch.ones_like(q_x))
    return torch.where(pos, ratio.clamp_max(1.0), (p_x > 0).to(p_x.dtype))


def residual_ref(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Unnormalised residual ``max(p - q, 0)``."""
    return (p - q).clamp_min(0.0)


def _assemble_ref(draft_tokens: torch.Tensor, num_accepted: torch.Tensor,
                  final_token: torch.Tensor) -> torch.Tensor:
    """``[accepted drafts..., final_token, PLACEHOLDER...]`` per row, shape ``[B, K + 1]``."""
    batch, k = draft_tokens.shape
    pos = torch.arange(k + 1, device=draft_tokens.device)
    drafts = torch.cat([draft_tokens, draft_tokens.new_zeros(batch, 1)], dim=1)
    acc = num_accepted.to(torch.int64)[:, None]
    out = torch.where(pos < acc, drafts, torch.full_like(drafts, PLACEHOLDER))
    return torch.where(pos == acc, final_token.to(torch.int64)[:, None], out)


def _first_false(ok: torch.Tensor, num_drafts: torch.Tensor) -> torch.Tensor:
    """Index of the first position ``i < num_drafts`` where ``ok`` is False, else num_drafts."""
    batch, k = ok.shape
    pos = torch.arange(k, device=ok.device, dtype=torch.int32)
    n = num_drafts.to(torch.int32)[:, None]
    bad = (pos < n) & ~ok
    cand = torch.where(bad, pos.expand(batch, k), n.expand(batch, k))
    return torch.cat([cand, n], dim=1).amin(dim=1)  # the extra column makes K == 0 work


def verify_greedy_ref(draft_tokens: torch.Tensor, num_drafts: torch.Tensor,
                      target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept drafts while they equal ``argmax(target_logits[b, i])``; emit the argmax at the
    first mismatch (or at position ``num_drafts[b]`` as the bonus)."""
    k = draft_tokens.shape[1]
    target = target_logits.argmax(dim=-1)  # [B, K+1], first max index on ties
    num_acc = _first_false(draft_tokens == target[:, :k], num_drafts)
    final = target.gather(1, num_acc.to(torch.int64)[:, None])[:, 0]
    return _assemble_ref(draft_tokens, num_acc, final), num_acc


def _check_rejection_args(draft_tokens, draft_probs, target_probs, uniforms, exp_noise):
    batch, k = draft_tokens.shape
    assert target_probs.dim() == 3 and target_probs.shape[:2] == (batch, k + 1), target_probs.shape
    assert target_probs.dtype == torch.float32, "target_probs must be float32"
    if draft_probs is not None:
        assert draft_probs.shape == (batch, k, target_probs.shape[2]), draft_probs.shape
        assert draft_probs.dtype == torch.float32, "draft_probs must be float32"
    assert uniforms.shape == (batch, k) and uniforms.dtype == torch.float32
    assert exp_noise.shape == (batch, target_probs.shape[2]) and exp_noise.dtype == torch.float32


def verify_rejection_ref(draft_tokens: torch.Tensor, num_drafts: torch.Tensor,
                         draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                         uniforms: torch.Tensor, exp_noise: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless rejection sampling of a batch of drafts (see the module docstring)."""
    _check_rejection_args(draft_tokens, draft_probs, target_probs, uniforms, exp_noise)
    batch, k = draft_tokens.shape
    vocab = target_probs.shape[2]
    dev = draft_tokens.device
    pos = torch.arange(k, device=dev)
    valid = pos < num_drafts.to(torch.int64)[:, None]
    x = torch.where(valid, draft_tokens, torch.zeros_like(draft_tokens))  # garbage never indexes
    p_x = target_probs[:, :k].gather(2, x[..., None])[..., 0]
    q_x = (torch.ones_like(p_x) if draft_probs is None
           else draft_probs.gather(2, x[..., None])[..., 0])
    accept = uniforms < accept_prob_ref(p_x, q_x)
    num_acc = _first_false(accept, num_drafts)

    # Only the full rows at position j (recovery or bonus) are read.
    rows = torch.arange(batch, device=dev)
    j = num_acc.to(torch.int64)
    rejected = j < num_drafts.to(torch.int64)
    p_j = target_probs[rows, j]
    if k == 0:
        q_j = torch.zeros_like(p_j)
    elif draft_probs is None:
        x_j = torch.where(rejected, x[rows, j.clamp_max(k - 1)], torch.full_like(j, -1))
        q_j = (torch.arange(vocab, device=dev) == x_j[:, None]).to(p_j.dtype)  # [B, V] only
    else:
        q_j = torch.where(rejected[:, None], draft_probs[rows, j.clamp_max(k - 1)],
                          torch.zeros_like(p_j))  # bonus: q := 0, residual == p_n
    r = residual_ref(p_j, q_j)
    # Exponential race. One noise vector per row suffices: exactly one of
    # {recovered token, bonus token} is emitted per row, so no noise is reused.
    tok_r = (r / exp_noise).argmax(dim=-1)
    tok_p = (p_j / exp_noise).argmax(dim=-1)
    final = torch.where((r > 0).any(dim=-1), tok_r, tok_p)  # all-zero residual: sample p
    return _assemble_ref(draft_tokens, num_acc, final), num_acc


def rejection_components_ref(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                             target_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For every draft position ``i < K`` (all drafts must be valid tokens): the acceptance
    probability ``a(x_i)`` ``[B, K]`` and the normalised residual distribution ``[B, K, V]``
    (``p_i`` normalised where ``max(p_i - q_i, 0)`` is all zero).  Analysis only."""
    batch, k = draft_tokens.shape
    vocab = target_probs.shape[2]
    p = target_probs[:, :k].float()
    p_x = p.gather(2, draft_tokens[..., None])[..., 0]
    if draft_probs is None:
        q = (torch.arange(vocab, device=p.device) == draft_tokens[..., None]).to(p.dtype)
    else:
        q = draft_probs.float()
    q_x = q.gather(2, draft_tokens[..., None])[..., 0]
    r = residual_ref(p, q)
    r_sum = r.sum(-1, keepdim=True)
    fallback = p / p.sum(-1, keepdim=True)
    res = torch.where(r_sum > 0, r / torch.where(r_sum > 0, r_sum, torch.ones_like(r_sum)), fallback)
    return accept_prob_ref(p_x, q_x), res


# --------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------

@triton.jit
def _accept_prob(p_x, q_x):
    pos = q_x > 0
    # div_rn: IEEE-rounded division, bit-identical to torch's (plain `/` may be approximate)
    ratio = tl.div_rn(p_x, tl.where(pos, q_x, 1.0))
    return tl.where(pos, tl.minimum(ratio, 1.0), tl.where(p_x > 0, 1.0, 0.0))


@triton.jit
def _residual(p, q):
    return tl.maximum(p - q, 0.0)


@triton.jit
def _race_step(vals, noise, in_v, v0, best_val, best_idx):
    """One vocabulary block of the exponential race ``argmax vals / noise``."""
    score = tl.where(in_v, tl.div_rn(vals, noise), -1.0)  # real scores are >= 0
    blk_val, blk_idx = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
    better = blk_val > best_val  # strict: an earlier block wins ties, like torch.argmax
    return tl.where(better, blk_val, best_val), tl.where(better, blk_idx + v0, best_idx)


@triton.jit
def _write_output(out_ptr, draft_ptr, stride_db, stride_dk, b, num_acc, token, K,
                  BLOCK_K: tl.constexpr):
    offs = tl.arange(0, BLOCK_K)
    drafts = tl.load(draft_ptr + b * stride_db + offs * stride_dk, mask=offs < num_acc, other=0)
    out = tl.where(offs < num_acc, drafts, tl.where(offs == num_acc, token.to(tl.int64), -1))
    tl.store(out_ptr + b * (K + 1) + offs, out, mask=offs < K + 1)


# K (the step's depth) and the drafts' layout (a column view of the runner's fed tokens, or a
# fresh empty tensor in a prefill) follow the step; not specialised, so each depth compiles only
# for its BLOCK_K, which LLMEngine.warm_up visits.
@triton.jit(do_not_specialize=["stride_db", "stride_dk", "K"], do_not_specialize_on_alignment=["draft_ptr"])
def _greedy_kernel(draft_ptr, num_drafts_ptr, target_ptr, out_ptr, num_acc_ptr,
                   stride_db, stride_dk, K, BLOCK_K: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(num_drafts_ptr + b)
    offs = tl.arange(0, BLOCK_K)
    valid = offs < n
    drafts = tl.load(draft_ptr + b * stride_db + offs * stride_dk, mask=valid, other=-1)
    target = tl.load(target_ptr + b * (K + 1) + offs, mask=offs <= n, other=-1)
    # first mismatch among the row's drafts, or n when all match
    num_acc = tl.min(tl.where(valid & (drafts != target), offs, n), axis=0)
    token = tl.load(target_ptr + b * (K + 1) + num_acc)
    _write_output(out_ptr, draft_ptr, stride_db, stride_dk, b, num_acc, token, K, BLOCK_K)
    tl.store(num_acc_ptr + b, num_acc)


@triton.jit
def _load_p_q(p_row, q_row, offs_v, in_v, x, stride_pv, stride_qv, q_mask, HAS_Q: tl.constexpr):
    """One vocabulary block of p and q; without draft probabilities q is one-hot at x."""
    p = tl.load(p_row + offs_v * stride_pv, mask=in_v, other=0.0)
    if HAS_Q:
        q = tl.load(q_row + offs_v * stride_qv, mask=in_v & q_mask, other=0.0)
    else:
        q = tl.where(offs_v == x, 1.0, 0.0)
    return p, q


@triton.jit(do_not_specialize=["stride_db", "stride_dk", "stride_ub", "stride_uk", "K"],
            do_not_specialize_on_alignment=["draft_ptr"])
def _rejection_kernel(draft_ptr, num_drafts_ptr, q_ptr, p_ptr, u_ptr, noise_ptr,
                      out_ptr, num_acc_ptr,
                      stride_db, stride_dk, stride_qb, stride_qk, stride_qv,
                      stride_pb, stride_pk, stride_pv, stride_ub, stride_uk,
                      stride_nb, stride_nv, K, V: tl.constexpr,
                      HAS_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(num_drafts_ptr + b)

    # Acceptance: only p_i(x_i), q_i(x_i), u_i for i < n. The K gathers are independent,
    # so they are issued as one vector instead of a sequential loop over positions.
    offs_k = tl.arange(0, BLOCK_K)
    valid = offs_k < n
    x = tl.load(draft_ptr + b * stride_db + offs_k * stride_dk, mask=valid, other=0)
    p_x = tl.load(p_ptr + b * stride_pb + offs_k * stride_pk + x * stride_pv, mask=valid, other=0.0)
    if HAS_Q:
        q_x = tl.load(q_ptr + b * stride_qb + offs_k * stride_qk + x * stride_qv, mask=valid, other=1.0)
    else:
        q_x = tl.full([BLOCK_K], 1.0, tl.float32)  # deterministic drafter: q one-hot at x
    u = tl.load(u_ptr + b * stride_ub + offs_k * stride_uk, mask=valid, other=1.0)
    accept = u < _accept_prob(p_x, q_x)
    j = tl.min(tl.where(valid & ~accept, offs_k, n), axis=0)
    rejected = j < n

    # Recovery (j < n) or bonus (j == n, q := 0): one race over the full row at position j.
    # Both races (residual and p) run in the same pass; p is the all-zero-residual fallback.
    x_j = tl.load(draft_ptr + b * stride_db + j * stride_dk, mask=rejected, other=-1)
    p_row = p_ptr + b * stride_pb + j * stride_pk
    q_row = q_ptr + b * stride_qb + j * stride_qk
    n_row = noise_ptr + b * stride_nb
    best_r = tl.full([], -1.0, tl.float32)
    idx_r = tl.full([], 0, tl.int32)
    best_p = tl.full([], -1.0, tl.float32)
    idx_p = tl.full([], 0, tl.int32)
    max_r = tl.full([], 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        in_v = offs_v < V
        p, q = _load_p_q(p_row, q_row, offs_v, in_v, x_j, stride_pv, stride_qv, rejected, HAS_Q)
        r = _residual(p, q)
        noise = tl.load(n_row + offs_v * stride_nv, mask=in_v, other=1.0)
        best_r, idx_r = _race_step(r, noise, in_v, v0, best_r, idx_r)
        best_p, idx_p = _race_step(p, noise, in_v, v0, best_p, idx_p)
        max_r = tl.maximum(max_r, tl.max(r, axis=0))
    token = tl.where(max_r > 0, idx_r, idx_p)
    _write_output(out_ptr, draft_ptr, stride_db, stride_dk, b, j, token, K, BLOCK_K)
    tl.store(num_acc_ptr + b, j)


@triton.jit(do_not_specialize=["stride_db", "stride_dk", "K"])
def _components_kernel(draft_ptr, q_ptr, p_ptr, accept_ptr, res_ptr,
                       stride_db, stride_dk, stride_qb, stride_qk, stride_qv,
                       stride_pb, stride_pk, stride_pv, K, V: tl.constexpr,
                       HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64)
    x = tl.load(draft_ptr + b * stride_db + i * stride_dk)
    p_row = p_ptr + b * stride_pb + i * stride_pk
    q_row = q_ptr + b * stride_qb + i * stride_qk
    p_x = tl.load(p_row + x * stride_pv)
    if HAS_Q:
        q_x = tl.load(q_row + x * stride_qv)
    else:
        q_x = tl.full([], 1.0, tl.float32)
    tl.store(accept_ptr + b * K + i, _accept_prob(p_x, q_x))

    r_sum = tl.full([], 0.0, tl.float32)
    p_sum = tl.full([], 0.0, tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        in_v = offs_v < V
        p, q = _load_p_q(p_row, q_row, offs_v, in_v, x, stride_pv, stride_qv, True, HAS_Q)
        r_sum += tl.sum(_residual(p, q), axis=0)
        p_sum += tl.sum(p, axis=0)
    use_r = r_sum > 0
    denom = tl.where(use_r, r_sum, p_sum)
    out_row = res_ptr + (b * K + i) * V
    for v0 in range(0, V, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        in_v = offs_v < V
        p, q = _load_p_q(p_row, q_row, offs_v, in_v, x, stride_pv, stride_qv, True, HAS_Q)
        dist = tl.where(use_r, _residual(p, q), p)
        tl.store(out_row + offs_v, tl.div_rn(dist, denom), mask=in_v)


def _block_k(k: int) -> int:
    return max(triton.next_power_of_2(k + 1), 2)


def verify_greedy_triton(draft_tokens: torch.Tensor, num_drafts: torch.Tensor,
                         target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, k = draft_tokens.shape
    target = target_logits.argmax(dim=-1).contiguous()  # torch argmax: same ties as the reference
    num_drafts = num_drafts.to(torch.int32).contiguous()
    out = torch.empty(batch, k + 1, dtype=torch.int64, device=draft_tokens.device)
    num_acc = torch.empty(batch, dtype=torch.int32, device=draft_tokens.device)
    if batch > 0:
        _greedy_kernel[(batch,)](draft_tokens, num_drafts, target, out, num_acc,
                                 draft_tokens.stride(0), draft_tokens.stride(1), k,
                                 BLOCK_K=_block_k(k))
    return out, num_acc


def verify_rejection_triton(draft_tokens: torch.Tensor, num_drafts: torch.Tensor,
                            draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                            uniforms: torch.Tensor, exp_noise: torch.Tensor,
                            block_v: int = BLOCK_V) -> tuple[torch.Tensor, torch.Tensor]:
    _check_rejection_args(draft_tokens, draft_probs, target_probs, uniforms, exp_noise)
    batch, k = draft_tokens.shape
    vocab = target_probs.shape[2]
    num_drafts = num_drafts.to(torch.int32).contiguous()
    out = torch.empty(batch, k + 1, dtype=torch.int64, device=draft_tokens.device)
    num_acc = torch.empty(batch, dtype=torch.int32, device=draft_tokens.device)
    has_q = draft_probs is not None
    q = draft_probs if has_q else target_probs  # dummy pointer, never read when HAS_Q=False
    q_strides = q.stride() if has_q else (0, 0, 0)
    if batch > 0:
        _rejection_kernel[(batch,)](
            draft_tokens, num_drafts, q, target_probs, uniforms, exp_noise, out, num_acc,
            draft_tokens.stride(0), draft_tokens.stride(1), *q_strides, *target_probs.stride(),
            uniforms.stride(0), uniforms.stride(1), exp_noise.stride(0), exp_noise.stride(1),
            k, vocab, HAS_Q=has_q, BLOCK_K=_block_k(k), BLOCK_V=block_v)
    return out, num_acc


def rejection_components_triton(draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None,
                                target_probs: torch.Tensor, block_v: int = BLOCK_V
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`rejection_components_ref`, built on the sampling kernel's helpers."""
    assert target_probs.dtype == torch.float32
    batch, k = draft_tokens.shape
    vocab = target_probs.shape[2]
    dev = draft_tokens.device
    accept = torch.empty(batch, k, dtype=torch.float32, device=dev)
    res = torch.empty(batch, k, vocab, dtype=torch.float32, device=dev)
    has_q = draft_probs is not None
    q = draft_probs if has_q else target_probs
    q_strides = q.stride() if has_q else (0, 0, 0)
    if batch > 0 and k > 0:
        _components_kernel[(batch, k)](
            draft_tokens, q, target_probs, accept, res,
            draft_tokens.stride(0), draft_tokens.stride(1), *q_strides, *target_probs.stride(),
            k, vocab, HAS_Q=has_q, BLOCK_V=block_v)
    return accept, res


# --------------------------------------------------------------------------------------
# dispatchers
# --------------------------------------------------------------------------------------

def verify_greedy(draft_tokens: torch.Tensor, num_drafts: torch.Tensor,
                  target_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if draft_tokens.is_cuda:
        return verify_greedy_triton(draft_tokens, num_drafts, target_logits)
    return verify_greedy_ref(draft_tokens, num_drafts, target_logits)


def verify_rejection(draft_tokens: torch.Tensor, num_drafts: torch.Tensor,
                     draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                     uniforms: torch.Tensor, exp_noise: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    if draft_tokens.is_cuda:
        return verify_rejection_triton(draft_tokens, num_drafts, draft_probs, target_probs,
                                       uniforms, exp_noise)
    return verify_rejection_ref(draft_tokens, num_drafts, draft_probs, target_probs,
                                uniforms, exp_noise)


# --------------------------------------------------------------------------------------
# randomness
# --------------------------------------------------------------------------------------

def draw_verification_noise(batch_size: int, num_draft_slots: int, vocab_size: int,
                            generators: list[torch.Generator | None],
                            device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """``uniforms [B, K]`` ~ U[0, 1) and ``exp_noise [B, V]`` ~ Exp(1), float32.

    A row with a generator draws from it, always in the same order (its K uniforms, then
    its V noise values), so a seeded request reproduces regardless of the rest of the
    batch (for fixed K and V).  The generator must live on ``device``.  Rows without one
    share one batched draw from the default generator.  ``exp_noise`` is clamped to the
    smallest normal float32, so it is strictly positive and ``p / noise`` stays finite.
    """
    assert len(generators) == batch_size
    uniforms = torch.empty(batch_size, num_draft_slots, dtype=torch.float32, device=device)
    noise = torch.empty(batch_size, vocab_size, dtype=torch.float32, device=device)
    unseeded = [b for b, g in enumerate(generators) if g is None]
    for b, g in enumerate(generators):
        if g is not None:
            uniforms[b] = torch.rand(num_draft_slots, generator=g, dtype=torch.float32, device=device)
            noise[b].exponential_(generator=g)
    if len(unseeded) == batch_size:
        uniforms.uniform_()
        noise.exponential_()
    elif unseeded:
        idx = to_device(unseeded, torch.int64, device)
        uniforms.index_copy_(0, idx, torch.rand(len(unseeded), num_draft_slots,
                                                 dtype=torch.float32, device=device))
        noise.index_copy_(0, idx, torch.empty(len(unseeded), vocab_size, dtype=torch.float32,
                                              device=device).exponential_())
    noise.clamp_min_(torch.finfo(torch.float32).tiny)
    return uniforms, noise
