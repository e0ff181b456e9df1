"""The decode/verify metadata built on the device (``decode_metadata``): the Triton kernel
equals its torch reference, and both equal the host-built metadata of the same positions."""

from __future__ import annotations

import os

import pytest
import torch

from parspec.metadata import (build_attention_metadata, decode_metadata, decode_metadata_ref,
                              decode_metadata_triton, slots_of)

needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="the Triton kernel on CPU needs TRITON_INTERPRET=1")


def _case(batch: int, q_len: int, block_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    width = 6
    tables = torch.stack([torch.randperm(64, generator=g)[:width] for _ in range(batch)]).to(torch.int32)
    base = torch.randint(0, width * block_size - q_len, (batch,), generator=g, dtype=torch.int64)
    return base, tables


def test_reference_on_a_hand_worked_case():
    tables = torch.tensor([[7, 3, 9], [2, 5, 0]], dtype=torch.int32)
    positions, slots, seq_lens = decode_metadata_ref(torch.tensor([2, 7]), tables, 3, 4)
    assert positions.tolist() == [2, 3, 4, 7, 8, 9]
    # block 7 slots 28.., block 3 slots 12..; row 2: position 7 -> block 5 (20 + 3), 8, 9 -> block 0
    assert slots.tolist() == [30, 31, 12, 23, 0, 1]
    assert seq_lens.tolist() == [5, 10]


@needs_interpreter
@pytest.mark.parametrize("batch,q_len,block_size", [(1, 1, 16), (3, 8, 4), (5, 2, 16), (4, 5, 8)])
def test_triton_equals_reference(batch, q_len, block_size):
    base, tables = _case(batch, q_len, block_size, seed=batch * 10 + q_len)
    wide = torch.cat([tables, torch.full_like(tables, -7)], dim=1)[:, :tables.shape[1]]  # a strided row view
    for t in (tables, wide):
        ref = decode_metadata_ref(base, t, q_len, block_size)
        got = decode_metadata_triton(base, t, q_len, block_size)
        for r, g in zip(ref, got):
            assert r.dtype == g.dtype and torch.equal(r, g)


def test_equals_host_built_metadata():
    """The same sequences' positions through the host path give the same metadata."""
    base, tables = _case(4, 3, 8, seed=3)
    positions, meta = decode_metadata(base, tables, 3, 8, max_seq_len=999)
    host_positions, host = build_attention_metadata(tables.tolist(), base.tolist(), [3] * 4, 8, "cpu")
    assert torch.equal(positions, host_positions)
    assert torch.equal(meta.slot_mapping, host.slot_mapping)
    assert torch.equal(meta.seq_lens, host.seq_lens) and torch.equal(meta.query_start_loc, host.query_start_loc)
    assert meta.max_query_len == 3 and meta.max_seq_len == 999
    assert torch.equal(slots_of(tables, positions.view(4, 3), 8).flatten(), meta.slot_mapping)
