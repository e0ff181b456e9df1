"""An EAGLE-3 head as SPD's drafter on rank 0, chained from each row's last exited token.

The semantics are ``parspec.spd.simulate.Eagle3Drafting``'s, batched over the rows of SPD's one
micro-batch. Per row, anchor m = the last token that left the last stage (the newest position
whose target features exist) and x[m+1..q] its in-flight tokens, the entering one included
(w = q - m of them, 1..n). The draft of x[q+1] is

    step 0:          m's real entry: token x[m+1], hidden fc(aux features of m), position m
    step i=1..w-1:   chained entry:  token x[m+1+i], the previous step's output hidden, position m+i

and the last step's draft-vocabulary argmax (or sample) mapped to the target's vocabulary.

Keys/values live in dense per-row buffers ``[rows, max_positions + 1, kv_heads, head_dim]`` per
head attention layer, written at the query's position; a query attends to every position <= its
own. Real entries (the prompt's at prefill, each anchor's at step 0) stay; chained entries write
at m+1.. and are overwritten by the real entries of those positions once they exit, and a chain
writes each position before any of its passes reads it: the head's own positional rollback.

A row whose anchor moved since its last chain (an exit, verified or rejected) restarts: w passes.
Otherwise (the pipeline refilling after a rejection) its chain is extended: one pass, from the
output hidden kept per row. Passes run batched over all rows with one token each; a row with
nothing to do in a pass (it needs fewer, or keeps earlier steps) is padding: its token sits at the
spare position ``max_positions`` that no real query ever reads, and its state is not updated. The
schedule is known on the host, so drafting never waits for the device.

Drafting runs a *static* step (``forward_static``) so that the engine can capture it as one CUDA
graph per (rows, span): the eager loop launched each pass's dozens of kernels from Python and
made rank 0 host-bound. The static step always runs passes 0..n-1 (n = ``steps``, the most
in-flight tokens a row can have) over all rows; which row is real in which pass comes from
static device buffers (``schedule``: token, position, active per pass and row) that one
non-blocking copy fills before the step. Pass 0 reads ``project(anchor_aux)``, later passes the
previous pass's output hidden; inactive (row, pass)s keep their state (``torch.where``) and write
K/V only at the spare position. Attention covers a fixed span of the dense buffers (a power of
two from ``MIN_SPAN``, capped at the whole buffer; the host picks it from the largest real
position), masked by position, instead of a host-known end per pass; masked keys add exact
zeros, so the drafts equal the eager loop's (``draft_logits_eager``, kept as the reference) up
to float summation order. The step updates the chain state in place, so running it twice is
not running it once: a graph's warm-up and capture run it with ``idle_passes``.

``anchor_aux``, ``chain_hidden``, ``chain_normed`` and the K/V buffers keep their addresses for
the engine's lifetime (graphs read them); ``exited`` writes the anchors in place, so the caller
must order it after the previous draft (the engine runs it on the drafting stream)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from parspec.config import ConfigError, ModelConfig, read_json
from parspec.models.layers import DenseKV
from parspec.speculative.proposer import sample_drafts
from parspec.transfer import to_device


MIN_SPAN = 32  # the shortest attention span of the static step (spans double from here)


def is_eagle3_dir(path: str) -> bool:
    """Whether ``path`` holds an EAGLE-3 head rather than an SPD module (whose config.json
    names the ``SPDModule`` architecture and its ``num_stages``)."""
    cfg = read_json(os.path.join(path, "config.json"), "SPD drafter config.json")
    arch = (cfg.get("architectures") or [""])[0]
    return arch != "SPDModule" and "num_stages" not in cfg


@dataclass
class ChainPlan:
    """One row's drafting work this cycle: anchor position, in-flight tokens, first step to run."""

    anchor: int
    tokens: list[int]
    start: int


class Eagle3Chain:
    """The head, its per-row dense K/V and chain state, for up to ``max_rows`` rows whose chains
    are at most ``steps`` passes long (the pipeline's stages)."""

    def __init__(self, path: str, target: ModelConfig, embed_tokens, device: torch.device, dtype: torch.dtype,
                 max_rows: int, max_positions: int, steps: int):
        from parspec.models.drafter import Eagle3Config, load_eagle3
        from parspec.speculative.eagle import check_head_config, check_head_model, resolve_aux_layers

        cfg = Eagle3Config.from_pretrained(path)  # a P-EAGLE head drafts sequentially (mask_hidden unused)
        self.aux_layers = resolve_aux_layers(cfg, target, path)
        check_head_config(cfg, target, path, parallel=False)
        self.junk = max_positions  # the spare position padding passes write
        self.head = load_eagle3(path, dtype, device, target_embedding=embed_tokens, max_positions=max_positions + 1)
        check_head_model(self.head, target, self.aux_layers, path, parallel=False)
        self.device, self.dtype = device, dtype
        layers = self.head.attention_layers
        shape = (max_rows, max_positions + 1, layers[0].num_kv_heads, layers[0].head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        width, hidden = len(self.aux_layers) * target.hidden_size, self.head.config.hidden_size
        self.anchor_aux = torch.zeros(max_rows, width, dtype=dtype, device=device)  # aux features of each anchor
        self.chain_hidden = torch.zeros(max_rows, hidden, dtype=dtype, device=device)  # the last step's output
        self.chain_normed = torch.zeros(max_rows, hidden, dtype=dtype, device=device)  # ... normed, for logits
        self.steps = steps
        # the static step's schedule: token, position, active per pass and row; the first 3 * steps * b
        # elements, viewed [3, steps, b], are rows-bucket b's (contiguous: one plain copy fills them)
        self._schedule = torch.zeros(3 * steps * max_rows, dtype=torch.int64, device=device)
        self._buffers = {attn: (k, v) for attn, k, v in zip(layers, self.k, self.v)}

    # --- the head over dense per-row buffers ----------------------------------------------------
    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor, end: int):
        """One head forward over ``tokens``/``positions`` [B, T] (hidden [B*T, H]); ``end``: one past
        the largest real position (host-known). Returns (normed, output hidden), [B*T, H] each."""
        b, t = tokens.shape
        return self.head(tokens.flatten(), positions.flatten(), hidden, DenseKV(self._buffers, b, t, end))

    def _features(self, aux: torch.Tensor) -> torch.Tensor:
        """The activation's aux slots [T, A, H] -> concatenated in aux-layer order [T, A*H]."""
        return aux.reshape(aux.shape[0], -1)

    # --- the engine's interface ---------------------------------------------------------------
    def prefill(self, prompts: list[list[int]], back: torch.Tensor, cu: list[int]) -> None:
        """The prompts' real entries 0..L-2 (token x[p+1], features of p) of every row in one
        padded pass, and each row's first anchor (position L-1)'s aux features. ``back``: the
        last stage's prefill output [T, 2 + A, H], rows' positions at ``cu``."""
        b = len(prompts)
        aux = self._features(back[:, 2:])
        self.anchor_aux[:b] = aux[to_device([c - 1 for c in cu[1:]], torch.int64, self.device)]
        t = max(len(p) for p in prompts) - 1
        if t <= 0:
            return
        tokens = [[0] * t for _ in range(b)]
        positions = [[self.junk] * t for _ in range(b)]
        src = [[0] * t for _ in range(b)]
        for r, p in enumerate(prompts):
            for i in range(len(p) - 1):
                tokens[r][i], positions[r][i], src[r][i] = p[i + 1], i, cu[r] + i
        ids = to_device([tokens, positions, src], torch.int64, self.device)
        hidden = self.head.project(aux[ids[2].flatten()])
        self._run(ids[0], ids[1], hidden, t)

    def exited(self, rows: torch.Tensor, aux: torch.Tensor) -> None:
        """New anchors for ``rows``: the exit's aux slots [R, A, H], written in place (the static
        step's graphs read this buffer): the caller orders it after the previous draft's reads."""
        self.anchor_aux.index_copy_(0, rows, self._features(aux))

    # --- drafting -------------------------------------------------------------------------------
    def draft(self, plans: list[ChainPlan | None], sampling, generators, run=None):
        """Every row's draft (target vocabulary) [B] and its distribution q [B, V] (None when all
        greedy); ``plans[i]`` None: row i drafts nothing (its draft is junk). ``run``: runs the
        static step for a key (the engine's graph cache); default: ``forward_static``, eagerly."""
        logits = self.draft_logits(plans, run)
        if logits is None:
            return torch.zeros(len(plans), dtype=torch.int64, device=self.device), None
        return self._sample(logits, sampling, generators)

    def draft_logits(self, plans: list[ChainPlan | None], run=None) -> torch.Tensor | None:
        """The static path: the host-known schedule copied to the device in one non-blocking
        copy, then the static step for (rows, span). Draft-vocabulary logits [B, V'] (None when
        no row drafts)."""
        b = len(plans)
        table, end = self._table(plans, range(self.steps))
        if end == 0:
            return None
        host = table.pin_memory() if self.device.type == "cuda" else table
        self.schedule(b).copy_(host, non_blocking=True)
        return (run or self.forward_static)((b, self.span(end)))

    def schedule(self, b: int) -> torch.Tensor:
        """Rows-bucket ``b``'s schedule [3 (token, position, active), steps, b], a fixed view."""
        return self._schedule[:3 * self.steps * b].view(3, self.steps, b)

    def span(self, end: int) -> int:
        """The attention span for real positions < ``end``: a power of two (few graphs, little
        wasted attention), at most the whole buffer."""
        return min(max(MIN_SPAN, 1 << (end - 1).bit_length()), self.junk + 1)

    def forward_static(self, key: tuple[int, int]) -> torch.Tensor:
        """The static step for ``key`` = (rows b, attention span): passes 0..steps-1 over every
        row as ``schedule(b)`` says, the chain state updated in place. Fixed shapes and buffers,
        no host sync: capturable as a CUDA graph. Returns draft-vocabulary logits [b, V']."""
        b, span = key
        tokens, positions, active = self.schedule(b)
        for s in range(self.steps):
            self._pass(s == 0, tokens[s], positions[s], active[s], span)
        return self.head.compute_logits(self.chain_normed[:b])

    def _pass(self, first: bool, tokens: torch.Tensor, positions: torch.Tensor, active: torch.Tensor,
              span: int) -> None:
        """One pass over rows 0..b-1 (``tokens``, ``positions``, ``active``: [b]): pass 0 reads the
        anchors' projected aux features, later ones the previous output hidden; the chain state
        of active rows takes the new outputs, inactive rows keep theirs."""
        b = tokens.shape[0]
        hidden, normed = self.chain_hidden[:b], self.chain_normed[:b]
        source = self.head.project(self.anchor_aux[:b]) if first else hidden
        new_normed, new_hidden = self._run(tokens[:, None], positions[:, None], source, span)
        keep = active[:, None] != 0
        hidden.copy_(torch.where(keep, new_hidden, hidden))
        normed.copy_(torch.where(keep, new_normed, normed))

    @contextmanager
    def idle_passes(self, b: int):
        """Rows-bucket ``b``'s schedule made all padding for the duration, then restored (device
        work only, no host sync): a graph's warm-up and capture run the step more than once,
        which only idle passes (writing the spare position alone) survive unchanged."""
        schedule = self.schedule(b)
        saved = schedule.clone()
        schedule[0].zero_()
        schedule[1].fill_(self.junk)
        schedule[2].zero_()
        try:
            yield
        finally:
            schedule.copy_(saved)

    def draft_logits_eager(self, plans: list[ChainPlan | None]) -> torch.Tensor | None:
        """The reference the static step must match: only the passes some row needs, each over
        the dense buffers up to its host-known end. Same state updates, same logits."""
        b = len(plans)
        live = [p for p in plans if p is not None]
        if not live:
            return None
        steps = range(min(p.start for p in live), max(len(p.tokens) for p in live))
        table, _ = self._table(plans, steps)
        ends = [max([p + 1 for p, a in zip(pos, act) if a], default=1) for pos, act in zip(*table[1:].tolist())]
        table = table.to(self.device)
        for s_i, s in enumerate(steps):
            self._pass(s == 0, table[0, s_i], table[1, s_i], table[2, s_i], ends[s_i])
        return self.head.compute_logits(self.chain_normed[:b])

    def _table(self, plans: list[ChainPlan | None], steps: range) -> tuple[torch.Tensor, int]:
        """The host schedule [3 (token, position, active), len(steps), B] of passes ``steps``
        and one past the largest real position (0: no real pass). Padding: token 0 at ``junk``."""
        b, n = len(plans), len(steps)
        tok, pos, act = [0] * (n * b), [self.junk] * (n * b), [0] * (n * b)
        end = 0
        for r, p in enumerate(plans):
            if p is None:
                continue
            if len(p.tokens) > self.steps:
                raise ValueError(f"row {r} has {len(p.tokens)} in-flight tokens, more than {self.steps} passes")
            for s in range(max(p.start, steps.start), min(len(p.tokens), steps.stop)):
                i = (s - steps.start) * b + r
                tok[i], pos[i], act[i] = p.tokens[s], p.anchor + s, 1
                end = max(end, p.anchor + s + 1)
        return torch.tensor(tok + pos + act, dtype=torch.int64).view(3, n, b), end

    def _sample(self, logits: torch.Tensor, sampling, generators):
        """Draft-vocabulary logits [B, V'] -> drafts in the target's vocabulary [B] and q [B, V]."""
        ids, q = sample_drafts(logits[:, None], sampling, generators)
        return self.head.draft_to_target(ids[:, 0]), None if q is None else self.head.scatter_to_target(q[:, 0])


def plan_rows(rows, drafting) -> list[ChainPlan | None]:
    """Each row's ChainPlan (indexed by row), updating its chain bookkeeping: a restart (w
    passes) when its anchor moved since the last chain, else one pass extending it.
    ``drafting(row)``: whether the row drafts this cycle."""
    plans: list[ChainPlan | None] = [None] * len(rows)
    for r in rows:
        if not drafting(r):
            continue
        tokens = [t.token for t in r.inflight]
        anchor = r.inflight[0].position - 1
        start = r.chain_len if r.chain_anchor == anchor and r.chain_len < len(tokens) else 0
        plans[r.index] = ChainPlan(anchor, tokens, start)
        r.chain_anchor, r.chain_len = anchor, len(tokens)
    return plans


def check_spd_head(path: str, target: ModelConfig) -> None:
    """Config-only checks of an EAGLE-3 head for this target, before any process starts."""
    from parspec.models.drafter import Eagle3Config
    from parspec.speculative.eagle import check_head_config, resolve_aux_layers

    try:
        cfg = Eagle3Config.from_pretrained(path)
    except ConfigError as e:
        raise ConfigError(f"speculative method 'spd': {path} is neither an SPD module (architectures "
                          f"['SPDModule']) nor an EAGLE-3 head: {e}") from e
    resolve_aux_layers(cfg, target, path)
    check_head_config(cfg, target, path, parallel=False)
