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
autoregressive decoding when the stages split the layers evenly."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parspec.spd.features import _stream


class StagedTarget:
    """One sequence's pass through the target, stage by stage, over dense per-layer K/V."""

    def __init__(self, target, bounds: list[int], max_len: int):
        self.target, self.bounds = target, bounds
        layers = target.model.layers
        attn = layers[0].self_attn
        p = next(target.parameters())
        shape = (max_len, attn.num_kv_heads, attn.head_dim)
        self.k = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in layers]
        self.v = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in layers]

    def _layer(self, i: int, hidden, residual, pos: torch.Tensor):
        layer = self.target.model.layers[i]
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
    window: int | None = None  # the window size d the module drafted it from; None: a final token


@dataclass
class SequenceResult:
    tokens: list[int]  # emitted, the first from the prefill
    cycles: int  # from the first token entering stage 0 to the exit that emitted the last token
    verified: list[int] = field(default_factory=list)  # per window size d = 1..n: drafts verified
    accepted: list[int] = field(default_factory=list)  # ... and accepted


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


@torch.no_grad()
def simulate_sequence(target, module, prompt: list[int], max_new_tokens: int,
                      eos_ids: tuple[int, ...] = ()) -> SequenceResult:
    """Greedy SPD of one prompt; see the module docstring for the cycle."""
    n = module.config.num_stages
    bounds = module.config.stage_bounds
    device = next(target.parameters()).device
    staged = StagedTarget(target, bounds, len(prompt) + max_new_tokens + n + 2)
    state = staged.prefill(torch.tensor(prompt, device=device))
    t = int(staged.exit_logits(state)[-1].argmax())
    result = SequenceResult([t], 0, [0] * n, [0] * n)
    stream, C = _stream(*state), getattr(module.config, "context", 0)
    last, last_feat = InFlight(prompt[-1], len(prompt) - 1), stream[-1]
    history = [(prompt[p], stream[p]) for p in range(max(0, len(prompt) - 1 - C), len(prompt) - 1)]
    queue: list[InFlight] = []
    entering = InFlight(t, len(prompt))
    while len(result.tokens) < max_new_tokens and t not in eos_ids:
        result.cycles += 1
        inflight = queue + [entering]
        ids, depths, feats = _window(module, last, last_feat, inflight, n, device, history)
        draft = InFlight(int(module(ids, depths, feats)[0].argmax()), entering.pos + 1, window=len(inflight))
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
        history = (history + [(last.token, last_feat)])[-C:] if C else []
        last, last_feat = out, _stream(*out.state)[0]
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
    return {
        "num_stages": n, "sequences": len(results), "tokens_after_first": tokens, "cycles": cycles,
        "tokens_per_cycle": per_cycle,
        "steady_state_acceptance": accepted[-1] / verified[-1] if verified[-1] else None,
        "acceptance_by_window": [a / v if v else None for a, v in zip(accepted, verified)],
        "drafts_verified_by_window": verified,
        "ideal_speedup_vs_plain_pipeline": per_cycle * n,
        "formula": "ideal speed-up = tokens per cycle x n (plain pipelined decoding of one sequence emits "
                   "1/n token per cycle; the module runs beside the stages; transfers ignored)",
    }
