"""The drafter's device-built step inputs: the torch reference against values worked out by
hand, and the Triton kernel (interpreter on CPU) against the reference."""

from __future__ import annotations

import os

import pytest
import torch

from parspec.speculative.draft_inputs import draft_inputs_ref, draft_inputs_triton

needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton needs a GPU or TRITON_INTERPRET=1")
DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
MASK = 99


def test_reference_by_hand():
    # K = 3 (4 fed tokens), 2 mask slots, block size 4. Sequence 0 accepted 1 draft from
    # position 5; sequence 1 accepted all 3 from position 2.
    out = torch.tensor([[10, 11, -1, -1], [20, 21, 22, 23]])
    acc = torch.tensor([1, 3], dtype=torch.int32)
    base = torch.tensor([5, 2])
    tables = torch.tensor([[7, 3, 9, 0], [4, 6, 0, 0]], dtype=torch.int32)
    got = draft_inputs_ref(out, acc, base, tables, 4, 2, MASK)
    assert got.tokens.tolist() == [10, 11, MASK, MASK, MASK, MASK, 20, 21, 22, 23, MASK, MASK]
    assert got.positions.tolist() == [5, 6, 7, 8, 7, 8, 2, 3, 4, 5, 6, 7]
    slot = lambda t, p: t[p // 4] * 4 + p % 4  # noqa: E731
    t0, t1 = [7, 3, 9, 0], [4, 6]
    assert got.slot_mapping.tolist() == [slot(t0, 5), slot(t0, 6), -1, -1, slot(t0, 7), slot(t0, 8),
                                         slot(t1, 2), slot(t1, 3), slot(t1, 4), slot(t1, 5), slot(t1, 6),
                                         slot(t1, 7)]
    assert got.seq_lens.tolist() == [9, 8]
    assert got.sample_rows.tolist() == [1, 4, 5, 6 + 3, 6 + 4, 6 + 5]


def _random_case(b, k, num_mask, block_size, seed):
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(0, k + 1, (b,), generator=g, dtype=torch.int32)
    acc[0], acc[-1] = 0, k  # both extremes
    base = torch.randint(0, 40, (b,), generator=g)
    width = (40 + 2 * k + block_size) // block_size + 1
    tables = torch.randint(1, 500, (b, width), generator=g, dtype=torch.int32)
    out = torch.randint(0, 1000, (b, k + 1), generator=g)
    out[torch.arange(k + 1)[None, :] > acc[:, None].long()] = -1  # the verifier's placeholder
    return out, acc, base, tables


@needs_interpreter
@pytest.mark.parametrize("b,k,num_mask,block_size", [(1, 1, 0, 16), (3, 3, 2, 4), (8, 7, 6, 16), (5, 7, 0, 8)])
def test_triton_matches_reference(b, k, num_mask, block_size):
    case = _random_case(b, k, num_mask, block_size, seed=b * 10 + k)
    ref = draft_inputs_ref(*case, block_size, num_mask, MASK)
    # As the engine passes them: base is every (K+1)-th fed position, a strided view; the
    # emitted tokens and counts are given as strided views too.
    out, acc, base, tables = (t.to(DEV) for t in case)
    fed = (base[:, None] + torch.arange(k + 1, device=DEV)).flatten()
    base = fed.view(b, k + 1)[:, 0]
    out = torch.cat([out, out], dim=1)[:, :k + 1]
    acc = torch.stack([acc, acc], dim=1)[:, 0]
    assert not (base.is_contiguous() or out.is_contiguous() or acc.is_contiguous()) or b == 1
    got = draft_inputs_triton(out, acc, base, tables, block_size, num_mask, MASK)
    for name in ("tokens", "positions", "slot_mapping", "seq_lens", "sample_rows"):
        assert torch.equal(getattr(got, name).cpu(), getattr(ref, name)), name
    # Mask slots follow the last accepted entry; nothing rejected is written.
    q = k + 1 + num_mask
    pos, slots = ref.positions.view(b, q), ref.slot_mapping.view(b, q)
    for i in range(b):
        a = int(case[1][i])
        assert pos[i, k + 1:].tolist() == list(range(int(case[2][i]) + a + 1, int(case[2][i]) + a + 1 + num_mask))
        assert (slots[i, a + 1:k + 1] == -1).all() and (slots[i, :a + 1] >= 0).all()
