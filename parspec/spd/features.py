"""The target's residual stream at every stage boundary, from one dense forward.

Training and the acceptance simulator read the feature of a token at depth s (the stream at
the input of layer ``bounds[s]``; depth n: after the last layer, before the final norm) for
every position of whole sequences at once: one causal forward of the target captures them
all, since a token's feature at any depth depends only on the tokens up to it."""

from __future__ import annotations

import torch


def _stream(hidden: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return hidden if residual is None else hidden + residual


@torch.no_grad()
def depth_features(target, tokens: torch.Tensor, bounds: list[int],
                   logits: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [B, L]`` (right padding needs no mask: no real position attends to a later
    one) -> (features ``[B, L, n, H]``, entry s-1 the stream at depth s = 1..n; the target's
    float32 logits ``[B, L, V]``, or with ``logits=False`` its final normed hidden states, for
    a caller that needs the logits of a few positions only)."""
    B, L = tokens.shape
    positions = torch.arange(L, device=tokens.device).expand(B, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=tokens.device).tril()
    inner = set(bounds[1:-1])
    hidden, residual = target.model.embed_tokens(tokens), None
    feats = []
    for i, layer in enumerate(target.model.layers):
        if i in inner:
            feats.append(_stream(hidden, residual))
        hidden, residual = layer(positions, hidden, residual, causal)
    normed, stream = target.model.norm.add_forward(hidden, residual)
    feats.append(stream)
    return torch.stack(feats, dim=2), target.compute_logits(normed) if logits else normed
