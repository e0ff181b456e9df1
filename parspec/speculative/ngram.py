"""Prompt lookup (vLLM's "ngram" method): match the sequence's last n tokens earlier in
its own history and propose what followed. Deterministic, so no draft probabilities."""

from __future__ import annotations

import numpy as np
import torch

from parspec.config import SpeculativeConfig
from parspec.speculative.proposer import Proposal, Proposer
from parspec.transfer import to_device


def ngram_lookup(tokens: np.ndarray, n_min: int, n_max: int, k: int) -> np.ndarray:
    """The up-to-k tokens after the earliest occurrence of the longest suffix n-gram
    (n_max down to n_min) of ``tokens``, as vLLM's NgramProposer picks; empty when nothing matches."""
    length = len(tokens)
    for n in range(min(n_max, length - 1), n_min - 1, -1):
        suffix = tokens[length - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = hits[0] + n
            return tokens[start:start + k]
    return tokens[:0]


class NgramProposer(Proposer):
    def __init__(self, spec: SpeculativeConfig, device: torch.device):
        super().__init__(spec.num_speculative_tokens)
        self.n_min, self.n_max = spec.prompt_lookup_min, spec.prompt_lookup_max
        self.device = device

    def propose(self, seqs) -> Proposal:
        drafts = np.zeros((len(seqs), self.k), dtype=np.int64)
        counts = []
        for i, seq in enumerate(seqs):
            found = ngram_lookup(np.asarray(seq.token_ids, dtype=np.int64), self.n_min, self.n_max, self.k)
            drafts[i, :len(found)] = found
            counts.append(len(found))
        return Proposal(
            draft_tokens=to_device(drafts, torch.int64, self.device),
            num_drafts=to_device(counts, torch.int32, self.device),
            num_drafts_host=counts,
        )
