"""Configuration dataclasses: the target model (from HF config.json), speculation
(vLLM's --speculative-config JSON keys) and the engine. Validated at construction so
that a bad value fails here, with the value in the message, not deep in a kernel."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch


class ConfigError(ValueError):
    """A configuration value is missing, malformed or unsupported."""


# Architectures served by models/llama.py; the flags are what differs between the families.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": {},
    "MistralForCausalLM": {},
    "Qwen2ForCausalLM": {"attention_bias": True},
    "Qwen3ForCausalLM": {"qk_norm": True},
}

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_device(name: str) -> torch.device:
    """'auto' is the GPU when there is one, else the CPU; anything else as torch reads it."""
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ConfigError(f"unsupported dtype {dtype}; use one of float32, bfloat16, float16")
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; use one of float32, bfloat16, float16")
    return DTYPES[dtype]


def read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} is not valid JSON: {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must hold a JSON object, got {type(data).__name__}: {path}")
    return data


@dataclass
class ModelConfig:
    """The target's shape, read from an HF config.json (old and transformers-5 rope keys)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    torch_dtype: str | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads={self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads={self.num_key_value_heads}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("default", "llama3", "linear"):
                raise ConfigError(f"config.json: unsupported rope_scaling type {kind!r} "
                                  "(supported: default, linear, llama3)")

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not archs:
            raise ConfigError("config.json has no 'architectures' entry")
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"unsupported architecture {arch!r}; parspec serves "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ConfigError(f"config.json is missing {', '.join(missing)}")
        heads = cfg["num_attention_heads"]
        # transformers 5 writes rope_parameters; older checkpoints rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        theta = cfg.get("rope_theta", rope.pop("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = cfg.get("eos_token_id")
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        sliding = cfg.get("sliding_window")
        if arch.startswith("Qwen") and not cfg.get("use_sliding_window", False):
            sliding = None
        flags = SUPPORTED_ARCHITECTURES[arch]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", flags.get("attention_bias", False))),
            qk_norm=flags.get("qk_norm", False),
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )

    @classmethod
    def from_pretrained(cls, model_dir: str) -> ModelConfig:
        return cls.from_dict(read_json(os.path.join(model_dir, "config.json"), "config.json"))


SPEC_METHODS = ("ngram", "draft_model", "eagle3", "spd")


def infer_spec_method(model: str | None) -> str:
    """vLLM's rule when "method" is absent: "ngram" for model "ngram"/"[ngram]", "eagle" when
    the drafter's name holds "eagle-", "eagle3" when it holds "eagle3", else "draft_model"."""
    if model is None:
        raise ConfigError("speculative config needs \"method\" or a drafter \"model\" to infer it from")
    if model in ("ngram", "[ngram]"):
        return "ngram"
    name = str(model).lower()
    if "eagle-" in name:
        return "eagle"
    return "eagle3" if "eagle3" in name else "draft_model"


@dataclass
class SpeculativeConfig:
    """vLLM's --speculative-config keys. Unknown keys are an error, not silently dropped;
    from_any infers an absent "method" from "model" as vLLM does."""

    method: str
    num_speculative_tokens: int  # "auto": adaptive depth, up to max_num_speculative_tokens
    model: str | None = None
    parallel_drafting: bool = False
    prompt_lookup_min: int | None = None  # ngram: both None -> 5 and 5; one given -> the other copies it (vLLM)
    prompt_lookup_max: int | None = None
    draft_tensor_parallel_size: int | None = None  # vLLM: 1 or the target's TP size; both are 1 here
    disable_padded_drafter_batch: bool = False  # parspec always pads (fixed shapes for CUDA graphs)
    # parspec's own: the deepest K an "auto" depth may choose (default 7)
    max_num_speculative_tokens: int | None = None
    # parspec's own: with parallel_drafting, rerun the P-EAGLE pass this many more times, each
    # mask slot fed the previous pass's draft before it instead of the mask token
    draft_refine_passes: int = 0
    adaptive: bool = field(default=False, init=False)  # set by num_speculative_tokens "auto"

    def __post_init__(self):
        self.method = self.check_method(self.method)
        if self.num_speculative_tokens == "auto":
            self.adaptive = True
            self.num_speculative_tokens = 7 if self.max_num_speculative_tokens is None \
                else self.max_num_speculative_tokens
        elif self.max_num_speculative_tokens is not None:
            raise ConfigError("max_num_speculative_tokens applies only with num_speculative_tokens \"auto\", "
                              f"got num_speculative_tokens={self.num_speculative_tokens!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            what = "max_num_speculative_tokens" if self.adaptive else 'num_speculative_tokens (or "auto")'
            raise ConfigError(f"{what} must be an integer >= 1, got {k!r}")
        if self.method == "spd" and k != 1:
            raise ConfigError(f"speculative method 'spd' verifies one draft per pipeline cycle: "
                              f"num_speculative_tokens must be 1 or absent, got {k!r}")
        if self.method in ("draft_model", "eagle3", "spd") and not self.model:
            raise ConfigError(f"speculative method {self.method!r} needs \"model\": the drafter's directory")
        if self.method == "ngram":
            if self.model in ("ngram", "[ngram]"):
                self.model = None
            if self.prompt_lookup_min is None and self.prompt_lookup_max is None:
                self.prompt_lookup_min = self.prompt_lookup_max = 5
            elif self.prompt_lookup_min is None:
                self.prompt_lookup_min = self.prompt_lookup_max
            elif self.prompt_lookup_max is None:
                self.prompt_lookup_max = self.prompt_lookup_min
            lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi)) or not 1 <= lo <= hi:
                raise ConfigError(f"ngram needs 1 <= prompt_lookup_min <= prompt_lookup_max, "
                                  f"got {lo!r} and {hi!r}")
        if self.parallel_drafting and self.method != "eagle3":
            raise ConfigError(f"parallel_drafting applies to method 'eagle3', not {self.method!r}")
        r = self.draft_refine_passes
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ConfigError(f"draft_refine_passes must be an integer >= 0, got {r!r}")
        if r and not self.parallel_drafting:
            raise ConfigError(f"draft_refine_passes={r} refines parallel drafts: it needs parallel_drafting true, "
                              f"got parallel_drafting={self.parallel_drafting!r}")
        if self.draft_tensor_parallel_size not in (None, 1):
            raise ConfigError(f"draft_tensor_parallel_size={self.draft_tensor_parallel_size!r} is not supported: "
                              "parspec runs the drafter on one device (use 1 or leave it unset)")
        if self.disable_padded_drafter_batch:
            raise ConfigError(f"disable_padded_drafter_batch={self.disable_padded_drafter_batch!r} is not "
                              "supported: parspec always pads the drafter batch (use false or leave it unset)")

    @staticmethod
    def check_method(method: str) -> str:
        if method == "[ngram]":
            return "ngram"
        if method == "eagle":
            raise ConfigError("speculative method 'eagle' (EAGLE-1/2) is not supported; use 'eagle3'")
        if method not in SPEC_METHODS:
            raise ConfigError(f"unknown speculative method {method!r}; choose one of {', '.join(SPEC_METHODS)}")
        return method

    @classmethod
    def from_any(cls, value: Any) -> SpeculativeConfig | None:
        """Accepts None, a SpeculativeConfig, a dict or a JSON string (as on vLLM's CLI)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(f"speculative config is not valid JSON: {value!r}: {e}") from e
        if not isinstance(value, dict):
            raise ConfigError(f"speculative config must be a JSON object, got {value!r}")
        value = dict(value)
        if value.get("method") is None:
            value["method"] = infer_spec_method(value.get("model"))
        cls.check_method(value["method"])
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"unknown speculative config keys {unknown}; known: {sorted(known)}")
        if value["method"] == "spd":
            value.setdefault("num_speculative_tokens", 1)  # one draft verified per cycle
        if "num_speculative_tokens" not in value:
            raise ConfigError("speculative config needs \"num_speculative_tokens\"")
        return cls(**value)


@dataclass
class EngineConfig:
    model: str
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 64
    # Tokens one step may feed. With chunked prefill, decodes take K + 1 each first and context
    # chunks get the rest; 8192 is vLLM's offline default (its server uses 2048 on smaller GPUs:
    # smaller chunks stall running requests less, larger ones prefill faster).
    max_num_batched_tokens: int = 8192
    enable_chunked_prefill: bool = True  # vLLM's flag: prompts prefilled in chunks beside running decodes
    block_size: int = 16
    num_kv_blocks: int | None = None
    gpu_memory_utilization: float = 0.85
    kv_cache_memory_bytes: int | None = None
    enforce_eager: bool = False
    async_scheduling: bool | None = None  # launch a decode step before reading the last; None: on with CUDA graphs
    seed: int | None = 0  # vLLM's engine-wide seed: seeds random, numpy and torch at start; None leaves them
    skip_tokenizer_init: bool = False
    # The target computes every row the same way whatever the batch (parspec.batch_invariant):
    # greedy speculative output then equals no-spec output bit for bit in any dtype.
    batch_invariant: bool = False
    # Pipeline stages (one process each; parspec.spd): > 1 runs plain pipelined or SPD decoding.
    pipeline_parallel_size: int = 1

    def __post_init__(self):
        pp = self.pipeline_parallel_size
        if not isinstance(pp, int) or isinstance(pp, bool) or pp < 1:
            raise ConfigError(f"pipeline_parallel_size must be an integer >= 1, got {pp!r}")
        if not isinstance(self.batch_invariant, bool):
            raise ConfigError(f"batch_invariant must be true or false, got {self.batch_invariant!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ConfigError(f"seed must be an integer or None, got {self.seed!r}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        tokens = self.max_num_batched_tokens
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be an integer >= 1, got {tokens!r}")
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ConfigError(f"enable_chunked_prefill must be true or false, got {self.enable_chunked_prefill!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)
