"""A request's state as it moves through the engine, and what it returns."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from parspec.detokenizer import CompletionText
from parspec.sampling import SamplingParams


@dataclass
class TokenLogprob:
    """One emitted token's log-probability under the target's distribution."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # the params.logprobs most likely (token_id, logprob), best first


@dataclass
class RequestDelta:
    """What one completion did since the last LLMEngine.pop_deltas(): the unit a server streams."""

    request_id: str
    index: int  # which of the request's n completions (0..n-1)
    new_token_ids: list[int]  # tokens emitted since the last delta of this completion
    new_text: str  # never half a UTF-8 character, never text past a stop string
    new_logprobs: list[TokenLogprob] | None  # aligned with new_token_ids when asked for
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_output_tokens: int  # tokens of this completion so far
    error: str | None = None  # the message when finish_reason == "error"


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
    """One completion of a request: a request with ``params.n`` > 1 has n of them, each with
    its ``index``, sharing the request_id and the prompt."""

    def __init__(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                 prompt: str | None = None, index: int = 0, tokenizer=None):
        self.seq_id = next(_ids)
        self.request_id = request_id if request_id is not None else str(self.seq_id)
        self.index = index
        self.prompt = prompt
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.status = Status.WAITING
        self.num_cached = 0  # leading tokens whose K/V are in the cache
        self.inflight = 0  # tokens a launched, not yet read step may still add (an upper bound)
        self.block_table: list[int] = []
        seed = self.seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.error: str | None = None  # the message when finish_reason == "error"
        self.text = ""  # the final text, set when the sequence finishes
        # The text as it is generated (None without a tokenizer).
        self.stream = None if tokenizer is None else CompletionText(
            tokenizer, params.skip_special_tokens, params.stop, params.include_stop_str_in_output)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self._sent_tokens = 0  # output tokens already handed out in deltas
        self.spec = SpecStats()
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.draft = DraftState()

    @property
    def seed(self) -> int | None:
        """vLLM's parallel sampling: completion i of a seeded request samples with seed + i
        (vllm/v1/engine/parallel_sampling.py), so completion 0 repeats the n=1 request."""
        return None if self.params.seed is None else self.params.seed + self.index

    def check_stop(self, token: int, eos_token_ids, max_model_len: int) -> tuple[str, str | int | None] | None:
        """Why this completion stops at ``token`` (just appended), as (finish_reason,
        stop_reason), or None; every engine asks this after each token it emits.

        vLLM's rules: no stop of any kind before min_tokens output tokens (a stop string must
        also end in text after them); an EOS or stop_token_ids token stays out of the text
        unless include_stop_str_in_output; a stop string cuts the text where it starts (where
        it ends with include_stop_str_in_output). The text grows by this token only, so the
        check costs O(new text + longest stop string), not O(output)."""
        p = self.params
        n = self.num_output_tokens
        reason = None
        if n >= p.min_tokens:
            if not p.ignore_eos and token in eos_token_ids:
                reason = ("stop", None)
            elif token in p.stop_token_ids:
                reason = ("stop", token)
        if self.stream is not None and (reason is None or p.include_stop_str_in_output):
            stop = self.stream.push(token, check_stops=reason is None and n > p.min_tokens)
            if stop is not None:
                return "stop", stop
        if reason is None and p.max_tokens is not None and n >= p.max_tokens:
            reason = ("length", None)
        if reason is None and len(self) >= max_model_len:
            reason = ("length", None)
        return reason

    def finalize_text(self, tokenizer) -> None:
        """The finished completion's text: the full decode of the output (less an EOS /
        stop_token_ids token unless include_stop_str_in_output), or the streamed text cut at
        a stop string."""
        if self.stream is None:
            return
        if self.finish_reason == "stop" and isinstance(self.stop_reason, str):
            final = self.stream.text
        else:
            ids = self.output_token_ids
            if self.finish_reason == "stop" and not self.params.include_stop_str_in_output:
                ids = ids[:-1]  # vLLM keeps the EOS / stop_token_ids token in token_ids, not in text
            final = tokenizer.decode(ids, self.params.skip_special_tokens)
        self.stream.settle(final)
        self.text = final

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def penalized_prompt(self) -> list[int]:
        """The prompt a repetition penalty reads (none without one, so nothing is copied)."""
        return self.token_ids[:self.num_prompt_tokens] if self.params.repetition_penalty != 1 else []

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def take_delta(self) -> RequestDelta:
        """What this completion did since the last call: new tokens, their text (what a stop
        string may still cut stays back until the end), logprobs and the finish."""
        sent, self._sent_tokens = self._sent_tokens, self.num_output_tokens
        finished = self.is_finished
        return RequestDelta(
            request_id=self.request_id, index=self.index,
            new_token_ids=self.token_ids[self.num_prompt_tokens + sent:],  # O(new tokens), not O(output)
            new_text=self.stream.take(finished) if self.stream is not None else "",
            new_logprobs=None if self.logprobs is None else self.logprobs[sent:],
            finished=finished, finish_reason=self.finish_reason, stop_reason=self.stop_reason,
            num_prompt_tokens=self.num_prompt_tokens, num_output_tokens=self._sent_tokens, error=self.error)

    def completion(self) -> CompletionOutput:
        return CompletionOutput(self.index, self.text, self.output_token_ids, self.finish_reason, self.stop_reason,
                                None if self.logprobs is None else list(self.logprobs))


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id when the request asked


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
    def from_sequences(cls, seqs: list[Sequence], speculative: bool) -> RequestOutput:
        """One request's output from its completions (all n of them, any order)."""
        seqs = sorted(seqs, key=lambda s: s.index)
        first = seqs[0]
        firsts = [s.first_token_time for s in seqs if s.first_token_time is not None]
        ends = [s.finish_time for s in seqs]
        first_token = min(firsts) if firsts else None
        finish = max(ends) if all(t is not None for t in ends) else None
        ttft = first_token - first.arrival_time if first_token else None
        latency = finish - first.arrival_time if finish else None
        stats = SpecStats()
        for s in seqs:
            stats.merge(s.spec)
        return cls(
            request_id=first.request_id,
            prompt=first.prompt,
            prompt_token_ids=first.token_ids[:first.num_prompt_tokens],
            outputs=[s.completion() for s in seqs],
            finished=all(s.is_finished for s in seqs),
            metrics=RequestMetrics(first.arrival_time, first_token, finish, ttft, latency),
            spec_stats=stats.as_dict() if speculative else {},
        )

    @classmethod
    def from_sequence(cls, seq: Sequence, speculative: bool) -> RequestOutput:
        return cls.from_sequences([seq], speculative)
