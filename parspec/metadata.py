"""Per-step attention metadata.

* Prefill (any query lengths): built from the block tables on the host and copied to the
  device in one go (``build_attention_metadata``).
* Decode / verification (``Q`` query tokens per sequence at positions ``base .. base+Q-1``):
  built on the device from the per-sequence base position and the block tables by one
  kernel (``decode_metadata``), so a step needs no host-built per-token lists and the
  whole forward can be a CUDA graph. ``decode_metadata_ref`` is its torch reference.
* A decode part and context chunks in one forward: the two joined (``concat_metadata``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from parspec.attention import AttentionMetadata
from parspec.transfer import to_device


def build_attention_metadata(block_tables: list[list[int]], starts: list[int], q_lens: list[int],
                             block_size: int, device) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions and metadata for sequences whose new tokens occupy positions
    ``starts[b] .. starts[b] + q_lens[b] - 1`` (earlier positions are already cached)."""
    positions, slots, cu = [], [], [0]
    for table, start, q_len in zip(block_tables, starts, q_lens):
        for p in range(start, start + q_len):
            positions.append(p)
            slots.append(table[p // block_size] * block_size + p % block_size)
        cu.append(cu[-1] + q_len)
    seq_lens = [s + q for s, q in zip(starts, q_lens)]
    width = max(len(t) for t in block_tables)
    tables = [t + [0] * (width - len(t)) for t in block_tables]
    device = torch.device(device)
    meta = AttentionMetadata(
        slot_mapping=to_device(slots, torch.int64, device),
        query_start_loc=to_device(cu, torch.int32, device),
        seq_lens=to_device(seq_lens, torch.int32, device),
        block_tables=to_device(tables, torch.int32, device),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
    )
    return to_device(positions, torch.int64, device), meta


def concat_metadata(first: AttentionMetadata, second: AttentionMetadata) -> AttentionMetadata:
    """``first``'s sequences followed by ``second``'s as one batch (a step's decode rows and
    its context chunks in one forward), joined on the device without a host sync."""
    if first.query_positions is not None or second.query_positions is not None:
        raise ValueError("concat_metadata joins plain causal batches (query_positions unset)")
    width = max(first.block_tables.shape[1], second.block_tables.shape[1])
    tables = [torch.nn.functional.pad(m.block_tables, (0, width - m.block_tables.shape[1])) for m in (first, second)]
    return AttentionMetadata(
        slot_mapping=torch.cat([first.slot_mapping, second.slot_mapping]),
        query_start_loc=torch.cat([first.query_start_loc, second.query_start_loc[1:] + first.query_start_loc[-1]]),
        seq_lens=torch.cat([first.seq_lens, second.seq_lens]),
        block_tables=torch.cat(tables),
        max_query_len=max(first.max_query_len, second.max_query_len),
        max_seq_len=max(first.max_seq_len, second.max_seq_len),
    )


def slots_of(block_tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots of ``positions`` [B, n] through each row's block table [B, W]."""
    blocks = block_tables.long().gather(1, positions // block_size)
    return blocks * block_size + positions % block_size


def decode_metadata_ref(base: torch.Tensor, block_tables: torch.Tensor, q_len: int,
                        block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``base`` [B] int64, ``block_tables`` [B, W] int32 -> positions [B*Q] int64,
    slot_mapping [B*Q] int64, seq_lens [B] int32 for Q queries at ``base .. base+Q-1``."""
    positions = base.long()[:, None] + torch.arange(q_len, device=base.device)
    slots = slots_of(block_tables, positions, block_size)
    return positions.flatten(), slots.flatten(), (base + q_len).to(torch.int32)


# stride_bt is the width of the block tables: fixed for the runner's static buffers, but a
# host-built batch (a drafter drafting after a prefill) is as wide as its longest sequence.
@triton.jit(do_not_specialize=["stride_bt"])
def _decode_metadata_kernel(base_ptr, bt_ptr, pos_ptr, slot_ptr, seq_lens_ptr, stride_bt,
                            Q: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = tl.load(base_ptr + b).to(tl.int64)
    e = tl.arange(0, BLOCK_Q)
    inside = e < Q
    pos = base + e
    blk = tl.load(bt_ptr + b * stride_bt + pos // BLOCK_SIZE, mask=inside, other=0).to(tl.int64)
    tl.store(pos_ptr + b * Q + e, pos, mask=inside)
    tl.store(slot_ptr + b * Q + e, blk * BLOCK_SIZE + pos % BLOCK_SIZE, mask=inside)
    tl.store(seq_lens_ptr + b, (base + Q).to(tl.int32))


def decode_metadata_triton(base: torch.Tensor, block_tables: torch.Tensor, q_len: int,
                           block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`decode_metadata_ref`: one launch, one program per sequence."""
    b = base.shape[0]
    dev = base.device
    positions = torch.empty(b * q_len, dtype=torch.int64, device=dev)
    slots = torch.empty(b * q_len, dtype=torch.int64, device=dev)
    seq_lens = torch.empty(b, dtype=torch.int32, device=dev)
    if b:
        assert base.is_contiguous()
        _decode_metadata_kernel[(b,)](base, block_tables, positions, slots, seq_lens, block_tables.stride(0),
                                      Q=q_len, BLOCK_SIZE=block_size, BLOCK_Q=triton.next_power_of_2(q_len),
                                      num_warps=1)
    return positions, slots, seq_lens


def decode_metadata(base: torch.Tensor, block_tables: torch.Tensor, q_len: int, block_size: int,
                    max_seq_len: int) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions and attention metadata of a decode/verify step, built on the device.

    ``max_seq_len`` is a fixed bound (not this step's maximum): it only tunes the split-KV
    factor, and a fixed value keeps the launch shapes of a CUDA graph valid for any step."""
    fn = decode_metadata_triton if base.is_cuda else decode_metadata_ref
    positions, slots, seq_lens = fn(base, block_tables, q_len, block_size)
    b = base.shape[0]
    starts = torch.arange(0, (b + 1) * q_len, q_len, dtype=torch.int32, device=base.device)
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=starts, seq_lens=seq_lens,
                             block_tables=block_tables, max_query_len=q_len, max_seq_len=max_seq_len)
    return positions, meta
