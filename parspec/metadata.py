"""Per-step attention metadata built from the sequences' block tables on the host,
then copied to the device in one go."""

from __future__ import annotations

import torch

from parspec.attention import AttentionMetadata


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
    as_tensor = lambda x, dt: torch.tensor(x, dtype=dt, device="cpu").to(device, non_blocking=True)  # noqa: E731
    meta = AttentionMetadata(
        slot_mapping=as_tensor(slots, torch.int64),
        query_start_loc=as_tensor(cu, torch.int32),
        seq_lens=as_tensor(seq_lens, torch.int32),
        block_tables=as_tensor(tables, torch.int32),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
    )
    return as_tensor(positions, torch.int64), meta
