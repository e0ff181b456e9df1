"""The drafter's training objective over one segment of a batch, for both methods.

Loss per scored entry: KL(target || drafter) over the draft vocabulary, the target's
distribution restricted to the draft tokens and renormalised; entries whose target top
token is outside the draft vocabulary carry no loss (they still count, as misses, in the
accuracy). Depth d is weighted decay^d and averaged over the whole batch's depth-d
entries (weights come from the Plan), so segment losses add up to the batch loss.
All positions of a sequence are trained, prompt included: the labels are the target's
own distributions, which are as valid on the prompt as on the response."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parspec.models.layers import GrowingKV
from parspec.train.data import Batch, Captured
from parspec.train.layout import Entries, Plan, attention_mask, deep_entries, real_entries, step_entries


@dataclass
class DepthStats:
    """Per-depth sums on the device (read once per step): KL over entries with a label in
    the draft vocabulary, top-1 hits against the target's argmax over all scored entries.
    ``chain[b, d, p]``: the drafter's top-1 equals the actual next token (for the
    acceptance-length estimate) and ``draft[b, d, p]`` that top-1 (the next refinement pass's
    slot token); kept only when asked."""

    kl_sum: torch.Tensor
    kl_count: torch.Tensor
    hits: torch.Tensor
    count: torch.Tensor
    chain: torch.Tensor | None = None
    draft: torch.Tensor | None = None

    @classmethod
    def zeros(cls, num_depths: int, device, chain_shape: tuple[int, int, int] | None = None) -> DepthStats:
        z = lambda: torch.zeros(num_depths, dtype=torch.float64, device=device)  # noqa: E731
        if not chain_shape:
            return cls(z(), z(), z(), z())
        return cls(z(), z(), z(), z(), torch.zeros(chain_shape, dtype=torch.bool, device=device),
                   torch.zeros(chain_shape, dtype=torch.int64, device=device))

    def add(self, other: DepthStats) -> None:
        for name in ("kl_sum", "kl_count", "hits", "count"):
            getattr(self, name).add_(getattr(other, name))

    def summary(self) -> dict:
        kl = (self.kl_sum / self.kl_count.clamp(min=1)).tolist()
        acc = (self.hits / self.count.clamp(min=1)).tolist()
        return {"kl": kl, "acc": acc, "count": self.count.long().tolist()}


def chain_multiplier(logits: torch.Tensor, cap: Captured, b: torch.Tensor, label: torch.Tensor,
                     anchor: torch.Tensor, depth: torch.Tensor, grid: tuple[int, int, int],
                     strength: float) -> torch.Tensor:
    """Per-entry loss multiplier ``1 - strength + strength * prod_{j<d} q_j`` (no gradient):
    q_j is the drafter's probability of the target's top token at depth j of the same anchor,
    0 where that token is outside the draft vocabulary or the entry is not scored here. In
    greedy decoding a slot's draft counts only when every shallower slot of its step was
    accepted, so this spends a slot's capacity where its shallower slots are likely right.
    All depths of an anchor sit in one segment, so the sequence partition stays exact."""
    with torch.no_grad():
        top = cap.probs[b, label].argmax(-1)
        q = logits.float().softmax(-1).gather(1, top[:, None])[:, 0] * cap.label_ok[b, label]
        right = q.new_zeros(grid)  # [sequences, depths, anchors]
        right[b, depth, anchor] = q
        before = torch.cat([torch.ones_like(right[:, :1]), right[:, :-1].cumprod(dim=1)], dim=1)
        return 1.0 - strength + strength * before[b, depth, anchor]


def score(drafter, normed: torch.Tensor, ent: Entries, batch: Batch, cap: Captured,
          stats: DepthStats, chain: tuple[int, float] | None = None) -> torch.Tensor:
    """Weighted KL of the scored entries; statistics into ``stats``. ``chain`` =
    (number of depths, strength) scales each entry by ``chain_multiplier``."""
    B, T = batch.tokens.shape
    b, n = ent.scored.nonzero(as_tuple=True)
    if b.numel() == 0:
        return normed.sum() * 0.0
    logits = drafter.compute_logits(normed[b, n])
    label = ent.label[b, n]
    # Soft-label cross-entropy (one fused op) minus the target's entropy = the KL.
    kl = F.cross_entropy(logits, cap.probs[b, label], reduction="none") - cap.entropy[b, label]
    weight = ent.weight[b, n]
    if chain is not None:
        num_depths, strength = chain
        weight = weight * chain_multiplier(logits, cap, b, label, ent.anchor[b, n], ent.depth[b, n],
                                           (B, num_depths, T), strength)
    loss = (kl * weight).sum()
    with torch.no_grad():
        depth = ent.depth[b, n]
        ok = cap.label_ok[b, label]
        pred = drafter.draft_to_target(logits.argmax(-1))
        stats.kl_sum.index_add_(0, depth, torch.where(ok, kl.detach(), 0).double())
        stats.kl_count.index_add_(0, depth, ok.double())
        stats.hits.index_add_(0, depth, (pred == cap.top1[b, label]).double())
        stats.count.index_add_(0, depth, torch.ones_like(kl, dtype=torch.float64))
        if stats.chain is not None:
            actual = batch.tokens[b, (label + 1).clamp(max=T - 1)]
            stats.chain[b, depth, ent.anchor[b, n]] = (pred == actual) & (label + 1 < batch.lengths[b])
            stats.draft[b, depth, ent.anchor[b, n]] = pred
    return loss


def peagle_forward(drafter, batch: Batch, cap: Captured, plan: Plan, a: int, e: int,
                   mask_token_id: int) -> tuple[torch.Tensor, Entries]:
    """All depths of anchors a..e-1 in one forward: real context 0..e-1, then mask entries."""
    real = real_entries(batch, plan, a, e)
    deep = deep_entries(plan, a, e, mask_token_id)
    ent = Entries.cat([real, deep])
    hidden = drafter.project(cap.features[:, :e])
    if len(deep):
        mask_hidden = drafter.project(drafter.mask_hidden).to(hidden.dtype)
        hidden = torch.cat([hidden, mask_hidden.expand(hidden.shape[0], len(deep), -1)], dim=1)
    normed, _ = drafter(ent.token, ent.pos, hidden, ent.mask())
    return normed, ent


def ttt_forward(drafter, batch: Batch, cap: Captured, plan: Plan, a: int, e: int):
    """EAGLE-3 training-time test; yields (normed, entries) of step 0, 1, ... in turn.

    Step 0 runs the real entries 0..e-1. Step i >= 1 runs one slot per anchor a..e-1:
    token x[p+1+i], the anchor's step i-1 output (pre-norm) as hidden, position p+i;
    it attends to the real entries <= p and to its anchor's slots of steps 1..i, whose
    keys/values the earlier steps left behind."""
    real = real_entries(batch, plan, a, e)
    keys, kept = [real], {}  # kept: each attention layer's keys/values of the steps so far
    normed, prenorm = drafter(real.token, real.pos, drafter.project(cap.features[:, :e]),
                              GrowingKV(real.mask(), kept))
    yield normed, real
    previous = prenorm[:, a:e]
    for i in range(1, plan.num_depths):
        if not plan.present[:, i, a:e].any():
            return  # deeper steps have even fewer anchors
        step = step_entries(batch, plan, a, e, i, scored=True)
        keys.append(step)
        mask = attention_mask(step.anchor, step.depth, torch.cat([k.anchor for k in keys], dim=1),
                              torch.cat([k.depth for k in keys], dim=1))
        normed, previous = drafter(step.token, step.pos, previous, GrowingKV(mask, kept))
        yield normed, step


def segment_loss(method: str, drafter, batch: Batch, cap: Captured, plan: Plan, a: int, e: int,
                 mask_token_id: int | None, stats: DepthStats, chain_weight: float = 0.0) -> torch.Tensor:
    if method == "p-eagle":
        normed, ent = peagle_forward(drafter, batch, cap, plan, a, e, mask_token_id)
        chain = (plan.num_depths, chain_weight) if chain_weight > 0 else None
        return score(drafter, normed, ent, batch, cap, stats, chain)
    loss = 0.0
    for normed, ent in ttt_forward(drafter, batch, cap, plan, a, e):
        loss = loss + score(drafter, normed, ent, batch, cap, stats)
    return loss
