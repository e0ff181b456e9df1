"""The EAGLE-3 drafter, and P-EAGLE's parallel-drafting variant of it.

Checkpoint layout (what vLLM and SafeAILab's EAGLE load): config.json in the
LlamaForCausalLMEagle3 style and safetensors holding
  fc.weight                 [H, n_aux * H_target]  target features -> drafter width
  layers.N.* / midlayer.*   decoder layer(s); layer 0's attention reads [embedding; feature] (2H)
  norm.weight, lm_head.weight [draft_vocab, H]
  d2t [draft_vocab] int64   target id = draft id + d2t[draft id]
  t2d [target_vocab] bool   target token is in the draft vocabulary
  embed_tokens.weight       optional; else the target's embedding is shared
  mask_hidden [1, n_aux * H_target]   P-EAGLE only: the feature of a mask slot

Entry ``p`` of the drafter combines the target's feature of position ``p`` with the
token at ``p + 1`` and predicts the token at ``p + 2``."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn

from parspec.config import ConfigError, ModelConfig, read_json
from parspec.loader import LoadError, iter_safetensors, load_weights, safetensors_files
from parspec.models.layers import PACKED_MODULES, GatedMLP, PagedSelfAttention, RMSNorm, RotaryEmbedding
from parspec.models.llama import DecoderLayer

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM", "LlamaForCausalLM")


def default_aux_layers(num_target_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's choice: inputs of layers 2, L//2 and L-3 (low, middle, high features)."""
    return (2, num_target_layers // 2, num_target_layers - 3)


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
    parallel_drafting: bool = False
    mask_token_id: int | None = None

    def __post_init__(self):
        if self.draft_vocab_size > self.vocab_size:
            raise ConfigError(f"drafter config: draft_vocab_size={self.draft_vocab_size} exceeds "
                              f"vocab_size={self.vocab_size}")
        if self.parallel_drafting and self.mask_token_id is None:
            raise ConfigError("drafter config: parallel_drafting needs mask_token_id")

    @classmethod
    def from_dict(cls, cfg: dict) -> Eagle3Config:
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
        aux = eagle.get("eagle_aux_hidden_state_layer_ids", cfg.get("eagle_aux_hidden_state_layer_ids"))
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
            parallel_drafting=bool(cfg.get("parallel_drafting", False)),
            mask_token_id=cfg.get("mask_token_id"),
        )

    @classmethod
    def from_pretrained(cls, path: str) -> Eagle3Config:
        if not os.path.isdir(path):
            raise LoadError(f"drafter directory not found: {path}")
        return cls.from_dict(read_json(os.path.join(path, "config.json"), "drafter config.json"))

    def to_dict(self) -> dict:
        """config.json in vLLM's LlamaForCausalLMEagle3 shape."""
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
        if self.aux_layer_ids is not None:
            cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids)}
        if self.parallel_drafting:
            cfg["parallel_drafting"] = True
            cfg["mask_token_id"] = self.mask_token_id
        return cfg

    def layer_config(self) -> ModelConfig:
        return ModelConfig(architecture="LlamaForCausalLM", vocab_size=self.vocab_size,
                           hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                           num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                           num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
                           rms_norm_eps=self.rms_norm_eps, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                           max_position_embeddings=self.max_position_embeddings)


class Eagle3FirstLayer(nn.Module):
    """Decoder layer whose attention reads [norm(embedding); norm(feature)]."""

    def __init__(self, cfg: Eagle3Config, rope: RotaryEmbedding):
        super().__init__()
        h = cfg.hidden_size
        self.norm_before_residual = cfg.norm_before_residual
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = PagedSelfAttention(h, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                            rope, input_size=2 * h)
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
        n_aux = len(cfg.aux_layer_ids) if cfg.aux_layer_ids is not None else 3
        rope = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings,
                               cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.fc = nn.Linear(n_aux * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        layer_cfg = cfg.layer_config()
        self.layers = nn.ModuleList([Eagle3FirstLayer(cfg, rope)] +
                                    [DecoderLayer(layer_cfg, rope) for _ in range(cfg.num_hidden_layers - 1)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.int64))
        self.register_buffer("t2d", torch.ones(cfg.vocab_size, dtype=torch.bool))
        self.mask_hidden = nn.Parameter(torch.zeros(1, n_aux * cfg.target_hidden_size)) if cfg.parallel_drafting else None

    @property
    def attention_layers(self) -> list[PagedSelfAttention]:
        return [layer.self_attn for layer in self.layers]

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Concatenated target features (or mask_hidden) -> the drafter's width."""
        return self.fc(features.to(self.fc.weight.dtype))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor,
                meta) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden`` is projected target features or the drafter's own previous output.
        Returns (normed hidden for the logits, pre-norm hidden fed to the next draft step)."""
        embeds = self.embed_tokens(input_ids)
        hidden, residual = self.layers[0](positions, embeds, hidden, meta)
        for layer in self.layers[1:]:
            hidden, residual = layer(positions, hidden, residual, meta)
        normed, prenorm = self.norm.add_forward(hidden, residual)
        return normed, prenorm

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

def _rename_checkpoint(name: str) -> str:
    """EAGLE's `midlayer.*` (one layer) and vLLM's `layers.N.*`, with or without `model.`."""
    if name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("midlayer."):
        name = "layers.0." + name[len("midlayer."):]
    return name


BUFFERS = ("d2t", "t2d")


def load_eagle3(path: str, dtype: torch.dtype, device, target_embedding: nn.Embedding | None = None,
                max_positions: int | None = None) -> Eagle3Drafter:
    cfg = Eagle3Config.from_pretrained(path)
    files = safetensors_files(path)
    tensors = dict((_rename_checkpoint(n), t) for n, t in iter_safetensors(files))
    if cfg.draft_vocab_size != cfg.vocab_size and "d2t" not in tensors:
        raise LoadError(f"drafter {path}: draft_vocab_size={cfg.draft_vocab_size} is smaller than "
                        f"vocab_size={cfg.vocab_size} but the checkpoint has no d2t mapping")
    if cfg.parallel_drafting and "mask_hidden" not in tensors:
        raise LoadError(f"drafter {path}: parallel_drafting is set but the checkpoint has no mask_hidden")
    with torch.device("meta"):
        model = Eagle3Drafter(cfg, max_positions)
    model = model.to_empty(device=device).to(dtype)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
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
    skip = {"embed_tokens.weight"} if shared_embedding else set()
    load_weights(model, ((n, t) for n, t in tensors.items()),
                 rename=lambda n: None if n in skip else n, skip_params=("embed_tokens.",) if shared_embedding else ())
    return model.eval()


def save_eagle3(model: Eagle3Drafter, path: str, include_embedding: bool = False) -> None:
    """Save in vLLM's layout: config.json + model.safetensors, q/k/v and gate/up split."""
    os.makedirs(path, exist_ok=True)
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
    out = {k: v.detach().contiguous().cpu() for k, v in out.items()}
    save_file(out, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=2)
