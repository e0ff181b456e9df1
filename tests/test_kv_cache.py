"""Block manager invariants: no leak, no double use, rollback frees exactly the tail."""

from __future__ import annotations

import random

import pytest

from parspec.kv_cache import BlockManager, OutOfBlocks


def _check(bm: BlockManager, tables: dict[int, list[int]]) -> None:
    used = [b for t in tables.values() for b in t]
    assert len(used) == len(set(used)), "a block is used twice"
    assert set(used).isdisjoint(bm._free), "a used block is also free"
    assert len(used) + bm.num_free_blocks == bm.num_blocks, "blocks leaked"


def test_grow_shrink_free_random_walk():
    rng = random.Random(0)
    bm = BlockManager(64, 4)
    tables: dict[int, list[int]] = {}
    lens: dict[int, int] = {}
    for _ in range(2000):
        sid = rng.randrange(8)
        table = tables.setdefault(sid, [])
        action = rng.random()
        if action < 0.5:
            new_len = lens.get(sid, 0) + rng.randint(1, 9)
            if bm.can_grow(table, new_len):
                bm.grow(sid, table, new_len)
                lens[sid] = new_len
            else:
                with pytest.raises(OutOfBlocks):
                    bm.grow(sid, table, new_len)
        elif action < 0.9:
            new_len = rng.randint(0, lens.get(sid, 0))
            bm.shrink(sid, table, new_len)
            lens[sid] = new_len
        else:
            bm.free(sid, table)
            lens[sid] = 0
        assert len(table) == bm.blocks_for(lens.get(sid, 0))
        _check(bm, tables)
    for sid, table in tables.items():
        bm.free(sid, table)
    assert bm.num_free_blocks == bm.num_blocks


def test_rollback_keeps_blocks_holding_kept_slots():
    bm = BlockManager(10, 4)
    table: list[int] = []
    bm.grow(1, table, 13)  # 4 blocks
    assert len(table) == 4
    bm.shrink(1, table, 9)  # slots 0..8 live in 3 blocks
    assert len(table) == 3 and bm.num_free_blocks == 7
    bm.shrink(1, table, 8)
    assert len(table) == 2


def test_release_by_wrong_owner_is_caught():
    bm = BlockManager(4, 4)
    a: list[int] = []
    bm.grow(1, a, 4)
    with pytest.raises(RuntimeError, match="owned by 1"):
        bm.free(2, list(a))
