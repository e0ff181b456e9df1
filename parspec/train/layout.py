"""Which drafter entries a training batch holds, how they may attend, and how a long
sequence is cut into segments.

An entry is (sequence b, anchor p, depth d). Depth 0 is the REAL entry of position p:
token x[p+1], the target's feature f[p], position p. A depth-d entry (d >= 1) of anchor p
sits at position p + d and predicts x[p+2+d] from the target's distribution at p+1+d;
its input is a mask token + fc(mask_hidden) for P-EAGLE, or x[p+1+d] + the drafter's own
output of depth d-1 for EAGLE-3's training-time test. A P-EAGLE anchor drawn for refinement
(``Plan.slot_tokens``) feeds its depth-d entry a token in place of the mask: x[p+1+d] in
training (what a refinement pass sees where the drafts before it were right), the previous
pass's draft in evaluation. One rule covers all of them:

    entry e sees entry f  <=>  f is real and anchor(f) <= anchor(e)
                               or anchor(f) == anchor(e) and 1 <= depth(f) <= depth(e)

Sequence partition: segment [a, e) holds the real entries 0..e-1 (context, recomputed with
gradient) and the deeper entries of anchors a..e-1; its loss covers only its own anchors.
Since an entry of anchor p depends on nothing beyond real entries <= p and its own anchor's
chain, the sum of the segment losses (each normalised by whole-batch counts) is exactly
the whole-sequence loss, and so are the accumulated gradients."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from parspec.train.data import Batch, Captured

PAD = -1  # anchor and depth of a padding entry: it sees only itself, nobody sees it


@dataclass
class Plan:
    """The entries a batch trains: ``present[b, d, p]`` and loss weights ``weight[b, d, p]``
    (decay^d / number of scored depth-d entries in the whole batch; 0 where the target's
    top token is outside the draft vocabulary)."""

    present: torch.Tensor  # [B, K, A] bool
    weight: torch.Tensor  # [B, K, A] float32
    # P-EAGLE refinement: where refine[b, p], depth d >= 1 of anchor p takes slot_tokens[b, d, p]
    refine: torch.Tensor | None = None  # [B, A] bool
    slot_tokens: torch.Tensor | None = None  # [B, K, A] int64

    @property
    def num_depths(self) -> int:
        return self.present.shape[1]


def depth_keep_fractions(num_depths: int, keep: float, min_keep: float) -> list[float]:
    """P-EAGLE trains a random subset of anchors at depth d >= 1: keep^d of them, at least min_keep."""
    return [1.0] + [max(keep ** d, min_keep) for d in range(1, num_depths)]


def make_plan(batch: Batch, cap: Captured, num_depths: int, decay: float,
              keep_fractions: list[float] | None = None, generator: torch.Generator | None = None,
              greedy_only: bool = False, refine_share: float = 0.0,
              slot_tokens: torch.Tensor | None = None) -> Plan:
    """Entries with a label inside the sequence (p + 1 + d <= length - 1), optionally a
    nested seeded subset per depth: anchor p is kept at depth d when u[b, p] < fraction[d].

    ``greedy_only`` keeps depths d >= 1 only at anchors whose skipped tokens x[p+2..p+1+d]
    the target chose greedily (a greedy response, p >= prompt length - 2). A mask slot never
    sees those tokens, so elsewhere (prompt text, sampled responses) its label depends on
    tokens it cannot know; in greedy decoding it is only ever asked about greedy ones."""
    B, T = batch.tokens.shape
    A, K, device = T - 1, num_depths, batch.tokens.device
    p = torch.arange(A, device=device)
    d = torch.arange(K, device=device)
    present = p[None, None, :] <= batch.lengths[:, None, None] - 2 - d[None, :, None]
    if keep_fractions is not None:
        u = torch.rand(B, A, generator=generator).to(device)
        frac = torch.tensor(keep_fractions, device=device)
        present &= u[:, None, :] < frac[None, :, None]
    if greedy_only:
        clean = batch.greedy[:, None] & (p[None, :] >= batch.prompt_lens[:, None] - 2)  # [B, A]
        present[:, 1:] &= clean[:, None, :]
    label = (p[None, :] + 1 + d[:, None]).clamp(max=T - 1)  # [K, A]
    label_ok = cap.label_ok.gather(1, label.reshape(1, -1).expand(B, -1)).view(B, K, A)
    scored = present & label_ok
    counts = scored.sum(dim=(0, 2)).clamp(min=1).float()
    per_depth = decay ** d.float() / counts
    refine = None
    if refine_share >= 1:
        refine = torch.ones(B, A, dtype=torch.bool, device=device)
    elif refine_share > 0:
        refine = (torch.rand(B, A, generator=generator) < refine_share).to(device)
    if refine is not None and slot_tokens is None:
        slot_tokens = batch.tokens.gather(1, label.reshape(1, -1).expand(B, -1)).view(B, K, A)
    return Plan(present, scored.float() * per_depth[None, :, None], refine, slot_tokens if refine is not None else None)


def segment_bounds(num_anchors: int, segment_len: int) -> list[tuple[int, int]]:
    """[a, e) anchor ranges of ``segment_len`` (0: the whole sequence in one segment)."""
    if segment_len <= 0 or segment_len >= num_anchors:
        return [(0, num_anchors)]
    return [(a, min(a + segment_len, num_anchors)) for a in range(0, num_anchors, segment_len)]


@dataclass
class Entries:
    """A flat list of entries per sequence, all [B, N]."""

    token: torch.Tensor
    pos: torch.Tensor
    anchor: torch.Tensor
    depth: torch.Tensor
    label: torch.Tensor  # position whose target distribution is the label
    weight: torch.Tensor  # loss weight (0: context only)
    scored: torch.Tensor  # counted in the statistics (and in the loss where weight > 0)

    def __len__(self) -> int:
        return self.token.shape[1]

    @staticmethod
    def cat(parts: list[Entries]) -> Entries:
        return Entries(*(torch.cat([getattr(e, f.name) for e in parts], dim=1) for f in fields(Entries)))

    def mask(self) -> torch.Tensor:
        return attention_mask(self.anchor, self.depth)


def attention_mask(anchor: torch.Tensor, depth: torch.Tensor, key_anchor: torch.Tensor | None = None,
                   key_depth: torch.Tensor | None = None) -> torch.Tensor:
    """[B, Nq, Nk] boolean (True = may attend) from the rule in the module docstring.
    Keys default to the queries; given separately, the queries are the LAST Nq keys."""
    if key_anchor is None:
        key_anchor, key_depth = anchor, depth
    ae, af = anchor[:, :, None], key_anchor[:, None, :]
    de, df = depth[:, :, None], key_depth[:, None, :]
    allowed = ((df == 0) & (af <= ae)) | ((af == ae) & (df >= 1) & (df <= de))
    nq, nk = anchor.shape[1], key_anchor.shape[1]
    rows = torch.arange(nq, device=anchor.device)[:, None] + (nk - nq)
    itself = rows == torch.arange(nk, device=anchor.device)[None, :]
    return allowed | (itself & (depth < 0)[:, :, None])  # a padding row attends to itself: no NaN


def real_entries(batch: Batch, plan: Plan, a: int, e: int) -> Entries:
    """Real entries 0..e-1; only anchors a..e-1 are scored."""
    B = batch.tokens.shape[0]
    device = batch.tokens.device
    p = torch.arange(e, device=device).expand(B, e)
    own = p >= a
    return Entries(token=batch.tokens[:, 1:e + 1], pos=p, anchor=p, depth=torch.zeros_like(p), label=p + 1,
                   weight=plan.weight[:, 0, :e] * own, scored=plan.present[:, 0, :e] & own)


def deep_entries(plan: Plan, a: int, e: int, token_id: int) -> Entries:
    """P-EAGLE's mask entries (depths 1..K-1) of anchors a..e-1 that the plan keeps,
    compacted per sequence and padded to the longest; a refined anchor's carry its slot tokens."""
    present = plan.present[:, 1:, a:e]  # [B, K-1, S]
    B, Km1, S = present.shape
    flat = present.transpose(1, 2).reshape(B, S * Km1)  # anchor-major
    n = int(flat.sum(1).max()) if flat.numel() else 0
    if n == 0:
        empty = flat.new_zeros(B, 0, dtype=torch.int64)
        return Entries(empty, empty, empty, empty, empty, empty.float(), empty.bool())
    order = torch.argsort((~flat).to(torch.uint8), dim=1, stable=True)[:, :n]
    keep = flat.gather(1, order)
    anchor = torch.where(keep, a + order // Km1, PAD)
    depth = torch.where(keep, order % Km1 + 1, PAD)
    safe_a, safe_d = anchor.clamp(min=0), depth.clamp(min=0)
    rows = torch.arange(B, device=flat.device)[:, None]
    weight = plan.weight[rows, safe_d, safe_a] * keep
    token = torch.full_like(anchor, token_id)
    if plan.refine is not None:
        refined = keep & plan.refine[rows, safe_a]
        token = torch.where(refined, plan.slot_tokens[rows, safe_d, safe_a], token)
    return Entries(token=token, pos=torch.where(keep, safe_a + safe_d, 0),
                   anchor=anchor, depth=depth, label=torch.where(keep, safe_a + 1 + safe_d, 0),
                   weight=weight, scored=keep)


def step_entries(batch: Batch, plan: Plan, a: int, e: int, step: int, scored: bool) -> Entries:
    """EAGLE-3 TTT step ``step`` >= 1: one slot per anchor a..e-1 (token x[p+1+step]);
    slots the plan does not hold are padding."""
    T = batch.tokens.shape[1]
    p = torch.arange(a, e, device=batch.tokens.device)
    present = plan.present[:, step, a:e]
    own = present if scored else torch.zeros_like(present)
    label = (p + 1 + step).clamp(max=T - 1).expand_as(present)
    return Entries(token=batch.tokens[:, label[0]], pos=(p + step).expand_as(present),
                   anchor=torch.where(present, p, PAD), depth=torch.where(present, step, PAD),
                   label=label, weight=plan.weight[:, step, a:e] * own, scored=own)
