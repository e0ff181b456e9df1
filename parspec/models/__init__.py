"""Model families. Every supported architecture maps to the class that serves it."""

from parspec.config import SUPPORTED_ARCHITECTURES, ConfigError


def model_class(architecture: str):
    from parspec.models.llama import LlamaForCausalLM

    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"unsupported architecture {architecture!r}")
    return LlamaForCausalLM
