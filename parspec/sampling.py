"""Sampling parameters and the logits -> probabilities transform shared by the target
(verification) and by drafters (draft probabilities), so both see the same p and q."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parspec.transfer import to_device


class SamplingError(ValueError):
    """A sampling parameter is out of range."""


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
        if self.n != 1:
            raise SamplingError(f"n={self.n!r} is not supported; only n=1")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise SamplingError(f"stop must hold non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise SamplingError(f"stop_token_ids must hold token ids >= 0, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class BatchSampling:
    """Per-row sampling parameters of a batch as device tensors, built once per batch composition."""

    temperature: torch.Tensor  # [B] float32; 0 rows are greedy
    top_k: torch.Tensor  # [B] int64; 0 = disabled
    top_p: torch.Tensor  # [B] float32
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool

    @classmethod
    def from_params(cls, params: list[SamplingParams], device, num_rows: int | None = None) -> BatchSampling:
        """``num_rows`` >= len(params) pads the batch with greedy rows (a CUDA-graph bucket)."""
        pad = (num_rows or len(params)) - len(params)
        temps = [p.temperature for p in params] + [0.0] * pad
        top_k = [max(p.top_k, 0) for p in params] + [0] * pad
        top_p = [p.top_p for p in params] + [1.0] * pad
        return cls(
            temperature=to_device(temps, torch.float32, device),
            top_k=to_device(top_k, torch.int64, device),
            top_p=to_device(top_p, torch.float32, device),
            all_greedy=all(t == 0 for t in temps),
            any_top_k=any(k > 0 for k in top_k),
            any_top_p=any(p < 1 for p in top_p),
        )


def probs_from_logits(logits: torch.Tensor, s: BatchSampling) -> torch.Tensor:
    """Logits [B, ..., V] -> float32 probabilities after temperature, top-k and top-p.

    Greedy rows become one-hot at the argmax (first index on ties), which makes rejection
    sampling reduce exactly to greedy verification for them."""
    b = logits.shape[0]
    shape = (b,) + (1,) * (logits.dim() - 1)
    logits = logits.float()
    greedy = (s.temperature == 0).view(shape)
    temp = torch.where(s.temperature == 0, 1.0, s.temperature).view(shape)
    scaled = logits / temp
    if s.any_top_k or s.any_top_p:
        scaled = _mask_top_k_top_p(scaled, s.top_k.view(shape), s.top_p.view(shape), s.any_top_k, s.any_top_p)
    probs = scaled.softmax(dim=-1)
    one_hot = torch.zeros_like(probs).scatter_(-1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return torch.where(greedy, one_hot, probs)


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
