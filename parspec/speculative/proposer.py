"""The one interface every drafting method implements.

A proposer is built from a ``TargetView`` (what it may know of the target) and turns the
running batch into draft tokens; it never sees how they are verified. It keeps its
per-sequence state in ``seq.draft`` (a ``DraftState``) and may own paged KV layers
indexed by the sequences' shared block tables (the engine grows and rolls them back)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from parspec.config import ModelConfig
from parspec.cuda_graphs import GraphCache, shared_pool
from parspec.kv_cache import allocate_kv_cache, bind_kv_cache, kv_bytes_per_block
from parspec.sampling import BatchSampling, probs_from_logits
from parspec.sequence import DraftState
from parspec.speculative.verify import draw_verification_noise
from parspec.step import Proposal
from parspec.transfer import to_device

if TYPE_CHECKING:
    from parspec.sequence import Sequence
    from parspec.step import StepOutput


@dataclass(frozen=True)
class TargetView:
    """What a proposer is told about the target, once, at construction."""

    config: ModelConfig
    model_dir: str
    device: torch.device
    dtype: torch.dtype
    embed_tokens: nn.Embedding  # shared with drafters that have none of their own
    max_model_len: int
    max_num_seqs: int
    use_cuda_graphs: bool


def sample_drafts(logits: torch.Tensor, sampling: BatchSampling | None,
                  generators: list | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft logits ``[B, ..., V]`` -> draft ids ``[B, ...]`` and q (None when every row is greedy;
    ``sampling`` None means all greedy).

    Sampled rows draw from q with the exponential race (argmax q / Exp(1)) on each request's
    generator; greedy rows are one-hot in q, so the race returns their argmax."""
    if sampling is None or sampling.all_greedy:
        return logits.argmax(dim=-1), None
    q = probs_from_logits(logits, sampling)
    _, noise = draw_verification_noise(q.shape[0], 0, q[0].numel(), generators, q.device)
    return (q / noise.view(q.shape)).argmax(dim=-1), q


def padded_generators(seqs: list[Sequence], rows: int) -> list:
    return [s.generator for s in seqs] + [None] * (rows - len(seqs))


class Proposer:
    """Base class: subclasses override propose() and, if they keep state, the observers."""

    # Target layers whose input hidden states the proposer reads (EAGLE-3, SPD); () for none.
    aux_layers: tuple[int, ...] = ()
    # KV slots the proposer writes past what the target's step holds (prefill or decode).
    extra_slots: int = 0
    # Drafts are made on the device from the step's result (the engine may then launch the
    # next step before reading this one); False when drafting needs the host's tokens.
    drafts_on_device: bool = False

    def __init__(self, num_speculative_tokens: int):
        self.k = num_speculative_tokens

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes of the proposer's own KV layers per cache block (counted in the cache budget)."""
        return 0

    def allocate(self, num_blocks: int, block_size: int) -> None:
        """Allocate the proposer's own KV layers, sized like the target's cache (+ its pad block)."""

    def propose(self, seqs: list[Sequence]) -> Proposal:
        raise NotImplementedError

    def after_verify(self, seqs: list[Sequence], step: StepOutput, prefill: bool) -> None:
        """Called after every target step's verification, BEFORE the host reads its result:
        only the step's device tensors are there (a proposer may draft the next step now).
        A step with context chunks calls it for its decode rows (``prefill`` False, if it has
        any), then for its chunks (``prefill`` True: ``seqs`` are the chunks' sequences,
        ``step.chunk_lens`` their lengths, the first ``step.num_seqs`` completed their context)."""

    def observe(self, seqs: list[Sequence], step: StepOutput, prefill: bool) -> None:
        """Called after every target step, before the sequences advance, with what
        verification emitted (and the target's features of the fed tokens, if asked for);
        for a step with context chunks, as ``after_verify`` is."""

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was preempted; drop its state."""
        seq.draft = DraftState()


class ModelProposer(Proposer):
    """A proposer that runs a model of its own (``self.model`` with ``config`` fields
    num_hidden_layers / num_key_value_heads / head_dim) with paged KV layers laid out
    like the target's and indexed by the same block tables."""

    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype

    def kv_bytes_per_block(self, block_size: int) -> int:
        c = self.model.config
        return kv_bytes_per_block(c.num_hidden_layers, block_size, c.num_key_value_heads, c.head_dim, self.dtype)

    def allocate(self, num_blocks: int, block_size: int) -> None:
        c = self.model.config
        self.block_size = block_size
        self.kv_cache = allocate_kv_cache(c.num_hidden_layers, num_blocks + 1, block_size, c.num_key_value_heads,
                                          c.head_dim, self.dtype, self.device)
        bind_kv_cache(self.model.attention_layers, self.kv_cache)


class AfterVerifyDrafter(ModelProposer):
    """Drafts the next step right after verification, from the step's device tensors, before
    the host has read them; the drafts wait on the device and ``propose`` only gathers them.

    A decode step's drafting reads static buffers (the step's tensors are copied in, device
    to device), so for a greedy batch it is one CUDA graph per batch bucket; sampled batches
    run the same code eagerly (per-request generators). Subclasses implement
    ``prefill_drafts`` and ``decode_drafts``; ``staged`` names the StepOutput fields the
    latter reads (``self.staged_input(name, rows)``)."""

    staged: tuple[str, ...] = ()
    drafter_passes: int = 1
    drafts_on_device = True

    def __init__(self, num_speculative_tokens: int, target: TargetView):
        super().__init__(num_speculative_tokens)
        self.device, self.dtype = target.device, target.dtype
        self.max_rows = target.max_num_seqs  # the largest batch (bucket) a step can have
        self.block_size = None
        # Drafts waiting for the next step, per drafting batch: id -> [drafts, probs, live sequences].
        self._ready: dict[int, list] = {}
        self._next_batch = 0
        self._static: dict[str, torch.Tensor] = {}
        self._query_starts: dict[tuple[int, int], torch.Tensor] = {}
        self.graphs = GraphCache(lambda rows: self.decode_drafts(rows, None, None)[0],
                                 enabled=target.use_cuda_graphs and self.device.type == "cuda",
                                 pool=shared_pool(self.device))

    # --- to implement -------------------------------------------------------------------------
    def prefill_drafts(self, seqs, step: StepOutput, sampling, generators):
        """After a step with context chunks (eager, host-built metadata): the drafter takes in
        every chunk (``step.chunk_lens[i]`` tokens of ``seqs[i]`` from its ``num_cached``) and
        drafts for the first ``step.num_seqs``, which completed their context; returns their
        drafts [B, K] (+ q or None), or (None, None) when none completed."""
        raise NotImplementedError

    def decode_drafts(self, rows: int, sampling, generators):
        """Drafts [rows, K] (+ q or None) after a decode step, from the staged inputs only."""
        raise NotImplementedError

    # --- the next step's drafts are ready on the device ---------------------------------------
    def propose(self, seqs) -> Proposal:
        where = []
        for seq in seqs:
            if seq.draft.batch is None:
                raise RuntimeError(f"sequence {seq.seq_id} reached the drafter without drafts "
                                   "(after_verify() was not called after its last target step)")
            where.append((seq.draft.batch, seq.draft.row))
            seq.draft.batch = None
        batches = list(dict.fromkeys(b for b, _ in where))  # those referenced, in order
        first = self._ready[batches[0]]
        if len(batches) == 1 and [r for _, r in where] == list(range(len(seqs))):
            drafts, probs = first[0], first[1]  # the same sequences as last step (maybe fewer at the end)
        else:  # sequences drafted in different steps (prefills, then decodes), or some finished
            offsets, at = {}, 0
            for b in batches:
                offsets[b] = at
                at += self._ready[b][0].shape[0]
            index = to_device([offsets[b] + r for b, r in where], torch.int64, self.device)
            drafts = torch.cat([self._ready[b][0] for b in batches]).index_select(0, index)
            probs = None
            if any(self._ready[b][1] is not None for b in batches):
                vocab = next(p.shape[-1] for _, p, _ in self._ready.values() if p is not None)
                probs = torch.cat([p if p is not None else torch.nn.functional.one_hot(d, vocab).float()
                                   for d, p, _ in (self._ready[b] for b in batches)]).index_select(0, index)
        self._ready.clear()  # every decoding sequence is in this step (or was released)
        return Proposal.full(drafts, probs, self.drafter_passes, num_seqs=len(seqs))

    def release(self, seq) -> None:
        """A finished or preempted sequence no longer needs its drafts; a batch of drafts
        nobody needs is dropped (its q can be large)."""
        b = seq.draft.batch
        if b in self._ready:
            entry = self._ready[b]
            entry[2] -= 1
            if entry[2] == 0:
                del self._ready[b]
        super().release(seq)

    # --- drafting, right after the target step ------------------------------------------------
    @torch.inference_mode()
    def after_verify(self, seqs, step, prefill: bool) -> None:
        """``prefill``: ``seqs`` fed context chunks (see ``prefill_drafts``); only those that
        completed their context get drafts for the next step."""
        sampling = step.sampling
        fed = step.output_tokens.shape[1]  # tokens the step fed per sequence (1 for a prefill)
        for seq in seqs:  # the furthest position this drafting may write must be in the block table
            last = len(seq) + seq.inflight - 1 + fed - 1 + self.extra_slots
            if last >= len(seq.block_table) * self.block_size:
                raise RuntimeError(f"sequence {seq.seq_id}: the drafter may write position {last} but its block "
                                   f"table holds {len(seq.block_table) * self.block_size} slots")
        if prefill:
            done = step.num_seqs
            drafts, probs = self.prefill_drafts(seqs, step, sampling, padded_generators(seqs[:done], done))
            seqs = seqs[:done]
            if not done:
                return
        else:
            rows = step.output_tokens.shape[0]
            self._stage(step, rows)
            if sampling.all_greedy:
                drafts, probs = self.graphs.run(rows), None
            else:
                drafts, probs = self.decode_drafts(rows, sampling, padded_generators(seqs, rows))
        batch = self._next_batch
        self._next_batch += 1
        self._ready[batch] = [drafts, probs, len(seqs)]
        for i, seq in enumerate(seqs):
            seq.draft.batch, seq.draft.row = batch, i

    def _stage(self, step, rows: int) -> None:
        """Copy the step's tensors the decode drafting reads into the static buffers."""
        for name in self.staged:
            src = getattr(step, name)
            if src is None:
                raise RuntimeError(f"{type(self).__name__} needs the step's {name}; the runner returned none")
            buf = self._static.get(name)
            if buf is None or buf.shape[1:] != src.shape[1:] or buf.shape[0] < src.shape[0]:
                if self.graphs.graphs:
                    raise RuntimeError(f"drafter input {name} changed shape after CUDA-graph capture: "
                                       f"{tuple(src.shape)}")
                per_row = src.shape[0] // rows
                buf = self._static[name] = torch.zeros(self.max_rows * per_row, *src.shape[1:], dtype=src.dtype,
                                                       device=self.device)
            buf[:src.shape[0]].copy_(src)

    def staged_input(self, name: str, rows: int) -> torch.Tensor:
        buf = self._static[name]
        return buf[:rows * (buf.shape[0] // self.max_rows)]

    def query_starts(self, b: int, q: int) -> torch.Tensor:
        """query_start_loc of B sequences of q queries each (cached per shape)."""
        key = (b, q)
        if key not in self._query_starts:
            self._query_starts[key] = torch.arange(0, (b + 1) * q, q, dtype=torch.int32, device=self.device)
        return self._query_starts[key]
