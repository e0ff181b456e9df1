"""A small LM with the target's tokenizer drafts K tokens in K sequential passes over
its own paged KV layers (indexed by the sequences' shared block tables)."""

from __future__ import annotations

import json
import os

import torch

from parspec.config import ConfigError, SpeculativeConfig
from parspec.metadata import build_attention_metadata, decode_metadata
from parspec.loader import load_model
from parspec.speculative.proposer import AfterVerifyDrafter, TargetView, sample_drafts
from parspec.transfer import to_device


def _vocab_of(model_dir: str) -> dict | None:
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    vocab = dict(data.get("model", {}).get("vocab", {}))
    vocab.update({t["content"]: t["id"] for t in data.get("added_tokens", [])})
    return vocab


def check_same_vocabulary(draft_dir: str, draft_vocab_size: int, target_dir: str, target_vocab_size: int) -> None:
    if draft_vocab_size > target_vocab_size:
        raise ConfigError(f"draft model vocab_size={draft_vocab_size} exceeds the target's {target_vocab_size}: "
                          "draft and target must share a tokenizer")
    draft_vocab, target_vocab = _vocab_of(draft_dir), _vocab_of(target_dir)
    if draft_vocab is not None and target_vocab is not None and draft_vocab != target_vocab:
        differ = sorted(set(draft_vocab.items()) ^ set(target_vocab.items()))[:3]
        raise ConfigError(f"the draft model's tokenizer differs from the target's (e.g. {differ}): "
                          "speculation needs the same vocabulary")


class DraftModelProposer(AfterVerifyDrafter):
    """Drafts right after each target step (``AfterVerifyDrafter``).

    Invariant: after drafting, the draft cache holds the verified tokens up to the newest
    one, and speculatively drafts 1..K-1 at the positions after it. After a decode step
    that fed ``[t, d1 .. dK]`` at ``base .. base+K`` and accepted ``a``, the cache is valid
    below ``base + a`` (the accepted drafts were fed there speculatively), so pass 1 feeds
    exactly two entries per sequence: fed token ``a`` at ``base + a`` (a harmless rewrite
    unless ``a == K``) and the emitted token at ``base + a + 1``; passes 2..K feed one draft
    each. Fixed shapes, so a greedy batch's drafting is one CUDA graph."""

    staged = ("output_tokens", "num_accepted", "base_positions", "block_tables", "fed_tokens")

    def __init__(self, spec: SpeculativeConfig, target: TargetView):
        super().__init__(spec.num_speculative_tokens, target)
        self.extra_slots = self.k  # pass K writes draft K-1 at base + a + K <= base + 2K
        self.drafter_passes = self.k
        self.max_positions = target.max_model_len + 2 * self.k + 2
        self.model, self.cfg = load_model(spec.model, target.dtype, target.device, max_positions=self.max_positions)
        self.target_vocab = target.config.vocab_size
        check_same_vocabulary(spec.model, self.cfg.vocab_size, target.model_dir, self.target_vocab)

    def prefill_drafts(self, seqs, step, sampling, generators):
        """Pass 1 feeds each chunk's tokens; a chunk that completes its context (the first
        ``step.num_seqs``) also feeds the emitted token and drafts from it, a partial one only
        fills the draft model's cache (chunked prefill). Metadata from the host."""
        done = step.num_seqs
        starts = [s.num_cached for s in seqs]
        feeds = [s.token_ids[c:c + n] + ([0] if i < done else [])  # the 0 becomes the emitted token
                 for i, (s, c, n) in enumerate(zip(seqs, starts, step.chunk_lens))]
        tokens = to_device([t for f in feeds for t in f], torch.int64, self.device)
        ends = torch.tensor([len(f) for f in feeds]).cumsum(0)[:done] - 1
        tokens[to_device(ends, torch.int64, self.device)] = step.output_tokens[:, 0]
        positions, meta = build_attention_metadata([s.block_table for s in seqs], starts,
                                                   [len(f) for f in feeds], self.block_size, self.device)
        meta.max_seq_len = self.max_positions
        if not done:
            self.model(tokens, positions, meta)
            return None, None
        last = meta.query_start_loc[1:done + 1].long() - 1
        base = positions.index_select(0, last)
        return self._passes(tokens, positions, meta, last, base, meta.block_tables[:done], sampling, generators)

    def decode_drafts(self, rows: int, sampling, generators):
        fed = self.staged_input("fed_tokens", rows)
        acc = self.staged_input("num_accepted", rows).long()
        out = self.staged_input("output_tokens", rows)
        tables = self.staged_input("block_tables", rows)
        first = self.staged_input("base_positions", rows) + acc  # position of fed token a
        positions, meta = decode_metadata(first, tables, 2, self.block_size, self.max_positions)
        tokens = torch.stack([fed.gather(1, acc[:, None])[:, 0], out.gather(1, acc[:, None])[:, 0]], dim=1)
        last = torch.arange(1, 2 * rows, 2, device=self.device)
        return self._passes(tokens.flatten(), positions, meta, last, first + 1, tables, sampling, generators)

    def _passes(self, tokens, positions, meta, last, base, tables, sampling, generators):
        """Pass 1 over the given entries (drafting from rows ``last``, at positions ``base``),
        then K-1 passes of one entry per sequence."""
        drafts, probs = [], []
        for i in range(self.k):
            if i:
                positions, meta = decode_metadata(base + i, tables, 1, self.block_size, self.max_positions)
                tokens, last = drafts[-1], None
            hidden, _ = self.model(tokens, positions, meta)
            logits = self.model.compute_logits(hidden if last is None else hidden.index_select(0, last))
            token, q = sample_drafts(logits, sampling, generators)
            if q is not None and q.shape[-1] < self.target_vocab:  # q lives on the target's vocabulary
                q = torch.nn.functional.pad(q, (0, self.target_vocab - q.shape[-1]))
            drafts.append(token)
            probs.append(q)
        return torch.stack(drafts, dim=1), None if probs[0] is None else torch.stack(probs, dim=1)
