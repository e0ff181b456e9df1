"""A request's state as it moves through the engine, and what it returns."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from parspec.sampling import SamplingParams


@dataclass
class DraftState:
    """A proposer's per-sequence state (typed fields; each proposer uses its own)."""

    batch: int | None = None  # EAGLE-3: the drafting batch that holds this sequence's next drafts
    row: int = 0  # EAGLE-3: the sequence's row in that batch
    cached: int = 0  # draft LM: leading tokens whose K/V are in the draft model's cache
    fed_until: int = 0  # draft LM: positions its last drafting wrote up to


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_ids = itertools.count()


@dataclass
class SpecStats:
    """Speculation counters of one request (or summed over many), counted as vLLM counts them
    (vllm/v1/spec_decode/metrics.py): a draft is one request's proposal in one step, and a
    step that proposed nothing is not a draft."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = field(default_factory=list)  # how often draft i was accepted

    def record(self, num_draft_tokens: int, num_accepted_tokens: int) -> None:
        if num_draft_tokens == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted_tokens
        per_pos = self.num_accepted_tokens_per_pos
        per_pos.extend([0] * (num_draft_tokens - len(per_pos)))
        for i in range(num_accepted_tokens):
            per_pos[i] += 1

    def merge(self, other: SpecStats) -> None:
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        mine, theirs = self.num_accepted_tokens_per_pos, other.num_accepted_tokens_per_pos
        mine.extend([0] * (len(theirs) - len(mine)))
        for i, n in enumerate(theirs):
            mine[i] += n

    # The names parspec used before; same counters.
    num_steps = property(lambda self: self.num_drafts)
    num_drafted = property(lambda self: self.num_draft_tokens)
    num_accepted = property(lambda self: self.num_accepted_tokens)

    @property
    def acceptance_length(self) -> float:
        """vLLM's mean acceptance length: 1 + accepted / drafts (the 1 is the target's own token)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        """Accepted at position i / drafts, as vLLM reports it."""
        return [a / self.num_drafts for a in self.num_accepted_tokens_per_pos] if self.num_drafts else []

    def as_dict(self) -> dict:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "num_accepted_tokens_per_pos": list(self.num_accepted_tokens_per_pos),
                "acceptance_length": self.acceptance_length,
                "acceptance_rate_per_position": self.acceptance_rate_per_position}


class Sequence:
    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 prompt: str | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = Status.WAITING
        self.num_cached = 0  # leading tokens whose K/V are in the cache
        self.inflight = 0  # tokens a launched, not yet read step may still add (an upper bound)
        self.block_table: list[int] = []
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.text = ""
        self.spec = SpecStats()
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.draft = DraftState()

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    time_to_first_token: float | None
    latency: float | None


@dataclass
class RequestOutput:
    """What generate() returns per prompt, in vLLM's shape, plus speculation stats."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    spec_stats: dict = field(default_factory=dict)  # empty without speculation

    @classmethod
    def from_sequence(cls, seq: Sequence, speculative: bool) -> RequestOutput:
        ttft = seq.first_token_time - seq.arrival_time if seq.first_token_time else None
        latency = seq.finish_time - seq.arrival_time if seq.finish_time else None
        return cls(
            request_id=seq.request_id,
            prompt=seq.prompt,
            prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
            outputs=[CompletionOutput(0, seq.text, seq.output_token_ids, seq.finish_reason, seq.stop_reason)],
            finished=seq.is_finished,
            metrics=RequestMetrics(seq.arrival_time, seq.first_token_time, seq.finish_time, ttft, latency),
            spec_stats=seq.spec.as_dict() if speculative else {},
        )
