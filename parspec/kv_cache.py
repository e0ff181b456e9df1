"""Paged KV cache: fixed-size blocks handed out by a BlockManager.

A sequence owns a block table (list of block ids); slot ``p`` of the sequence lives at
``block_table[p // block_size] * block_size + p % block_size``. Speculation grows a
sequence by K+1 slots before the target's forward and rolls the rejected ones back
after verification. Every cache tensor in the engine (the target's, and a drafter's
own layers) is indexed by the same block ids, so one table serves them all."""

from __future__ import annotations

from collections import deque

import torch


class OutOfBlocks(RuntimeError):
    """The cache has too few free blocks for a request; the scheduler preempts or waits."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[int, int] = {}  # block id -> owning sequence id

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, num_slots: int) -> int:
        return (num_slots + self.block_size - 1) // self.block_size

    def can_grow(self, block_table: list[int], num_slots: int) -> bool:
        return self.blocks_for(num_slots) - len(block_table) <= len(self._free)

    def grow(self, seq_id: int, block_table: list[int], num_slots: int) -> None:
        """Extend ``block_table`` in place so it holds at least ``num_slots`` slots."""
        need = self.blocks_for(num_slots) - len(block_table)
        if need > len(self._free):
            raise OutOfBlocks(f"sequence {seq_id} needs {need} more KV blocks, {len(self._free)} free")
        for _ in range(need):
            block = self._free.popleft()
            self._owner[block] = seq_id
            block_table.append(block)

    def shrink(self, seq_id: int, block_table: list[int], num_slots: int) -> None:
        """Roll back: free the blocks that hold no slot below ``num_slots``."""
        keep = self.blocks_for(num_slots)
        while len(block_table) > keep:
            self._release(seq_id, block_table.pop())

    def free(self, seq_id: int, block_table: list[int]) -> None:
        while block_table:
            self._release(seq_id, block_table.pop())

    def _release(self, seq_id: int, block: int) -> None:
        owner = self._owner.pop(block, None)
        if owner != seq_id:
            raise RuntimeError(f"block {block} released by sequence {seq_id} but owned by {owner}")
        self._free.append(block)


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype) -> int:
    return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def allocate_kv_cache(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                      head_dim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """One tensor [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""
    return torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                       dtype=dtype, device=device)


def bind_kv_cache(attention_layers, kv_cache: torch.Tensor) -> None:
    if len(attention_layers) != kv_cache.shape[0]:
        raise ValueError(f"{len(attention_layers)} attention layers but a cache of {kv_cache.shape[0]}")
    for layer, cache in zip(attention_layers, kv_cache):
        layer.k_cache, layer.v_cache = cache[0], cache[1]


def num_kv_blocks(cfg, per_block: int, per_seq: int, device: torch.device, max_model_len: int,
                  reserved_bytes: int = 0) -> int:
    """KV blocks for an engine (``cfg``: an EngineConfig): ``num_kv_blocks`` if given, else what
    ``kv_cache_memory_bytes`` holds, else on a GPU what ``gpu_memory_utilization`` leaves free
    after 1 GiB for activations and ``reserved_bytes`` (weights still to load), at most
    ``max_num_seqs`` full sequences; 4 GiB on the CPU. ``per_seq``: blocks of one sequence."""
    if cfg.num_kv_blocks is not None:
        num = cfg.num_kv_blocks
    elif cfg.kv_cache_memory_bytes is not None:
        num = cfg.kv_cache_memory_bytes // per_block
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = free - (1 - cfg.gpu_memory_utilization) * total - (1 << 30) - reserved_bytes
        num = min(int(budget // per_block), per_seq * cfg.max_num_seqs)
    else:
        num = min((4 << 30) // per_block, per_seq * cfg.max_num_seqs)
    if num < per_seq:
        from parspec.config import ConfigError

        raise ConfigError(f"the KV cache holds {num} blocks of {cfg.block_size} tokens but one sequence of "
                          f"max_model_len={max_model_len} needs {per_seq}; lower max_model_len "
                          "or give the cache more memory")
    return num
