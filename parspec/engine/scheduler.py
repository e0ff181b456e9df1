"""Continuous batching: new requests are prefilled as soon as blocks allow, running ones
decode together; when the cache runs out the newest running sequence is preempted
(its blocks freed, recomputed later from its tokens)."""

from __future__ import annotations

from collections import deque

from parspec.sequence import Sequence, Status
from parspec.kv_cache import BlockManager


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 lookahead: int, prefill_lookahead: int = 0, on_preempt=lambda seq: None):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.lookahead = lookahead  # slots a decode step writes past the last token (K drafts, + the drafter's)
        self.prefill_lookahead = prefill_lookahead  # slots a prefill step writes past the prompt (the drafter's)
        self.on_preempt = on_preempt
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns the sequences to run and whether this is a prefill step."""
        batch, num_tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            new_tokens = len(seq) - seq.num_cached
            if batch and num_tokens + new_tokens > self.max_num_batched_tokens:
                break
            # Admit only with room for the prompt and one decode step after it.
            if not self.blocks.can_grow(seq.block_table, len(seq) + self.lookahead):
                if not batch and not self.running:
                    raise RuntimeError(f"the KV cache ({self.blocks.num_blocks} blocks of "
                                       f"{self.blocks.block_size}) cannot hold one sequence of "
                                       f"{len(seq) + self.lookahead} tokens; give it more memory")
                break
            self.blocks.grow(seq.seq_id, seq.block_table, len(seq) + self.prefill_lookahead)
            self.waiting.popleft()
            seq.status = Status.RUNNING
            batch.append(seq)
            num_tokens += new_tokens
        if batch:
            self.running.extend(batch)
            return batch, True

        scheduled = []
        while self.running:
            seq = self.running.popleft()
            # The step feeds the last token and K drafts: positions len-1 .. len-1+K (and the
            # drafter may write up to lookahead - K further).
            while not self.blocks.can_grow(seq.block_table, len(seq) + seq.inflight + self.lookahead):
                victim = self.running.pop() if self.running else seq
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.seq_id, seq.block_table, len(seq) + seq.inflight + self.lookahead)
                scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled, False

    def preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.blocks.free(seq.seq_id, seq.block_table)
        seq.num_cached = 0
        seq.status = Status.WAITING
        self.on_preempt(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id, seq.block_table)
        self.running.remove(seq)
