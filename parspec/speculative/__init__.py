"""Speculative decoding: proposers behind one interface, and verification."""

from __future__ import annotations

from parspec.config import ConfigError, SpeculativeConfig


def build_proposer(spec: SpeculativeConfig, target):
    """The proposer for ``spec.method``; ``target`` is a ``TargetView`` of the target model."""
    if spec.method == "ngram":
        from parspec.speculative.ngram import NgramProposer
        return NgramProposer(spec, target.device)
    if spec.method == "draft_model":
        from parspec.speculative.draft_model import DraftModelProposer
        return DraftModelProposer(spec, target)
    if spec.method == "eagle3":
        from parspec.speculative.eagle import Eagle3Proposer
        return Eagle3Proposer(spec, target)
    if spec.method == "spd":
        raise ConfigError("speculative method 'spd' runs the target as pipeline stages: it needs "
                          "pipeline_parallel_size >= 2 (got 1)")
    raise ConfigError(f"speculative method {spec.method!r} is not available yet")
