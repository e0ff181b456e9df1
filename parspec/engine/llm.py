"""The offline API, shaped like vLLM's: LLM(model=...).generate(prompts, sampling_params)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from parspec.config import ConfigError, EngineConfig
from parspec.engine.llm_engine import LLMEngine
from parspec.sequence import RequestOutput
from parspec.sampling import SamplingParams


@dataclass(frozen=True)
class Counter:
    """A monotonic count, as vLLM's vllm.v1.metrics.reader.Counter (name, value)."""

    name: str
    value: int


@dataclass(frozen=True)
class Vector:
    """A count per position, as vLLM's vllm.v1.metrics.reader.Vector (name, values)."""

    name: str
    values: list[int]


class LLM:
    def __init__(self, model: str, speculative_config=None, **engine_args):
        known = {f.name for f in fields(EngineConfig)} - {"model"}
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise ConfigError(f"unknown engine argument(s) {unknown}; known: {sorted(known)}")
        cfg = EngineConfig(model=model, **engine_args)
        if cfg.pipeline_parallel_size > 1:  # stage processes; plain pipelined or SPD decoding
            from parspec.spd.engine import PipelineEngine
            self.engine = PipelineEngine(cfg, speculative_config)
        else:
            self.engine = LLMEngine(cfg, speculative_config)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        return self.engine.generate(list(prompts), sampling_params, use_tqdm=use_tqdm)

    def get_tokenizer(self):
        return self.engine.tokenizer

    @property
    def spec_stats(self):
        return self.engine.stats

    def get_metrics(self) -> list[Counter | Vector]:
        """Engine-wide speculation counters since start (or reset_stats), under vLLM's names:

        - ``vllm:spec_decode_num_drafts`` (Counter): request-steps that proposed >= 1 token
        - ``vllm:spec_decode_num_draft_tokens`` (Counter): tokens proposed
        - ``vllm:spec_decode_num_accepted_tokens`` (Counter): proposed tokens accepted
        - ``vllm:spec_decode_num_accepted_tokens_per_pos`` (Vector, num_speculative_tokens long):
          acceptances at draft position i

        Mean acceptance length = 1 + accepted_tokens / drafts; acceptance at position i =
        per_pos[i] / drafts, as in vLLM's examples. Empty without speculation."""
        if self.engine.spec_config is None:
            return []
        s = self.engine.stats
        per_pos = s.num_accepted_tokens_per_pos + [0] * (self.engine.k - len(s.num_accepted_tokens_per_pos))
        return [Counter("vllm:spec_decode_num_drafts", s.num_drafts),
                Counter("vllm:spec_decode_num_draft_tokens", s.num_draft_tokens),
                Counter("vllm:spec_decode_num_accepted_tokens", s.num_accepted_tokens),
                Vector("vllm:spec_decode_num_accepted_tokens_per_pos", per_pos)]
