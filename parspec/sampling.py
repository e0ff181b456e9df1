"""Sampling parameters and the logits -> probabilities transform shared by the target
(verification) and by drafters (draft probabilities), so both see the same p and q.

The target's distribution is processed in vLLM's v1 order (vllm/v1/sample/sampler.py):

1. min_tokens: EOS and stop_token_ids get -inf while fewer than min_tokens tokens are out;
2. logit_bias added;
3. penalties: repetition (prompt + output tokens), then frequency and presence (output tokens);
   greedy rows take the argmax HERE, so penalties and biases change greedy output;
4. temperature, then min_p, then top-k / top-p.

Steps 1-3 read the request's history (``process_logits``); steps 4 are history-free
(``probs_from_logits``), which is all a drafter applies to its own logits.

Under speculation, verify position ``j`` of a row is processed with the history the
non-speculative sampler would have there: the output so far PLUS drafts ``0..j-1``, which
precede position ``j`` whenever it is reached. That keeps verification lossless."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from parspec.transfer import to_device

MAX_LOGPROBS = 20  # vLLM's default max_logprobs
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range; vLLM clamps to it


class SamplingError(ValueError):
    """A sampling parameter is out of range."""


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _number_in(name: str, value, lo: float, hi: float, lo_open: bool = False):
    ok = _is_number(value) and (lo < value if lo_open else lo <= value) and value <= hi
    if not ok:
        lo_s = "(" if lo_open else "["
        raise SamplingError(f"{name} must be a number in {lo_s}{lo:g}, {hi:g}], got {value!r}")


@dataclass
class SamplingParams:
    """vLLM's names and defaults. temperature 0 means greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    skip_special_tokens: bool = True
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0
    logprobs: int | None = None  # the top-`logprobs` alternatives per emitted token (0: the token's own only)
    logit_bias: dict[int, float] | None = None
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise SamplingError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise SamplingError(f"top_k must be -1 (disabled), 0 (disabled) or a positive integer, got {self.top_k!r}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise SamplingError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise SamplingError(f"seed must be an integer, got {self.seed!r}")
        if not _is_int(self.n) or self.n < 1:
            raise SamplingError(f"n must be an integer >= 1, got {self.n!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError(f"stop must hold non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise SamplingError(f"stop_token_ids must hold token ids >= 0, got {self.stop_token_ids!r}")
        self._check_openai_fields()

    def _check_openai_fields(self) -> None:
        """vLLM's ranges (SamplingParams._verify_args) for the fields the OpenAI API adds."""
        _number_in("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _number_in("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise SamplingError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")
        _number_in("min_p", self.min_p, 0.0, 1.0)
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise SamplingError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingError(f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise SamplingError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}] (vLLM's "
                                f"max_logprobs), got {self.logprobs!r}")
        if not isinstance(self.include_stop_str_in_output, bool):
            raise SamplingError(f"include_stop_str_in_output must be a bool, got {self.include_stop_str_in_output!r}")
        self.logit_bias = _clamped_logit_bias(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def needs_history(self) -> bool:
        """Whether sampling reads the tokens generated so far (penalties, min_tokens): such a
        step cannot be launched before the host has read the previous one."""
        return self.has_penalties or self.min_tokens > 0


def _clamped_logit_bias(bias) -> dict[int, float] | None:
    """Token ids (ints, or strings of ints as JSON sends them) -> bias clamped to [-100, 100],
    as vLLM's OpenAI layer does. Ids past the vocabulary are the engine's check."""
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise SamplingError(f"logit_bias must be a dict of token id -> bias, got {bias!r:.80}")
    out = {}
    for key, value in bias.items():
        token = key
        if isinstance(key, str) and key.strip().lstrip("-").isdigit():
            token = int(key)
        if not _is_int(token) or token < 0:
            raise SamplingError(f"logit_bias keys must be token ids >= 0, got {key!r}")
        if not _is_number(value):
            raise SamplingError(f"logit_bias[{key!r}] must be a finite number, got {value!r}")
        out[int(token)] = min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, float(value)))
    return out


@dataclass
class BatchSampling:
    """Per-row sampling parameters of a batch as device tensors, built once per batch composition.

    The ``any_*`` flags let a step skip every processing stage no row uses, so a batch
    without the OpenAI extras pays nothing for them."""

    temperature: torch.Tensor  # [B] float32; 0 rows are greedy
    top_k: torch.Tensor  # [B] int64; 0 = disabled
    top_p: torch.Tensor  # [B] float32
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    min_p: torch.Tensor | None = None  # [B] float32, when any_min_p
    any_min_p: bool = False
    # penalties, when any_penalties: [B] float32 each; prompt_mask [B, V] bool (tokens in the prompt)
    repetition: torch.Tensor | None = None
    frequency: torch.Tensor | None = None
    presence: torch.Tensor | None = None
    prompt_mask: torch.Tensor | None = None
    any_penalties: bool = False
    # logit_bias as (row, token, bias) triples, when any_logit_bias
    bias_rows: torch.Tensor | None = None
    bias_tokens: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    any_logit_bias: bool = False
    # min_tokens: [B] int64 and the (row, token) pairs it masks (EOS unless ignore_eos, stop_token_ids)
    min_tokens: torch.Tensor | None = None
    stop_rows: torch.Tensor | None = None
    stop_tokens: torch.Tensor | None = None
    any_min_tokens: bool = False
    # logprobs: per real row, the number of alternatives asked for (None: not asked)
    logprobs: list[int | None] = field(default_factory=list)
    max_logprobs: int = -1  # -1: no row asked

    @property
    def needs_history(self) -> bool:
        return self.any_penalties or self.any_min_tokens

    @property
    def needs_processing(self) -> bool:
        """Whether the target's logits change before temperature (greedy rows included)."""
        return self.needs_history or self.any_logit_bias

    @classmethod
    def from_params(cls, params: list[SamplingParams], device, num_rows: int | None = None, *,
                    prompts: list[list[int]] | None = None, vocab_size: int | None = None,
                    eos_token_ids=()) -> BatchSampling:
        """``num_rows`` >= len(params) pads the batch with greedy rows (a CUDA-graph bucket).
        ``prompts`` and ``vocab_size`` are needed when a row has a repetition penalty,
        ``eos_token_ids`` when one has min_tokens."""
        rows = num_rows or len(params)
        pad = rows - len(params)
        temps = [p.temperature for p in params] + [0.0] * pad
        top_k = [max(p.top_k, 0) for p in params] + [0] * pad
        top_p = [p.top_p for p in params] + [1.0] * pad
        s = cls(
            temperature=to_device(temps, torch.float32, device),
            top_k=to_device(top_k, torch.int64, device),
            top_p=to_device(top_p, torch.float32, device),
            all_greedy=all(t == 0 for t in temps),
            any_top_k=any(k > 0 for k in top_k),
            any_top_p=any(p < 1 for p in top_p),
        )
        if any(p.min_p > 0 for p in params):
            s.any_min_p = True
            s.min_p = to_device([p.min_p for p in params] + [0.0] * pad, torch.float32, device)
        if any(p.has_penalties for p in params):
            s._set_penalties(params, pad, prompts, vocab_size, device)
        if any(p.logit_bias for p in params):
            triples = [(i, t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items()]
            s.any_logit_bias = True
            s.bias_rows = to_device([r for r, _, _ in triples], torch.int64, device)
            s.bias_tokens = to_device([t for _, t, _ in triples], torch.int64, device)
            s.bias_values = to_device([b for _, _, b in triples], torch.float32, device)
        if any(p.min_tokens > 0 for p in params):
            pairs = [(i, t) for i, p in enumerate(params) if p.min_tokens > 0
                     for t in sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids)))]
            s.any_min_tokens = bool(pairs)
            s.min_tokens = to_device([p.min_tokens for p in params] + [0] * pad, torch.int64, device)
            s.stop_rows = to_device([r for r, _ in pairs], torch.int64, device)
            s.stop_tokens = to_device([t for _, t in pairs], torch.int64, device)
        s.logprobs = [p.logprobs for p in params]
        s.max_logprobs = max((p.logprobs for p in params if p.logprobs is not None), default=-1)
        return s

    def _set_penalties(self, params, pad, prompts, vocab_size, device) -> None:
        self.any_penalties = True
        self.repetition = to_device([p.repetition_penalty for p in params] + [1.0] * pad, torch.float32, device)
        self.frequency = to_device([p.frequency_penalty for p in params] + [0.0] * pad, torch.float32, device)
        self.presence = to_device([p.presence_penalty for p in params] + [0.0] * pad, torch.float32, device)
        if prompts is None or vocab_size is None:
            raise ValueError("penalties need the rows' prompts and the vocabulary size")
        # Only rows with a repetition penalty read their prompt: the others' stay empty.
        lists = [prompt if p.repetition_penalty != 1 else [] for p, prompt in zip(params, prompts)]
        self.prompt_mask = token_counts(lists, len(params) + pad, vocab_size, device) > 0


@dataclass
class SamplingHistory:
    """What the rows have generated so far, for one step (penalties and min_tokens read it)."""

    counts: torch.Tensor  # [B, V] float32: occurrences of each token among the row's output tokens
    num_output: torch.Tensor  # [B] int64: output tokens so far

    @classmethod
    def build(cls, outputs: list, num_rows: int, vocab_size: int, device) -> SamplingHistory:
        """``outputs``: per real row its output token ids (empty for rows that do not need them)."""
        counts = token_counts(outputs, num_rows, vocab_size, device).float()
        num_output = to_device([len(o) for o in outputs] + [0] * (num_rows - len(outputs)), torch.int64, device)
        return cls(counts, num_output)


def token_counts(token_lists: list, num_rows: int, vocab_size: int, device) -> torch.Tensor:
    """[num_rows, V] int64 occurrence counts, built on the device from ONE padded upload."""
    width = max((len(t) for t in token_lists), default=0)
    padded = np.full((num_rows, max(width, 1)), vocab_size, dtype=np.int64)  # pad id = V: a spare column
    for i, tokens in enumerate(token_lists):
        padded[i, :len(tokens)] = tokens
    ids = to_device(padded, torch.int64, device)
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids))
    return counts[:, :vocab_size]


# --- processing: the history-dependent stages ------------------------------------------------
def process_logits(logits: torch.Tensor, s: BatchSampling, history: SamplingHistory | None,
                   drafts: torch.Tensor | None = None, num_drafts: torch.Tensor | None = None) -> torch.Tensor:
    """Target logits ``[B, Q, V]`` -> float32 logits after min_tokens, logit_bias and the
    penalties, position ``j`` of a row seeing the row's history plus its drafts ``0..j-1``
    (``drafts [B, Q-1]``, of which the first ``num_drafts[b]`` are real). Returns ``logits``
    itself (as float32) when no row needs processing; never writes into ``logits``."""
    logits = logits.float()
    if not s.needs_processing:
        return logits
    logits = logits.clone()
    q = logits.shape[1]
    positions = torch.arange(q, device=logits.device)
    if s.any_min_tokens:  # position j has num_output + j tokens before it
        early = (history.num_output[:, None] + positions) < s.min_tokens[:, None]  # [B, Q]
        rows, tokens = s.stop_rows[:, None], s.stop_tokens[:, None]
        cur = logits[rows, positions, tokens]  # [S, Q]
        logits[rows, positions, tokens] = cur.masked_fill(early[s.stop_rows], float("-inf"))
    if s.any_logit_bias:
        rows, tokens = s.bias_rows[:, None], s.bias_tokens[:, None]
        logits[rows, positions, tokens] += s.bias_values[:, None]
    if s.any_penalties:
        logits = _penalize_with_drafts(logits, s, history, drafts, num_drafts)
    return logits


def _penalize(x, counts, seen, repetition, frequency, presence):
    """vLLM's penalties, elementwise: repetition divides a positive logit of a seen token
    (prompt or output) and multiplies a negative one; frequency subtracts per occurrence in
    the output, presence once if it occurred."""
    rep = torch.where(seen, repetition, torch.ones_like(repetition))
    x = torch.where(x > 0, x / rep, x * rep)
    return x - frequency * counts - presence * (counts > 0).float()


def _penalize_with_drafts(logits, s: BatchSampling, history: SamplingHistory, drafts, num_drafts):
    """Penalties with the output history at every position, then a correction at the draft
    tokens' columns, the only ones whose counts differ between positions: at position j a
    draft token t has occurred count(t) + #{m < j real draft: d_m = t} times. The same
    ``_penalize`` computes both, so a position's values equal the non-speculative ones bit
    for bit. Costs [B, Q, K] beyond the one [B, Q, V] pass."""
    b, q, v = logits.shape
    param = lambda t: t.view(b, 1, 1)  # noqa: E731
    rep, freq, pres = param(s.repetition), param(s.frequency), param(s.presence)
    counts = history.counts[:, None, :]
    seen = s.prompt_mask[:, None, :] | (counts > 0)
    out = _penalize(logits, counts, seen, rep, freq, pres)
    k = 0 if drafts is None else drafts.shape[1]
    if k == 0:
        return out
    d = drafts.clamp(0, v - 1)  # slots past num_drafts may hold anything
    real = torch.arange(k, device=d.device)[None, :] < num_drafts.long()[:, None]  # [B, K]
    same = (d[:, :, None] == d[:, None, :]) & real[:, None, :]  # [B, i, m]: draft m is token d_i
    before = torch.cat([torch.zeros_like(same[..., :1], dtype=torch.float32),
                        same.float().cumsum(-1)], dim=-1)  # [B, i, j]: such m < j
    extra = before.transpose(1, 2)[:, :q]  # [B, Q, K]
    idx = d[:, None, :].expand(b, q, k)
    cnt = history.counts.gather(1, d)[:, None, :] + extra
    seen_d = s.prompt_mask.gather(1, d)[:, None, :] | (cnt > 0)
    out.scatter_(2, idx, _penalize(logits.gather(2, idx), cnt, seen_d, rep, freq, pres))
    return out


# --- the history-free stages ----------------------------------------------------------------
def probs_from_logits(logits: torch.Tensor, s: BatchSampling) -> torch.Tensor:
    """Logits [B, ..., V] -> float32 probabilities after temperature, min_p, top-k and top-p.

    Greedy rows become one-hot at the argmax (first index on ties), which makes rejection
    sampling reduce exactly to greedy verification for them."""
    b = logits.shape[0]
    shape = (b,) + (1,) * (logits.dim() - 1)
    logits = logits.float()
    greedy = (s.temperature == 0).view(shape)
    temp = torch.where(s.temperature == 0, 1.0, s.temperature).view(shape)
    scaled = logits / temp
    if s.any_min_p:
        scaled = _mask_min_p(scaled, s.min_p.view(shape))
    if s.any_top_k or s.any_top_p:
        scaled = _mask_top_k_top_p(scaled, s.top_k.view(shape), s.top_p.view(shape), s.any_top_k, s.any_top_p)
    probs = scaled.softmax(dim=-1)
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, probs)


def _mask_min_p(logits, min_p):
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p
    return logits.masked_fill(probs < threshold, float("-inf"))


def _mask_top_k_top_p(logits, top_k, top_p, any_top_k, any_top_p):
    v = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    keep = torch.ones_like(sorted_logits, dtype=torch.bool)
    ranks = torch.arange(v, device=logits.device)
    if any_top_k:
        k = torch.where(top_k > 0, top_k, v)
        keep &= ranks < k
    if any_top_p:
        probs = sorted_logits.masked_fill(~keep, float("-inf")).softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        mass_before = probs.cumsum(dim=-1) - probs
        keep &= mass_before < top_p
    keep[..., 0] = True
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


# --- logprobs ---------------------------------------------------------------------------------
def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, num_top: int) -> torch.Tensor:
    """vLLM's default (``raw_logprobs``): log_softmax of the target's UNPROCESSED logits.

    ``logits [B, Q, V]``, ``tokens [B, Q]`` (negative = no token). Returns int64
    ``[B, Q, 2 + 2 * num_top]``: the token's logprob (float32 bits), its rank (1 = most
    likely; tokens as likely count against it, as in vLLM), then the top ``num_top`` ids and
    their logprobs (float32 bits), best first. Integers only, so it rides in the step's one
    int64 host copy; ``unpack_logprobs`` reads it back."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    num_top = min(num_top, lp.shape[-1])
    tok_lp = lp.gather(2, tokens.clamp_min(0)[..., None])  # [B, Q, 1]
    rank = (lp >= tok_lp).sum(-1, keepdim=True)
    parts = [_float_bits(tok_lp), rank]
    if num_top > 0:
        top_lp, top_ids = lp.topk(num_top, dim=-1)
        parts += [top_ids, _float_bits(top_lp)]
    return torch.cat(parts, dim=-1)


def _float_bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32).long()


def unpack_logprobs(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host ``[..., 2 + 2L]`` int64 -> (logprob float32, rank, top ids, top logprobs float32)."""
    num_top = (packed.shape[-1] - 2) // 2
    as_float = lambda t: t.to(torch.int32).view(torch.float32)  # noqa: E731
    return (as_float(packed[..., 0].contiguous()), packed[..., 1], packed[..., 2:2 + num_top],
            as_float(packed[..., 2 + num_top:].contiguous()))
