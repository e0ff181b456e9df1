"""The drafter's inputs for the step after a verification, built on the device.

After a decode step that fed ``[t, d1 .. dK]`` at positions ``base .. base + K`` and
accepted ``a`` drafts, the drafter's new entries are the fed positions whose target
features are valid: ``base .. base + a``, entry ``base + i`` carrying emitted token ``i``.
``a`` lives on the device, so the drafter runs a fixed, padded layout of ``Q = K + 1 +
num_mask`` entries per sequence, the same for every acceptance:

* entries ``e = 0 .. K``: position ``base + e``, token ``out[e]``; those past ``a``
  (rejected) get slot -1 (their K/V is not written) and their outputs are discarded;
* ``num_mask`` mask slots (P-EAGLE): positions right after the last accepted entry,
  ``base + a + 1 + j``, token ``mask_token_id``.

Queries attend by position (``AttentionMetadata.query_positions``), so a mask slot sees
the accepted entries and the earlier mask slots and nothing rejected. The rows whose
logits become drafts are ``a`` (the last accepted entry) and the mask slots.

``draft_inputs_ref`` is the torch reference; ``draft_inputs_triton`` does the same in one
launch (one program per sequence) instead of about fifteen small torch kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from parspec.metadata import slots_of


@dataclass
class DraftInputs:
    tokens: torch.Tensor  # [B * Q] int64
    positions: torch.Tensor  # [B * Q] int64
    slot_mapping: torch.Tensor  # [B * Q] int64, -1 for rejected entries
    seq_lens: torch.Tensor  # [B] int32: last position written + 1
    sample_rows: torch.Tensor  # [B * (1 + num_mask)] int64: rows whose logits are drafts, in depth order


def draft_inputs_ref(out_tokens: torch.Tensor, num_accepted: torch.Tensor, base: torch.Tensor,
                     block_tables: torch.Tensor, block_size: int, num_mask: int, mask_token_id: int) -> DraftInputs:
    """``out_tokens`` [B, K+1] emitted tokens (junk past ``num_accepted``), ``num_accepted`` [B],
    ``base`` [B] position of the first fed token, ``block_tables`` [B, W]."""
    b, k1 = out_tokens.shape
    q = k1 + num_mask
    dev = out_tokens.device
    acc = num_accepted.long()[:, None]
    e = torch.arange(q, device=dev)[None, :]
    real = e < k1
    kept = real & (e <= acc)
    padded = torch.cat([out_tokens.long(), torch.zeros(b, num_mask, dtype=torch.long, device=dev)], dim=1)
    tokens = torch.where(kept, padded, mask_token_id)
    positions = base.long()[:, None] + torch.where(real, e, acc + 1 + e - k1)
    slots = torch.where(real & ~kept, -1, slots_of(block_tables, positions, block_size))
    seq_lens = (base.long() + acc[:, 0] + 1 + num_mask).to(torch.int32)
    rows = torch.arange(b, device=dev)[:, None] * q + torch.cat(
        [acc, k1 + torch.arange(num_mask, device=dev)[None, :].expand(b, num_mask)], dim=1)
    return DraftInputs(tokens.flatten(), positions.flatten(), slots.flatten(), seq_lens, rows.flatten())


@triton.jit(do_not_specialize=["stride_bt"])  # as metadata's decode kernel: the width is not the kernel's choice
def _draft_inputs_kernel(out_ptr, acc_ptr, base_ptr, bt_ptr,
                         tokens_ptr, pos_ptr, slot_ptr, seq_lens_ptr, rows_ptr,
                         stride_out_b, stride_out_e, stride_acc, stride_base, stride_bt, mask_token_id,
                         K1: tl.constexpr, NUM_MASK: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         BLOCK_Q: tl.constexpr, BLOCK_R: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    Q: tl.constexpr = K1 + NUM_MASK
    acc = tl.load(acc_ptr + b * stride_acc).to(tl.int64)
    base = tl.load(base_ptr + b * stride_base).to(tl.int64)
    e = tl.arange(0, BLOCK_Q)
    inside = e < Q
    real = e < K1
    kept = real & (e <= acc)
    tok = tl.load(out_ptr + b * stride_out_b + e * stride_out_e, mask=kept, other=0).to(tl.int64)
    tok = tl.where(kept, tok, mask_token_id)
    pos = base + tl.where(real, e, acc + 1 + e - K1)
    blk = tl.load(bt_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=inside, other=0).to(tl.int64)
    slot = tl.where(real & (e > acc), -1, blk * BLOCK_SIZE + pos % BLOCK_SIZE)
    tl.store(tokens_ptr + b * Q + e, tok, mask=inside)
    tl.store(pos_ptr + b * Q + e, pos, mask=inside)
    tl.store(slot_ptr + b * Q + e, slot, mask=inside)
    tl.store(seq_lens_ptr + b, (base + acc + 1 + NUM_MASK).to(tl.int32))
    r = tl.arange(0, BLOCK_R)
    row = b * Q + tl.where(r == 0, acc, K1 + r - 1)
    tl.store(rows_ptr + b * (1 + NUM_MASK) + r, row, mask=r < 1 + NUM_MASK)


def draft_inputs_triton(out_tokens: torch.Tensor, num_accepted: torch.Tensor, base: torch.Tensor,
                        block_tables: torch.Tensor, block_size: int, num_mask: int,
                        mask_token_id: int) -> DraftInputs:
    """Triton twin of :func:`draft_inputs_ref`; no host synchronisation. Inputs may be
    strided views (``base`` is typically every (K+1)-th fed position)."""
    b, k1 = out_tokens.shape
    q = k1 + num_mask
    dev = out_tokens.device
    res = DraftInputs(torch.empty(b * q, dtype=torch.int64, device=dev), torch.empty(b * q, dtype=torch.int64, device=dev),
                      torch.empty(b * q, dtype=torch.int64, device=dev), torch.empty(b, dtype=torch.int32, device=dev),
                      torch.empty(b * (1 + num_mask), dtype=torch.int64, device=dev))
    if b == 0:
        return res
    _draft_inputs_kernel[(b,)](
        out_tokens, num_accepted, base, block_tables, res.tokens, res.positions, res.slot_mapping, res.seq_lens,
        res.sample_rows, out_tokens.stride(0), out_tokens.stride(1), num_accepted.stride(0), base.stride(0),
        block_tables.stride(0), mask_token_id,
        K1=k1, NUM_MASK=num_mask, BLOCK_SIZE=block_size, BLOCK_Q=triton.next_power_of_2(q),
        BLOCK_R=triton.next_power_of_2(1 + num_mask), num_warps=1)
    return res


def draft_inputs(*args, **kwargs) -> DraftInputs:
    """Triton on CUDA tensors, the reference elsewhere."""
    return (draft_inputs_triton if args[0].is_cuda else draft_inputs_ref)(*args, **kwargs)
