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
    """Speculation counters of one request (or summed over many)."""

    num_steps: int = 0  # target forwards after prefill
    num_drafted: int = 0
    num_accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # how often draft i was accepted
    drafted_per_position: list[int] = field(default_factory=list)

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_steps += 1
        self.num_drafted += num_drafts
        self.num_accepted += num_accepted
        for stats, count in ((self.drafted_per_position, num_drafts), (self.accepted_per_position, num_accepted)):
            if len(stats) < num_drafts:
                stats.extend([0] * (num_drafts - len(stats)))
            for i in range(count):
                stats[i] += 1

    def merge(self, other: SpecStats) -> None:
        self.num_steps += other.num_steps
        self.num_drafted += other.num_drafted
        self.num_accepted += other.num_accepted
        for mine, theirs in ((self.drafted_per_position, other.drafted_per_position),
                             (self.accepted_per_position, other.accepted_per_position)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, n in enumerate(theirs):
                mine[i] += n

    @property
    def acceptance_length(self) -> float:
        """Mean tokens emitted per target step (accepted drafts + the one the target adds)."""
        return (self.num_accepted + self.num_steps) / self.num_steps if self.num_steps else 0.0

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    def as_dict(self) -> dict:
        return {"num_steps": self.num_steps, "num_drafted": self.num_drafted,
                "num_accepted": self.num_accepted, "acceptance_length": self.acceptance_length,
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
