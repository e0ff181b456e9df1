"""The EAGLE-3 drafter, and P-EAGLE's parallel-drafting variant of it.

Checkpoint layout (vLLM's, the one ``save_eagle3`` writes; ``head_formats`` reads and
writes the speculators and SafeAILab layouts too): config.json in the
LlamaForCausalLMEagle3 style and safetensors holding
  fc.weight                 [H, n_aux * H_target]  target features -> drafter width
  layers.N.*                decoder layer(s); layer 0's attention reads [embedding; feature] (2H)
  norm.weight, lm_head.weight [draft_vocab, H]
  d2t [draft_vocab] int64   target id = draft id + d2t[draft id]
  t2d [target_vocab] bool   target token is in the draft vocabulary
  embed_tokens.weight       optional; else the target's embedding is shared
  mask_hidden [1, n_aux * H_target]   P-EAGLE only: the feature of a mask slot
  input_norm.weight, fc_norm.N.weight optional norms of the features before fc (vLLM's
                            norm_before_fc / fc_norm); q/k/v/o and MLP biases as vLLM allows them

A head is P-EAGLE when its config names a mask token (mask_token_id, ptd_token_id or
pard_token) and its checkpoint has mask_hidden; whether it drafts in parallel is the
speculative config's ``parallel_drafting``, as in vLLM.

Entry ``p`` of the drafter combines the target's feature of position ``p`` with the
token at ``p + 1`` and predicts the token at ``p + 2``."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from parspec.config import ConfigError, ModelConfig
from parspec.loader import LoadError, build_on_device, load_weights
from parspec.models.layers import PACKED_MODULES, GatedMLP, PagedSelfAttention, RMSNorm, RotaryEmbedding
from parspec.models.llama import DecoderLayer

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "LlamaForCausalLM",
                        "PeagleLlamaForCausalLM")
# The config keys vLLM versions read the P-EAGLE mask token from (newest first).
MASK_TOKEN_KEYS = ("mask_token_id", "ptd_token_id", "pard_token")


def default_aux_layers(num_target_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's choice: inputs of layers 2, L//2 and L-3 (low, middle, high features)."""
    return (2, num_target_layers // 2, num_target_layers - 3)


def _one_of(places: dict[str, object], what: str):
    """The single value given under any of ``places`` (name -> value or None); several
    differing values are an error, since vLLM versions would each pick another."""
    given = {name: v for name, v in places.items() if v is not None}
    values = {tuple(v) if isinstance(v, list) else v for v in given.values()}
    if len(values) > 1:
        raise ConfigError(f"drafter config: {what} disagree: " + ", ".join(f"{k}={v}" for k, v in given.items()))
    return next(iter(given.values())) if given else None


@dataclass
class Eagle3Config:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int  # the target's vocabulary (embedding size)
    draft_vocab_size: int
    target_hidden_size: int
    num_hidden_layers: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    norm_before_residual: bool = False
    aux_layer_ids: tuple[int, ...] | None = None  # None: default_aux_layers of the target
    parallel_drafting: bool = False  # a P-EAGLE head: mask token + mask_hidden (not the drafting mode)
    mask_token_id: int | None = None
    attention_bias: bool = False  # q/k/v biases (vLLM: attention_bias)
    o_proj_bias: bool = False  # vLLM: attention_bias or bias
    mlp_bias: bool = False
    norm_before_fc: bool = False  # one RMSNorm over the concatenated features before fc
    fc_norm: bool = False  # one RMSNorm per aux feature before fc
    norm_output: bool = False  # later draft passes read the normed output, not the pre-norm one

    def __post_init__(self):
        if self.draft_vocab_size > self.vocab_size:
            raise ConfigError(f"drafter config: draft_vocab_size={self.draft_vocab_size} exceeds "
                              f"vocab_size={self.vocab_size}")
        if self.parallel_drafting and self.mask_token_id is None:
            raise ConfigError("drafter config: a P-EAGLE head needs a mask token "
                              f"({' / '.join(MASK_TOKEN_KEYS)})")

    @property
    def num_aux(self) -> int:
        return len(self.aux_layer_ids) if self.aux_layer_ids is not None else 3

    @classmethod
    def from_dict(cls, cfg: dict) -> Eagle3Config:
        """vLLM's config.json (SafeAILab's is the same shape); ``head_formats`` turns a
        speculators config into this one first."""
        arch = (cfg.get("architectures") or ["LlamaForCausalLMEagle3"])[0]
        if arch not in EAGLE3_ARCHITECTURES:
            raise ConfigError(f"drafter config: architecture {arch!r} is not an EAGLE-3 Llama drafter "
                              f"({', '.join(EAGLE3_ARCHITECTURES)})")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size") if k not in cfg]
        if missing:
            raise ConfigError(f"drafter config is missing {', '.join(missing)}")
        base = ModelConfig.from_dict({**cfg, "architectures": ["LlamaForCausalLM"],
                                      "num_hidden_layers": cfg.get("num_hidden_layers", 1)})
        eagle = cfg.get("eagle_config") or {}
        key = "eagle_aux_hidden_state_layer_ids"
        # Some vLLM versions read only the top-level key, others only eagle_config's.
        aux = _one_of({key: cfg.get(key), f"eagle_config.{key}": eagle.get(key)}, "aux layer ids")
        mask = _one_of({k: cfg.get(k) for k in MASK_TOKEN_KEYS}, "mask token ids")
        if cfg.get("parallel_drafting") and mask is None:  # parspec's old key, still accepted
            raise ConfigError(f"drafter config: parallel_drafting is set but no mask token ({' / '.join(MASK_TOKEN_KEYS)})")
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            hidden_size=base.hidden_size, intermediate_size=base.intermediate_size,
            num_attention_heads=base.num_attention_heads, num_key_value_heads=base.num_key_value_heads,
            head_dim=base.head_dim, vocab_size=base.vocab_size,
            draft_vocab_size=cfg.get("draft_vocab_size") or base.vocab_size,
            target_hidden_size=cfg.get("target_hidden_size") or base.hidden_size,
            num_hidden_layers=base.num_hidden_layers, rms_norm_eps=base.rms_norm_eps,
            rope_theta=base.rope_theta, rope_scaling=base.rope_scaling,
            max_position_embeddings=base.max_position_embeddings,
            norm_before_residual=bool(cfg.get("norm_before_residual", False)),
            aux_layer_ids=tuple(aux) if aux is not None else None,
            parallel_drafting=mask is not None, mask_token_id=int(mask) if mask is not None else None,
            attention_bias=attention_bias, o_proj_bias=attention_bias or bool(cfg.get("bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            norm_before_fc=bool(eagle.get("norm_before_fc", cfg.get("norm_before_fc", False))),
            fc_norm=bool(cfg.get("fc_norm", False)), norm_output=bool(cfg.get("norm_output", False)),
        )

    @classmethod
    def from_pretrained(cls, path: str) -> Eagle3Config:
        """From a head directory in any layout parspec reads (see ``head_formats``)."""
        from parspec.models.head_formats import read_head_config  # head_formats builds on this module

        return read_head_config(path)

    def to_dict(self) -> dict:
        """config.json in vLLM's LlamaForCausalLMEagle3 shape, readable by old and new vLLM."""
        cfg = {
            "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size, "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
            "norm_before_residual": self.norm_before_residual, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
        if self.attention_bias or self.o_proj_bias:
            cfg["attention_bias"] = self.attention_bias
            if self.o_proj_bias and not self.attention_bias:
                cfg["bias"] = True
        if self.mlp_bias:
            cfg["mlp_bias"] = True
        for flag in ("norm_before_fc", "fc_norm", "norm_output"):
            if getattr(self, flag):
                cfg[flag] = True
        if self.aux_layer_ids is not None:
            ids = list(self.aux_layer_ids)
            cfg["eagle_aux_hidden_state_layer_ids"] = ids  # read by some vLLM versions
            cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": ids}  # by others
        if self.parallel_drafting:
            # mask_token_id for current vLLM, ptd_token_id for older ones; parallel_drafting
            # is informational (the speculative config turns parallel drafting on).
            cfg["mask_token_id"] = cfg["ptd_token_id"] = self.mask_token_id
            cfg["parallel_drafting"] = True
        return cfg

    def layer_config(self) -> ModelConfig:
        return ModelConfig(architecture="LlamaForCausalLM", vocab_size=self.vocab_size,
                           hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                           num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                           rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                           max_position_embeddings=self.max_position_embeddings, attention_bias=self.attention_bias)


def _add_biases(layer: nn.Module, cfg: Eagle3Config) -> None:
    """vLLM's optional o_proj and MLP biases (q/k/v biases are built in by attention_bias)."""
    def biased(linear: nn.Linear) -> nn.Linear:
        return nn.Linear(linear.in_features, linear.out_features, bias=True)

    if cfg.o_proj_bias:
        layer.self_attn.o_proj = biased(layer.self_attn.o_proj)
    if cfg.mlp_bias:
        layer.mlp.gate_up_proj = biased(layer.mlp.gate_up_proj)
        layer.mlp.down_proj = biased(layer.mlp.down_proj)


class Eagle3FirstLayer(nn.Module):
    """Decoder layer whose attention reads [norm(embedding); norm(feature)]."""

    def __init__(self, cfg: Eagle3Config, rope: RotaryEmbedding):
        super().__init__()
        h = cfg.hidden_size
        self.norm_before_residual = cfg.norm_before_residual
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = PagedSelfAttention(h, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                            rope, bias=cfg.attention_bias, input_size=2 * h)
        self.mlp = GatedMLP(h, cfg.intermediate_size)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)

    def forward(self, positions, embeds, hidden, meta):
        embeds = self.input_layernorm(embeds)
        if self.norm_before_residual:
            hidden = self.hidden_norm(hidden)
            residual = hidden
        else:
            residual = hidden
            hidden = self.hidden_norm(hidden)
        hidden = self.self_attn(torch.cat([embeds, hidden], dim=-1), positions, meta)
        hidden, residual = self.post_attention_layernorm.add_forward(hidden, residual)
        return self.mlp(hidden), residual


class Eagle3Drafter(nn.Module):
    def __init__(self, cfg: Eagle3Config, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        n_aux, ht = cfg.num_aux, cfg.target_hidden_size
        rope = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings,
                               cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.input_norm = RMSNorm(n_aux * ht, cfg.rms_norm_eps) if cfg.norm_before_fc else None
        self.fc_norm = nn.ModuleList([RMSNorm(ht, cfg.rms_norm_eps) for _ in range(n_aux)]) if cfg.fc_norm else None
        self.fc = nn.Linear(n_aux * ht, cfg.hidden_size, bias=False)
        layer_cfg = cfg.layer_config()
        self.layers = nn.ModuleList([Eagle3FirstLayer(cfg, rope)] +
                                    [DecoderLayer(layer_cfg, rope) for _ in range(cfg.num_hidden_layers - 1)])
        for layer in self.layers:
            _add_biases(layer, cfg)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.ones(cfg.vocab_size, dtype=torch.bool))
        self.mask_hidden = nn.Parameter(torch.zeros(1, n_aux * ht)) if cfg.parallel_drafting else None

    @property
    def attention_layers(self) -> list[PagedSelfAttention]:
        return [layer.self_attn for layer in self.layers]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Concatenated target features (or mask_hidden) -> the drafter's width."""
        features = features.to(self.fc.weight.dtype)
        if self.input_norm is not None:
            features = self.input_norm(features)
        if self.fc_norm is not None:
            chunks = features.chunk(len(self.fc_norm), dim=-1)
            features = torch.cat([norm(c.contiguous()) for norm, c in zip(self.fc_norm, chunks)], dim=-1)
        return self.fc(features)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                meta) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden`` is projected target features or the drafter's own previous output.
        Returns (normed hidden for the logits, hidden fed to the next draft step: the
        pre-norm one, or with norm_output the normed one)."""
        embeds = self.embed_tokens(input_ids)
        hidden, residual = self.layers[0](positions, embeds, hidden, meta)
        for layer in self.layers[1:]:
            hidden, residual = layer(positions, hidden, residual, meta)
        normed, prenorm = self.norm.add_forward(hidden, residual)
        return normed, (normed if self.config.norm_output else prenorm)

    def compute_logits(self, normed: torch.Tensor) -> torch.Tensor:
        """Logits over the DRAFT vocabulary."""
        return self.lm_head(normed).float()

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def scatter_to_target(self, draft_probs: torch.Tensor) -> torch.Tensor:
        """Probabilities over the draft vocabulary -> over the target's (zero elsewhere)."""
        target_ids = self.draft_to_target(torch.arange(draft_probs.shape[-1], device=draft_probs.device))
        out = draft_probs.new_zeros(*draft_probs.shape[:-1], self.config.vocab_size)
        return out.index_copy_(-1, target_ids, draft_probs)


# --- checkpoint I/O ------------------------------------------------------------------------

BUFFERS = ("d2t", "t2d")


def load_eagle3(path: str, dtype: torch.dtype, device, target_embedding: nn.Embedding | None = None,
                max_positions: int | None = None, require_mask_hidden: bool = False) -> Eagle3Drafter:
    """A head in any layout ``head_formats.read_head`` reads. ``require_mask_hidden``: the
    caller drafts in parallel, so a P-EAGLE head without mask_hidden is an error."""
    from parspec.models.head_formats import read_head  # head_formats builds on this module

    cfg, tensors = read_head(path)
    if cfg.draft_vocab_size != cfg.vocab_size and "d2t" not in tensors:
        raise LoadError(f"drafter {path}: draft_vocab_size={cfg.draft_vocab_size} is smaller than "
                        f"vocab_size={cfg.vocab_size} but the checkpoint has no d2t mapping")
    if require_mask_hidden and "mask_hidden" not in tensors:
        raise LoadError(f"drafter {path}: parallel drafting needs mask_hidden, the checkpoint has none")
    model = build_on_device(Eagle3Drafter, cfg, dtype, device, max_positions=max_positions)
    shared_embedding = "embed_tokens.weight" not in tensors
    if shared_embedding:
        if target_embedding is None:
            raise LoadError(f"drafter {path} has no embed_tokens and no target embedding was given")
        model.embed_tokens = target_embedding
    for name in BUFFERS:
        if name in tensors:
            buf = tensors.pop(name)
            expected = getattr(model, name)
            if buf.shape != expected.shape:
                raise LoadError(f"drafter {path}: {name} has shape {tuple(buf.shape)}, expected {tuple(expected.shape)}")
            setattr(model, name, buf.to(device=device, dtype=expected.dtype))
        elif name == "d2t":
            model.d2t.zero_()
        else:
            model.t2d.fill_(True)
    load_weights(model, tensors.items(), skip_params=("embed_tokens.",) if shared_embedding else ())
    return model.eval()


def head_tensors(model: Eagle3Drafter, include_embedding: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors under vLLM's names: q/k/v and gate/up split, on the CPU."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("embed_tokens.") and not include_embedding:
            continue
        module = name.rsplit(".", 2)
        fused = module[-2] if len(module) == 3 else None
        if fused in ("qkv_proj", "gate_up_proj"):
            parts = [hf for hf, (f, _) in PACKED_MODULES.items() if f == fused]
            attn = model.get_submodule(module[0])
            sizes = [attn.q_size, attn.kv_size, attn.kv_size] if fused == "qkv_proj" else [tensor.shape[0] // 2] * 2
            for part, chunk in zip(parts, tensor.split(sizes, dim=0)):
                out[f"{module[0]}.{part}.{module[2]}"] = chunk
        else:
            out[name] = tensor
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def save_eagle3(model: Eagle3Drafter, path: str, include_embedding: bool = False) -> None:
    """Save in vLLM's layout (config.json + model.safetensors), which current and older
    vLLM load unchanged; ``head_formats.write_head`` writes the other layouts."""
    from parspec.models.head_formats import write_head

    config = model.config
    if config.parallel_drafting and model.mask_hidden is None:
        config = replace(config, parallel_drafting=False)
    write_head(config, head_tensors(model, include_embedding), path, "vllm")
