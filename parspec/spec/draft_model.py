"""A small LM with the target's tokenizer drafts K tokens in K sequential passes over
its own paged KV layers (indexed by the sequences' shared block tables)."""

from __future__ import annotations

import json
import os

import torch

from parspec.config import ConfigError, SpeculativeConfig
from parspec.engine.metadata import build_attention_metadata
from parspec.loader import load_model
from parspec.sampling import BatchSampling
from parspec.spec.proposer import ModelProposer, Proposal, sample_drafts


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


class DraftModelProposer(ModelProposer):
    def __init__(self, spec: SpeculativeConfig, engine):
        super().__init__(spec.num_speculative_tokens)
        self.device, self.dtype = engine.device, engine.dtype
        self.model, self.cfg = load_model(spec.model, engine.dtype, engine.device,
                                          max_positions=engine.max_model_len + self.k + 1)
        self.target_vocab = engine.model_config.vocab_size
        check_same_vocabulary(spec.model, self.cfg.vocab_size, engine.cfg.model, self.target_vocab)

    @torch.inference_mode()
    def propose(self, seqs) -> Proposal:
        b = len(seqs)
        sampling = BatchSampling.from_params([s.params for s in seqs], self.device)
        # Pass 1 catches each sequence's draft cache up with its verified tokens.
        feeds = [s.token_ids[s.draft_state.get("cached", 0):] for s in seqs]
        starts = [s.draft_state.get("cached", 0) for s in seqs]
        tokens = torch.tensor([t for f in feeds for t in f], device=self.device)
        drafts, probs = [], []
        for i in range(self.k):
            q_lens = [len(f) for f in feeds] if i == 0 else [1] * b
            positions, meta = build_attention_metadata([s.block_table for s in seqs], starts, q_lens,
                                                       self.block_size, self.device)
            hidden, _ = self.model(tokens, positions, meta)
            last = meta.query_start_loc[1:].long() - 1
            logits = self.model.compute_logits(hidden[last])
            token, q = sample_drafts(logits, sampling, seqs)
            if q is not None and q.shape[-1] < self.target_vocab:  # q lives on the target's vocabulary
                q = torch.nn.functional.pad(q, (0, self.target_vocab - q.shape[-1]))
            drafts.append(token)
            probs.append(q)
            starts = [s + q for s, q in zip(starts, q_lens)]
            tokens = token
        for s, start in zip(seqs, starts):
            s.draft_state["fed_until"] = start  # draft K/V now cover positions < start
        return Proposal.full(torch.stack(drafts, dim=1), None if probs[0] is None else torch.stack(probs, dim=1),
                             drafter_passes=self.k)

    def observe(self, seqs, step, prefill: bool) -> None:
        if prefill:
            return
        for seq, tokens in zip(seqs, step.tokens):
            # Drafts that were accepted are already in the draft cache; the rest is stale.
            old_len = len(seq)
            seq.draft_state["cached"] = min(old_len + len(tokens) - 1, seq.draft_state.pop("fed_until"))
