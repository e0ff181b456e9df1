"""The SPD cycle replayed in one process, token by token, to measure a module's acceptance.

A :class:`StagedTarget` holds one sequence's keys/values per layer in dense buffers indexed by
position and runs the target one stage at a time on one token, exactly as a pipeline stage
would: it writes the token's K/V at its position, then attends to positions <= it. So a
corrected token overwrites a rejected draft's slot and stale slots past it are never read,
the same positional rollback the pipeline relies on; the emitted tokens equal plain greedy
decoding only if that holds (``benchmarks/spd_acceptance.py`` and the tests check it).

The cycle (the contract in parspec/spd/partition.py and the runtime's): every cycle the
token entering stage 0 and every in-flight token advance one stage; the module drafts the
next entering token from the window [last exited token at depth n, in-flight tokens at their
depths, the entering token at depth 0]; the token reaching depth n exits and its logits give
the target's next token, which verifies the oldest in-flight draft (greedy: argmax match).
A mismatch drops every in-flight token, and the target's token enters stage 0 next cycle.

Per cycle at most one token is emitted (the exiting token's verdict), so with n stages
plain pipelined decoding of one sequence emits 1/n token per cycle, and SPD's ideal
speed-up over it is ``tokens per cycle x n`` (a cycle = the slowest stage, the module off the
critical path; transfers ignored). The same figure is the ideal speed-up over single-device
autoregressive decoding when the stages split the layers evenly.

Two drafters fill the "draft the next entering token" step (``simulate_sequence`` takes
either): the SPD speculation module (:class:`ModuleDrafter`, the window above), or an
EAGLE-3 head (:class:`Eagle3Drafting`) chained from the last exited token m, the newest
token whose target features exist (its aux-layer features are recorded as it crosses the
stages). EAGLE-3's convention (``parspec.speculative.eagle``, ``parspec.train.layout``):
drafter entry p pairs the target's aux features of position p with token x[p+1], sits at
position p and predicts x[p+2]; a chained step feeds the next token with the previous
step's own output hidden state, one position further. With in-flight tokens x[m+1..q]
(q: the entering token's position, w = q - m of them) the draft of x[q+1] is

    step 0:          real entry m    (token x[m+1], fc(aux features of m))  -> predicts x[m+2]
    step i=1..w-1:   chained entry   (token x[m+1+i], step i-1's hidden)    -> predicts x[m+2+i]

so the draft for window w is EAGLE-3's w-th sequential draft after the exited prefix (the
chained tokens are the in-flight tokens, themselves earlier drafts, verified or not yet).
Real entries keep their keys/values in dense per-position buffers; chained entries write
theirs at positions m+1.. which the real entries overwrite once those tokens exit (the same
positional rollback as the target's). When an exit moves the anchor, the chain restarts:
w sequential single-token drafter passes in that cycle (w = n in steady state); a cycle
without an exit (pipeline fill after a rejection) only extends the chain by one pass. The
ideal speed-up assumes those passes fit beside one stage (``SequenceResult.drafter_passes``
counts them per cycle)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parspec.models.layers import DenseKV
from parspec.spd.features import _stream


class StagedTarget:
    """One sequence's pass through the target, stage by stage, over dense per-layer K/V.

    With ``aux_layers``, ``aux[p]`` ([len(aux_layers), H]) records the residual stream at the
    INPUT of each of those layers for position p as the token there crosses them (the
    features ``LlamaForCausalLM.forward(aux_layers=...)`` returns, in the order asked);
    like the K/V, a later token at p overwrites them."""

    def __init__(self, target, bounds: list[int], max_len: int, aux_layers: tuple[int, ...] = ()):
        self.target, self.bounds = target, bounds
        layers = target.model.layers
        attn = layers[0].self_attn
        p = next(target.parameters())
        shape = (max_len, attn.num_kv_heads, attn.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in layers]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in layers]
        self.aux_layers = tuple(aux_layers)
        hidden_size = target.model.embed_tokens.embedding_dim
        self.aux = torch.zeros(max_len, len(self.aux_layers), hidden_size, dtype=p.dtype, device=p.device)

    def _layer(self, i: int, hidden, residual, pos: torch.Tensor):
        layer = self.target.model.layers[i]
        for j, aux_layer in enumerate(self.aux_layers):
            if aux_layer == i:
                self.aux[pos, j] = _stream(hidden, residual)
        if residual is None:
            residual, hidden = hidden, layer.input_layernorm(hidden)
        else:
            hidden, residual = layer.input_layernorm.add_forward(hidden, residual)
        attn = layer.self_attn
        q, k, v = attn.project_qkv(hidden, pos)  # [T, heads, D]
        self.k[i][pos], self.v[i][pos] = k, v  # write first: a token attends to itself
        end = int(pos[-1]) + 1
        mask = torch.arange(end, device=pos.device)[None, :] <= pos[:, None]
        o = attn._dense_attention(q, self.k[i][:end], self.v[i][:end], mask)
        hidden = attn.o_proj(o.reshape(len(pos), attn.q_size))
        hidden, residual = layer.post_attention_layernorm.add_forward(hidden, residual)
        return layer.mlp(hidden), residual

    @torch.no_grad()
    def run_stage(self, stage: int, state, pos: torch.Tensor):
        """Stage ``stage`` on ``state``: token ids [T] for stage 0, else the (hidden, residual)
        pair the previous stage produced; returns the pair."""
        if stage == 0:
            hidden, residual = self.target.model.embed_tokens(state), None
        else:
            hidden, residual = state
        for i in range(self.bounds[stage], self.bounds[stage + 1]):
            hidden, residual = self._layer(i, hidden, residual, pos)
        return hidden, residual

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor):
        """The whole prompt through every stage; the (hidden, residual) pair of each position."""
        pos = torch.arange(len(tokens), device=tokens.device)
        state = tokens
        for s in range(len(self.bounds) - 1):
            state = self.run_stage(s, state, pos)
        return state

    @torch.no_grad()
    def exit_logits(self, state) -> torch.Tensor:
        normed, _ = self.target.model.norm.add_forward(*state)
        return self.target.compute_logits(normed)


@dataclass
class InFlight:
    token: int
    pos: int
    depth: int = 0
    state: tuple | None = None
    window: int | None = None  # the window size d (in-flight tokens) it was drafted from; None: a final token


@dataclass
class SequenceResult:
    tokens: list[int]  # emitted, the first from the prefill
    cycles: int  # from the first token entering stage 0 to the exit that emitted the last token
    verified: list[int] = field(default_factory=list)  # per window size d = 1..n: drafts verified
    accepted: list[int] = field(default_factory=list)  # ... and accepted
    drafter_passes: list[int] = field(default_factory=list)  # per cycle: sequential drafter forwards


def _window(module, last: InFlight, last_feat: torch.Tensor, inflight: list[InFlight], n: int, device,
            history: list[tuple[int, torch.Tensor]] = ()):
    """The module's inputs for one window: ``history`` (the verified tokens before ``last`` and
    their final features, oldest first) in the C context slots, then the in-flight part
    left-padded to n + 1 slots."""
    H, C = last_feat.shape[-1], getattr(module.config, "context", 0)
    T = C + n + 1
    ids = torch.zeros(1, T, dtype=torch.long, device=device)
    depths = torch.full((1, T), -1, dtype=torch.long, device=device)
    feats = torch.zeros(1, T, H, dtype=last_feat.dtype, device=device)
    for k, (token, feat) in enumerate(reversed(history[-C:] if C else []), start=1):
        ids[0, C - k], depths[0, C - k], feats[0, C - k] = token, n, feat
    start = C + n - len(inflight)
    ids[0, start], depths[0, start], feats[0, start] = last.token, n, last_feat
    for i, tok in enumerate(inflight, start + 1):
        ids[0, i], depths[0, i] = tok.token, tok.depth
        if tok.depth > 0:
            feats[0, i] = _stream(*tok.state)[0]
    return ids, depths, feats


class ModuleDrafter:
    """The SPD speculation module as the cycle's drafter: the window of the module docstring."""

    aux_layers: tuple[int, ...] = ()

    def __init__(self, module):
        self.module = module
        self.num_stages, self.stage_bounds = module.config.num_stages, module.config.stage_bounds
        self.context = getattr(module.config, "context", 0)

    def start(self, staged: StagedTarget, prompt: list[int], state, first: int) -> None:
        self.passes = 0
        stream, C = _stream(*state), self.context
        self.last, self.last_feat = InFlight(prompt[-1], len(prompt) - 1), stream[-1]
        self.history = [(prompt[p], stream[p]) for p in range(max(0, len(prompt) - 1 - C), len(prompt) - 1)]

    def draft(self, inflight: list[InFlight]) -> int:
        ids, depths, feats = _window(self.module, self.last, self.last_feat, inflight, self.num_stages,
                                     self.last_feat.device, self.history)
        self.passes += 1
        return int(self.module(ids, depths, feats)[0].argmax())

    def exited(self, out: InFlight, verdict: int) -> None:
        C = self.context
        self.history = (self.history + [(self.last.token, self.last_feat)])[-C:] if C else []
        self.last, self.last_feat = out, _stream(*out.state)[0]


@dataclass
class _ChainStep:
    token: int
    normed: torch.Tensor  # [H] for the draft logits
    hidden: torch.Tensor  # [H] fed to the next chained step


class Eagle3Drafting:
    """An EAGLE-3 head as the cycle's drafter, chained from the last exited token (see the
    module docstring). Per sequence: dense per-position keys/values of the head's layers;
    ``passes`` counts the single-token drafter forwards the cycles ran (prefill excluded)."""

    def __init__(self, head, aux_layers: tuple[int, ...], stage_bounds: list[int]):
        self.head, self.aux_layers = head, tuple(aux_layers)
        self.stage_bounds = list(stage_bounds)
        self.num_stages = len(self.stage_bounds) - 1

    @classmethod
    def load(cls, path: str, target, stage_bounds: list[int], dtype: torch.dtype = torch.float32,
             max_positions: int | None = None) -> Eagle3Drafting:
        """The head at ``path`` with its aux layers resolved as the engine does."""
        from parspec.models.drafter import Eagle3Config, load_eagle3
        from parspec.speculative.eagle import resolve_aux_layers

        device = next(target.parameters()).device
        aux = resolve_aux_layers(Eagle3Config.from_pretrained(path), target.config, path)
        head = load_eagle3(path, dtype, device, target_embedding=target.model.embed_tokens,
                           max_positions=max_positions)
        return cls(head, aux, stage_bounds)

    # --- the head over dense per-position keys/values ---------------------------------------------

    def _run(self, tokens: list[int], positions: list[int], hidden: torch.Tensor):
        """The head over this sequence's dense keys/values (one row), attending up to the last position."""
        device = hidden.device
        meta = DenseKV({a: (k[None], v[None]) for a, k, v in zip(self.head.attention_layers, self.k, self.v)},
                       1, len(tokens), max(positions) + 1)
        return self.head(torch.tensor(tokens, device=device), torch.tensor(positions, device=device), hidden, meta)

    def _features(self, positions) -> torch.Tensor:
        """fc of the target's aux features (concatenated in aux-layer order) at ``positions``."""
        feats = self.staged.aux[positions]
        return self.head.project(feats.reshape(*feats.shape[:-2], -1))

    # --- the drafter interface ----------------------------------------------------------------

    def start(self, staged: StagedTarget, prompt: list[int], state, first: int) -> None:
        if staged.aux_layers != self.aux_layers:
            raise ValueError(f"the staged target records aux layers {staged.aux_layers}, the head reads "
                             f"{self.aux_layers}")
        self.staged, self.passes = staged, 0
        max_len = staged.aux.shape[0]
        p = next(self.head.parameters())
        self.k = [torch.zeros(max_len, a.num_kv_heads, a.head_dim, dtype=p.dtype, device=p.device)
                  for a in self.head.attention_layers]
        self.v = [torch.zeros_like(k) for k in self.k]
        # Real entries 0..L-2 (token x[p+1], features of p); entry L-1 (token ``first``) is
        # written by the first draft, like every later anchor's entry.
        L = len(prompt)
        if L > 1:
            self._run(prompt[1:], list(range(L - 1)), self._features(torch.arange(L - 1, device=p.device)))
        self.anchor, self.verdict, self.written = L - 1, first, L - 1  # written: real entries 0..written-1
        self.chain: list[_ChainStep] = []

    def draft(self, inflight: list[InFlight]) -> int:
        m = self.anchor
        tokens = [tok.token for tok in inflight]
        assert [tok.pos for tok in inflight] == list(range(m + 1, m + 1 + len(tokens)))
        assert tokens[0] == self.verdict, "the first in-flight token is the target's verdict on the anchor"
        keep = 0  # chain steps still valid: same anchor, same tokens
        while keep < min(len(self.chain), len(tokens)) and self.chain[keep].token == tokens[keep]:
            keep += 1
        chain = self.chain[:keep]
        for i in range(keep, len(tokens)):
            if i == 0:  # the anchor's real entry: its target features
                assert self.written == m
                hidden = self._features(torch.tensor([m], device=self.k[0].device))
                self.written = m + 1
            else:
                hidden = chain[-1].hidden[None]
            normed, out = self._run([tokens[i]], [m + i], hidden)
            self.passes += 1
            chain.append(_ChainStep(tokens[i], normed[0], out[0]))
        self.chain = chain
        draft = self.head.compute_logits(chain[-1].normed).argmax(-1)
        return int(self.head.draft_to_target(draft))

    def exited(self, out: InFlight, verdict: int) -> None:
        assert out.pos == self.anchor + 1
        self.anchor, self.verdict, self.chain = out.pos, verdict, []


@torch.no_grad()
def simulate_sequence(target, module, prompt: list[int], max_new_tokens: int,
                      eos_ids: tuple[int, ...] = ()) -> SequenceResult:
    """Greedy SPD of one prompt; see the module docstring for the cycle. ``module``: an SPD
    speculation module (or anything with its config and call), or an :class:`Eagle3Drafting`."""
    drafter = module if isinstance(module, Eagle3Drafting) else ModuleDrafter(module)
    n, bounds = drafter.num_stages, drafter.stage_bounds
    device = next(target.parameters()).device
    staged = StagedTarget(target, bounds, len(prompt) + max_new_tokens + n + 2, drafter.aux_layers)
    state = staged.prefill(torch.tensor(prompt, device=device))
    t = int(staged.exit_logits(state)[-1].argmax())
    result = SequenceResult([t], 0, [0] * n, [0] * n)
    drafter.start(staged, prompt, state, t)
    queue: list[InFlight] = []
    entering = InFlight(t, len(prompt))
    while len(result.tokens) < max_new_tokens and t not in eos_ids:
        result.cycles += 1
        inflight = queue + [entering]
        before = drafter.passes
        draft = InFlight(drafter.draft(inflight), entering.pos + 1, window=len(inflight))
        result.drafter_passes.append(drafter.passes - before)
        for tok in inflight:  # every stage advances the token it holds
            state = tok.state if tok.depth else torch.tensor([tok.token], device=device)
            tok.state = staged.run_stage(tok.depth, state, torch.tensor([tok.pos], device=device))
            tok.depth += 1
        queue = inflight
        entering = draft
        if queue[0].depth < n:
            continue
        out = queue.pop(0)
        t = int(staged.exit_logits(out.state)[0].argmax())
        result.tokens.append(t)
        drafter.exited(out, t)
        candidate = queue[0] if queue else draft
        result.verified[candidate.window - 1] += 1
        if candidate.token == t:
            result.accepted[candidate.window - 1] += 1
        else:  # drop everything in flight; the target's token enters stage 0
            queue, entering = [], InFlight(t, out.pos + 1)
    return result


def summarize(results: list[SequenceResult], n: int) -> dict:
    """Tokens per cycle (after each prompt's first token, which the prefill gives in any
    decoding), acceptance per window size, and the ideal speed-up over plain pipelining."""
    tokens = sum(len(r.tokens) - 1 for r in results)
    cycles = sum(r.cycles for r in results)
    verified = [sum(r.verified[d] for r in results) for d in range(n)]
    accepted = [sum(r.accepted[d] for r in results) for d in range(n)]
    per_cycle = tokens / cycles if cycles else 0.0
    passes = [p for r in results for p in r.drafter_passes]
    return {
        "num_stages": n, "sequences": len(results), "tokens_after_first": tokens, "cycles": cycles,
        "tokens_per_cycle": per_cycle,
        "steady_state_acceptance": accepted[-1] / verified[-1] if verified[-1] else None,
        "acceptance_by_window": [a / v if v else None for a, v in zip(accepted, verified)],
        "drafts_verified_by_window": verified,
        "ideal_speedup_vs_plain_pipeline": per_cycle * n,
        "drafter_passes_per_cycle": sum(passes) / len(passes) if passes else None,
        "drafter_passes_histogram": {str(k): passes.count(k) for k in sorted(set(passes))},
        "formula": "ideal speed-up = tokens per cycle x n (plain pipelined decoding of one sequence emits "
                   "1/n token per cycle; the module runs beside the stages; transfers ignored)",
    }
