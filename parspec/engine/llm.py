"""The offline API, shaped like vLLM's: LLM(model=...).generate(prompts, sampling_params)."""

from __future__ import annotations

from dataclasses import fields

from parspec.config import ConfigError, EngineConfig
from parspec.engine.llm_engine import LLMEngine
from parspec.sequence import RequestOutput
from parspec.sampling import SamplingParams


class LLM:
    def __init__(self, model: str, speculative_config=None, **engine_args):
        known = {f.name for f in fields(EngineConfig)} - {"model"}
        unknown = sorted(set(engine_args) - known)
        if unknown:
            raise ConfigError(f"unknown engine argument(s) {unknown}; known: {sorted(known)}")
        self.engine = LLMEngine(EngineConfig(model=model, **engine_args), speculative_config)

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
