"""Speculative decoding: proposers behind one interface, and verification."""

from __future__ import annotations

from parspec.config import ConfigError, SpeculativeConfig


def build_proposer(spec: SpeculativeConfig, engine):
    """The proposer for ``spec.method``; ``engine`` gives access to the target and tokenizer."""
    if spec.method == "ngram":
        from parspec.spec.ngram import NgramProposer
        return NgramProposer(spec, engine.device)
    if spec.method == "draft_model":
        from parspec.spec.draft_model import DraftModelProposer
        return DraftModelProposer(spec, engine)
    if spec.method == "eagle3":
        from parspec.spec.eagle3 import Eagle3Proposer
        return Eagle3Proposer(spec, engine)
    raise ConfigError(f"speculative method {spec.method!r} is not available yet")
