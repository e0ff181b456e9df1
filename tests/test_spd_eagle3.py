"""SPD with an EAGLE-3 head as the drafter (CPU, gloo, 2 and 3 stages).

The fixture target and its trained EAGLE-3 head: greedy SPD emits the single-process greedy
tokens, and every request's draft/acceptance counters equal the CPU replay's
(``simulate_sequence`` with ``Eagle3Drafting``), which chains exactly as the runtime must. A
random head on a tiny target checks sampled SPD against the exact target distribution, and
heads for another target are refused by name. The static (CUDA-graph-capturable) drafting step,
which the engine runs, is checked against the eager reference chain on random plans."""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest
import torch

from parspec import LLM, SamplingParams
from parspec.config import ConfigError, EngineConfig, ModelConfig
from parspec.spd.eagle3 import Eagle3Chain, plan_rows
from parspec.spd.engine import PipelineEngine

from tests.test_spd_pipeline import (BOUND, COMMON, N, PROMPT, SAMPLED, V, _inputs, _live, _shutdown_at_end,  # noqa: F401
                                     assert_kv_recomputes, exact_joint, shutdown_all)

pytestmark = pytest.mark.timeout(180)

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "reference")
HEAD, TARGET = os.path.join(FIX, "eagle3"), os.path.join(FIX, "target")
MAX_TOKENS = 16



@pytest.fixture(scope="module")
def fixture_run():
    """Three prompts (one short), their single-process greedy output, and the target."""
    if not os.path.isdir(HEAD):
        pytest.skip("no EAGLE-3 head in fixtures/reference/eagle3")
    from parspec.loader import load_model
    from parspec.tokenizer import Tokenizer

    tok = Tokenizer(TARGET)
    prompts = [tok.encode("def fibonacci(n):\n"), tok.encode("import os\n\ndef list_files(path):\n"),
               tok.encode("x")]
    kw = dict(max_model_len=128, max_num_seqs=4, block_size=16)
    shutdown_all()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    single = {k: v for k, v in {**COMMON, **kw}.items() if k != "block_size"}
    plain = [o.outputs[0].token_ids for o in LLM(TARGET, **single).generate(_inputs(prompts), params, use_tqdm=False)]
    target, _ = load_model(TARGET, torch.float32, "cpu")
    return {"prompts": prompts, "kw": kw, "params": params, "plain": plain, "target": target}


@pytest.mark.parametrize("n", [2, 3])
def test_greedy_spd_with_eagle3_is_lossless_and_accepts_as_the_replay(fixture_run, n):
    from parspec.spd.simulate import Eagle3Drafting, simulate_sequence

    shutdown_all()
    kw = fixture_run["kw"]
    engine = _spd(TARGET, n, HEAD, **kw)
    assert engine.eagle3 and engine.stage.width == 2 + 3
    outs = engine.generate(_inputs(fixture_run["prompts"]), fixture_run["params"], use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == fixture_run["plain"]
    drafter = Eagle3Drafting.load(HEAD, fixture_run["target"], engine.bounds)
    for prompt, out in zip(fixture_run["prompts"], outs):
        replay = simulate_sequence(fixture_run["target"], drafter, prompt, MAX_TOKENS)
        assert replay.tokens == out.outputs[0].token_ids
        stats = out.spec_stats
        assert (stats["num_draft_tokens"], stats["num_accepted_tokens"]) == (sum(replay.verified),
                                                                              sum(replay.accepted)), prompt
    assert engine.stats.num_accepted_tokens > 0
    assert engine.stats.num_draft_tokens > engine.stats.num_accepted_tokens  # rejections rolled back
    # after them, every stage's KV equals a fresh recomputation of each final sequence
    assert_kv_recomputes(engine, TARGET, outs, fixture_run["prompts"])
    shutdown_all()


def _spd(model: str, n: int, head: str, **kw) -> PipelineEngine:
    """A fresh SPD pipeline of ``n`` stages drafting with the EAGLE-3 head at ``head``."""
    shutdown_all()
    opts = {**COMMON, **kw}
    engine = PipelineEngine(EngineConfig(model=model, pipeline_parallel_size=n, **opts),
                            speculative_config={"method": "spd", "model": head})
    _live.append(engine)
    return engine


def _random_head(path: str, target: ModelConfig, aux: list[int], draft_vocab: int, seed: int = 0,
                 **overrides) -> None:
    """A randomly initialised EAGLE-3 head for ``target``, saved in vLLM's layout."""
    from parspec.models.drafter import Eagle3Config, Eagle3Drafter, save_eagle3

    cfg = Eagle3Config(hidden_size=target.hidden_size, intermediate_size=48, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16, vocab_size=target.vocab_size, draft_vocab_size=draft_vocab,
                       target_hidden_size=target.hidden_size, aux_layer_ids=tuple(aux), **overrides)
    torch.manual_seed(seed)
    head = Eagle3Drafter(cfg)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.5)
        for name, module in head.named_modules():
            if name.endswith("norm") or "layernorm" in name or name.endswith("hidden_norm"):
                module.weight.fill_(1.0)
        head.d2t.copy_(torch.tensor([0, 1, 1, 2][:draft_vocab]))  # draft ids -> target 0, 2, 3, 5
        head.t2d.zero_()
        head.t2d[head.draft_to_target(torch.arange(draft_vocab))] = True
    save_eagle3(head, path, include_embedding=True)


@pytest.fixture(scope="module")
def tiny(model_factory):
    return model_factory("llama", seed=5, vocab_size=V, tokenizer=False, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)


def test_sampled_spd_with_eagle3_has_the_target_distribution(tiny, tmp_path):
    path, hf = tiny
    head = str(tmp_path / "head")
    _random_head(head, ModelConfig.from_pretrained(path), [0, 1], draft_vocab=4)
    shutdown_all()
    torch.manual_seed(0)
    engine = _spd(path, 2, head, max_num_seqs=N, max_model_len=16)
    assert engine.eagle3
    outs = engine.generate(_inputs([PROMPT] * N), SAMPLED, use_tqdm=False)
    counts = torch.zeros(V ** 3, dtype=torch.float64)
    for o in outs:
        a, b, c = o.outputs[0].token_ids
        counts[a * V * V + b * V + c] += 1
    stats = engine.stats
    assert 0.02 < stats.num_accepted_tokens / stats.num_draft_tokens < 0.98  # both paths ran
    assert 0.5 * (counts / N - exact_joint(hf)).abs().sum().item() < BOUND
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    assert (engine.generate(_inputs([PROMPT]), greedy, use_tqdm=False)[0].outputs[0].token_ids ==
            [int(t) for t in _greedy(hf, PROMPT, 6)])
    shutdown_all()


def _greedy(hf, prompt: list[int], k: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(k):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_heads_for_another_target_are_refused_by_name(tiny, tmp_path):
    path, _ = tiny
    cfg = ModelConfig.from_pretrained(path)
    wide = str(tmp_path / "wide")
    _random_head(wide, ModelConfig(**{**cfg.__dict__, "hidden_size": 64}), [0, 1], draft_vocab=4)
    with pytest.raises(ConfigError, match="target_hidden_size=64"):
        PipelineEngine(EngineConfig(model=path, pipeline_parallel_size=2, device="cpu", dtype="float32",
                                    skip_tokenizer_init=True), speculative_config={"method": "spd", "model": wide})
    vocab = str(tmp_path / "vocab")
    _random_head(vocab, ModelConfig(**{**cfg.__dict__, "vocab_size": 9}), [0, 1], draft_vocab=4)
    with pytest.raises(ConfigError, match="vocab_size=9"):
        PipelineEngine(EngineConfig(model=path, pipeline_parallel_size=2, device="cpu", dtype="float32",
                                    skip_tokenizer_init=True), speculative_config={"method": "spd", "model": vocab})
    aux = str(tmp_path / "aux")
    _random_head(aux, cfg, [0, 5], draft_vocab=4)
    with pytest.raises(ConfigError, match=r"\[5\]"):
        PipelineEngine(EngineConfig(model=path, pipeline_parallel_size=2, device="cpu", dtype="float32",
                                    skip_tokenizer_init=True), speculative_config={"method": "spd", "model": aux})


class _CaptureLikeGraphs:
    """A stand-in for an enabled GraphCache on the CPU: a key's first call runs the function three
    times (warm-up, capture, replay) as a real capture does, later calls once."""

    enabled = True

    def __init__(self, fn):
        self.fn, self.graphs = fn, {}

    def run(self, key):
        if key not in self.graphs:
            self.fn(key)
            self.fn(key)
            self.graphs[key] = None
        return self.fn(key)


def _evolve(rows, rng: random.Random, vocab: int, steps: int, limit: int) -> list[int]:
    """One cycle of random pipeline events per row: an exit (anchor + 1; a token enters behind),
    a rejection (anchor + 1; only the correction in flight), a refill (one more in flight, same
    anchor: the chain extends) or nothing (the row drafts nothing). Returns the rows whose
    anchor moved; ``r.drafts`` says whether a row drafts this cycle."""
    moved = []
    for r in rows:
        anchor = r.inflight[0].position - 1
        event = rng.choice(["exit", "reject", "refill", "idle"])
        if event in ("exit", "reject") and anchor + steps + 2 >= limit:
            event = "refill"
        tokens = [t.token for t in r.inflight]
        if event == "exit":
            anchor, tokens = anchor + 1, tokens[1:] + [rng.randrange(vocab)]
        elif event == "reject":
            anchor, tokens = anchor + 1, [rng.randrange(vocab)]
        elif event == "refill" and len(tokens) < steps:
            tokens.append(rng.randrange(vocab))
        r.inflight = [SimpleNamespace(token=t, position=anchor + 1 + i) for i, t in enumerate(tokens)]
        r.drafts = event != "idle"
        if event in ("exit", "reject"):
            moved.append(r.index)
    return moved


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float summation order, relative to the tensor's scale (a random head's hidden
    states and K/V reach tens)."""
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, b.abs().max().item()))


@torch.inference_mode()
def test_static_step_drafts_as_the_eager_chain(tiny, tmp_path):
    """Random restarts, extensions, short chains and idle rows: the static step (run as the
    engine runs it, its first call per key through a capture's extra runs) gives the eager
    chain's logits, drafts, chain state and K/V at every real position."""
    path, _ = tiny
    target = ModelConfig.from_pretrained(path)
    head = str(tmp_path / "head")
    _random_head(head, target, [0, 1], draft_vocab=4)
    b, steps, max_positions = 5, 3, 48
    static, eager = (Eagle3Chain(head, target, None, torch.device("cpu"), torch.float32, b, max_positions, steps)
                     for _ in range(2))
    engine = SimpleNamespace(eagle3_graphs=_CaptureLikeGraphs(static.forward_static), drafter=static)
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    aux_width, vocab = 2, target.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(1, 12))] for _ in range(b)]
    cu = [0]
    for p in prompts:
        cu.append(cu[-1] + len(p))
    back = torch.randn(cu[-1], 2 + aux_width, target.hidden_size, generator=gen)
    for chain in (static, eager):
        chain.prefill(prompts, back, cu)
    rows = [SimpleNamespace(index=i, inflight=[SimpleNamespace(token=rng.randrange(vocab), position=len(p))],
                            chain_anchor=-1, chain_len=0, drafts=True) for i, p in enumerate(prompts)]
    kinds, spans = set(), set()
    for cycle in range(60):
        moved = _evolve(rows, rng, vocab, steps, max_positions) if cycle else []
        if moved:
            aux = torch.randn(len(moved), aux_width, target.hidden_size, generator=gen)
            for chain in (static, eager):
                chain.exited(torch.tensor(moved), aux)
        plans = plan_rows(rows, lambda r: r.drafts)
        kinds |= {"idle" if p is None else "extend" if p.start else f"restart{len(p.tokens)}" for p in plans}
        seen = []

        def run(key):  # the engine's step, its logits kept
            seen.append((key, PipelineEngine._eagle3_step(engine, key)))
            return seen[-1][1]

        expected = eager.draft_logits_eager(plans)
        drafts, q = static.draft(plans, None, None, run=run)
        if expected is None:
            assert not seen and q is None
            continue
        (key, logits), = seen
        spans.add(key[1])
        assert torch.allclose(logits, expected, atol=1e-5, rtol=1e-5), cycle
        assert torch.equal(drafts, eager._sample(expected, None, None)[0]), cycle
        assert _close(static.chain_normed, eager.chain_normed) and _close(static.chain_hidden, eager.chain_hidden)
        for ks, ke in zip(static.k + static.v, eager.k + eager.v):
            assert _close(ks[:, :static.junk], ke[:, :static.junk]), cycle
    assert {"idle", "extend", "restart1", "restart2", "restart3"} <= kinds
    assert len(spans) > 1 and static.junk + 1 in spans  # short spans and the whole buffer
