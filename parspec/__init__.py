"""parspec: a speculative-decoding inference engine (P-EAGLE, Triton verification, SPD)."""

__version__ = "0.1.0"

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


def __getattr__(name):
    # Lazy, so `import parspec.config` does not pull in the whole engine.
    if name == "LLM":
        from parspec.engine.llm import LLM
        return LLM
    if name == "RequestOutput":
        from parspec.sequence import RequestOutput
        return RequestOutput
    if name == "SamplingParams":
        from parspec.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(name)
