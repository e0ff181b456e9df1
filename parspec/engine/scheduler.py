"""Continuous batching. Running sequences decode together; new requests are admitted as soon
as the cache has room for them; when the cache runs out the newest running sequence is
preempted (its blocks freed, recomputed later from its tokens).

With chunked prefill (vLLM's default) every step has a token budget,
``max_num_batched_tokens``: the running sequences decode first, K + 1 tokens each, and the
tokens left go to context chunks, those of partially prefilled sequences first, then those
of newly admitted ones. A partially prefilled sequence keeps its blocks (all allocated at
admission) and its ``num_cached``; the chunk that completes its context emits its first
token, and from the next step on it decodes. Decodes are never deferred for the budget, so
a running request gets tokens in every step whatever arrives. Without chunked prefill a
step either prefills whole prompts (first) or decodes, as before."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from parspec.kv_cache import BlockManager
from parspec.sequence import Sequence, Status
from parspec.step import PrefillChunks


@dataclass
class ScheduledBatch:
    """One step's work: the sequences that decode, and the context chunks (None: none)."""

    decode: list[Sequence]
    prefill: PrefillChunks | None = None


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 lookahead: int, prefill_lookahead: int = 0, on_preempt=lambda seq: None, *,
                 decode_tokens: int = 1, chunked_prefill: bool = False):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.lookahead = lookahead  # slots a decode step writes past the last token (K drafts, + the drafter's)
        self.prefill_lookahead = prefill_lookahead  # slots a prefill step writes past the prompt (the drafter's)
        self.decode_tokens = decode_tokens  # tokens a decode row feeds (K + 1), counted in the budget
        self.chunked_prefill = chunked_prefill
        self.on_preempt = on_preempt
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()  # admitted: decoding, or partially prefilled
        self._prefilling: set[int] = set()  # ids of running sequences whose context is not all cached yet
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def has_prefill_work(self) -> bool:
        """Whether a step must feed context chunks (a waiting or partially prefilled sequence)."""
        return bool(self.waiting or self._prefilling)

    def is_prefilling(self, seq: Sequence) -> bool:
        return seq.seq_id in self._prefilling

    def schedule(self) -> ScheduledBatch:
        if not self.chunked_prefill:
            whole = self._whole_prompts()
            return ScheduledBatch([], whole) if whole is not None else ScheduledBatch(self._decodes())
        preemptions = self.num_preemptions
        decode = self._decodes()
        budget = self.max_num_batched_tokens - len(decode) * self.decode_tokens
        # vLLM's rule: a step that had to preempt admits nobody (the freed blocks went to decodes).
        return ScheduledBatch(decode, self._chunks(budget, admit=self.num_preemptions == preemptions))

    def _whole_prompts(self) -> PrefillChunks | None:
        """Without chunking: admit waiting sequences while the budget allows (the first always)."""
        batch, lens, num_tokens = [], [], 0
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            new_tokens = len(seq) - seq.num_cached
            if batch and num_tokens + new_tokens > self.max_num_batched_tokens:
                break
            if not self._admit(seq, alone=not batch and not self.running, chunked=False):
                break
            batch.append(seq)
            lens.append(new_tokens)
            num_tokens += new_tokens
        return PrefillChunks(batch, lens, len(batch)) if batch else None

    def _decodes(self) -> list[Sequence]:
        """Every running sequence past its prefill, grown for [last token + K drafts] (and the
        drafter's slots past them); when blocks run out the newest running sequence is
        preempted, possibly the one at hand."""
        scheduled = []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            i += 1
            if seq.seq_id in self._prefilling:
                continue
            need = len(seq) + seq.inflight + self.lookahead
            while seq.status == Status.RUNNING and not self.blocks.can_grow(seq.block_table, need):
                self.preempt(self.running[-1])  # newer than seq, or seq itself (then the loop ends)
            if seq.status == Status.RUNNING:
                self.blocks.grow(seq.seq_id, seq.block_table, need)
                scheduled.append(seq)
        return scheduled

    def _chunks(self, budget: int, admit: bool) -> PrefillChunks | None:
        """Context chunks in ``budget`` tokens: partially prefilled sequences first, then new
        ones from the waiting queue. The chunks that complete their context come first."""
        seqs, lens = [], []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.seq_id in self._prefilling:
                seqs.append(seq)
                lens.append(min(len(seq) - seq.num_cached, budget))
                budget -= lens[-1]
        while admit and budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq, alone=not self.running, chunked=True):
                break
            seqs.append(seq)
            lens.append(min(len(seq) - seq.num_cached, budget))
            budget -= lens[-1]
        if not seqs:
            return None
        done = [s.num_cached + n == len(s) for s, n in zip(seqs, lens)]
        for seq, completes in zip(seqs, done):
            if completes:
                self._prefilling.discard(seq.seq_id)  # from its next step on it decodes
        order = sorted(range(len(seqs)), key=lambda i: not done[i])  # stable: completing chunks first
        return PrefillChunks([seqs[i] for i in order], [lens[i] for i in order], sum(done))

    def _admit(self, seq: Sequence, alone: bool, chunked: bool) -> bool:
        """Move the head of the waiting queue to running if the cache has room for its context
        and one decode step after it; its blocks are all allocated now, so its chunks never
        wait for memory. ``alone``: nothing else could free blocks, so no room is an error."""
        if not self.blocks.can_grow(seq.block_table, len(seq) + self.lookahead):
            if alone:
                raise RuntimeError(f"the KV cache ({self.blocks.num_blocks} blocks of {self.blocks.block_size}) "
                                   f"cannot hold one sequence of {len(seq) + self.lookahead} tokens; "
                                   "give it more memory")
            return False
        self.blocks.grow(seq.seq_id, seq.block_table, len(seq) + self.prefill_lookahead)
        self.waiting.popleft()
        seq.status = Status.RUNNING
        self.running.append(seq)
        if chunked:
            self._prefilling.add(seq.seq_id)
        return True

    def preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self._prefilling.discard(seq.seq_id)
        self.blocks.free(seq.seq_id, seq.block_table)
        seq.num_cached = 0
        seq.status = Status.WAITING
        self.on_preempt(seq)
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        self.blocks.free(seq.seq_id, seq.block_table)
        self.running.remove(seq)
        self._prefilling.discard(seq.seq_id)
