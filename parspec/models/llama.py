"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2/2.5 (qkv bias) and Qwen3 (q/k RMSNorm).

They differ only by config flags (ModelConfig.attention_bias, .qk_norm, rope scaling),
so one file serves all four; see config.SUPPORTED_ARCHITECTURES."""

from __future__ import annotations

import torch
from torch import nn

from parspec.attention import AttentionMetadata
from parspec.config import ModelConfig
from parspec.models.layers import GatedMLP, Linear, PagedSelfAttention, RMSNorm, RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        self.self_attn = PagedSelfAttention(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, rope,
            bias=cfg.attention_bias, qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, residual, meta):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm.add_forward(hidden, residual)
        hidden = self.self_attn(hidden, positions, meta)
        hidden, residual = self.post_attention_layernorm.add_forward(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        rope = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rope) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward() returns the final normed hidden states of the given tokens and, when
    ``aux_layers`` is non-empty, the residual stream at the INPUT of each of those layers
    (what EAGLE-3 and SPD drafters read); asking for none costs nothing."""

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_positions or cfg.max_position_embeddings)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head with the embedding; re-done after a meta-device build unties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def attention_layers(self) -> list[PagedSelfAttention]:
        return [layer.self_attn for layer in self.model.layers]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                aux_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
        hidden, residual = self.model.embed_tokens(input_ids), None
        captured = {}
        for i, layer in enumerate(self.model.layers):
            if i in aux_layers:
                captured[i] = hidden if residual is None else hidden + residual
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.model.norm.add_forward(hidden, residual)
        return hidden, [captured[i] for i in aux_layers]  # in the order asked, repeats allowed

    def forward_layers(self, hidden: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                       meta: AttentionMetadata, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layers ``[start, stop)`` only (one pipeline stage): the (hidden, residual) pair in and
        out, exactly as forward() passes it between layers (residual None before layer 0)."""
        for layer in self.model.layers[start:stop]:
            hidden, residual = layer(positions, hidden, residual, meta)
        return hidden, residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
