"""How a target's layers split into pipeline stages, and what a feature "at depth s" is.

Stage i (0-based) of n owns layers ``[bounds[i], bounds[i+1])``; earlier stages take the
extra layer when the split is uneven. A token at depth s has been through stages 0..s-1:
its feature is the residual stream at the INPUT of layer ``bounds[s]`` (the hidden plus the
residual, as EAGLE-3 captures its aux layers); depth n is the stream after the last layer,
before the final norm; depth 0 is the token's embedding.

The split is chosen to agree with the 8B expansion (`parspec.bench.expand.spread_layers`):
the reference target's 5 layers split into 2 stages at layer 3 and into 4 at layers 2, 3, 4,
and the expanded 32 layers split evenly (16 / 8) have the same original layers in each stage,
so a speculation module trained on the fixture drives the expanded pair unchanged."""

from __future__ import annotations


def stage_bounds(num_layers: int, num_stages: int) -> list[int]:
    """Layer index where each stage starts, then ``num_layers``: ``num_stages + 1`` values."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"pipeline_parallel_size={num_stages} must be between 1 and the model's "
                         f"{num_layers} layers")
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for i in range(num_stages):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return bounds
