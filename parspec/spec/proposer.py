"""The one interface every drafting method implements.

A proposer turns the running batch into draft tokens; it never sees how they are
verified. It may keep per-sequence state in ``seq.draft_state`` and its own KV layers,
indexed by the sequences' shared block tables (the engine grows and rolls them back)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from parspec.kv_cache import allocate_kv_cache, bind_kv_cache, kv_bytes_per_block
from parspec.sampling import BatchSampling, probs_from_logits
from parspec.spec.verify import draw_verification_noise

if TYPE_CHECKING:
    from parspec.engine.model_runner import StepOutput
    from parspec.engine.sequence import Sequence


@dataclass
class Proposal:
    draft_tokens: torch.Tensor  # [B, K] int64 target-vocabulary ids; entries past num_drafts unused
    num_drafts: torch.Tensor  # [B] int32, 0..K
    num_drafts_host: list[int]  # the same counts on the host, for statistics
    draft_probs: torch.Tensor | None = None  # [B, K, V] float32; None = deterministic drafts
    drafter_passes: int = 0  # drafter forward passes this step (1 for parallel drafting)

    @classmethod
    def full(cls, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, drafter_passes: int) -> Proposal:
        """Every row drafted all K tokens."""
        b, k = draft_tokens.shape
        return cls(draft_tokens, torch.full((b,), k, dtype=torch.int32, device=draft_tokens.device), [k] * b,
                   draft_probs, drafter_passes)


def sample_drafts(logits: torch.Tensor, sampling: BatchSampling, seqs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draft logits ``[B, ..., V]`` -> draft ids ``[B, ...]`` and q (None when every row is greedy).

    Sampled rows draw from q with the exponential race (argmax q / Exp(1)) on each request's
    generator; greedy rows are one-hot in q, so the race returns their argmax."""
    if sampling.all_greedy:
        return logits.argmax(dim=-1), None
    q = probs_from_logits(logits, sampling)
    _, noise = draw_verification_noise(q.shape[0], 0, q[0].numel(), [s.generator for s in seqs], q.device)
    return (q / noise.view(q.shape)).argmax(dim=-1), q


class Proposer:
    """Base class: subclasses override propose() and, if they keep state, the observers."""

    # Target layers whose input hidden states the proposer reads (EAGLE-3, SPD); () for none.
    aux_layers: tuple[int, ...] = ()
    # KV slots the proposer writes past what the target's step holds (prefill or decode).
    extra_slots: int = 0

    def __init__(self, num_speculative_tokens: int):
        self.k = num_speculative_tokens

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes of the proposer's own KV layers per cache block (counted in the cache budget)."""
        return 0

    def allocate(self, num_blocks: int, block_size: int) -> None:
        """Allocate the proposer's own KV layers, sized like the target's cache."""

    def propose(self, seqs: list[Sequence]) -> Proposal:
        raise NotImplementedError

    def after_verify(self, seqs: list[Sequence], step: StepOutput, prefill: bool) -> None:
        """Called after every target step's verification, BEFORE the host reads its result:
        only the step's device tensors are there (a proposer may draft the next step now)."""

    def observe(self, seqs: list[Sequence], step: StepOutput, prefill: bool) -> None:
        """Called after every target step, before the sequences advance, with what
        verification emitted (and the target's features of the fed tokens, if asked for)."""

    def release(self, seq: Sequence) -> None:
        """The sequence finished or was preempted; drop its state."""
        seq.draft_state.clear()


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
        self.kv_cache = allocate_kv_cache(c.num_hidden_layers, num_blocks, block_size, c.num_key_value_heads,
                                          c.head_dim, self.dtype, self.device)
        bind_kv_cache(self.model.attention_layers, self.kv_cache)
