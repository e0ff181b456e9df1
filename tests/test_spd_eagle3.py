"""SPD with an EAGLE-3 head as the drafter (CPU, gloo, 2 and 3 stages).

The fixture target and its trained EAGLE-3 head: greedy SPD emits the single-process greedy
tokens, and every request's draft/acceptance counters equal the CPU replay's
(``simulate_sequence`` with ``Eagle3Drafting``), which chains exactly as the runtime must. A
random head on a tiny target checks sampled SPD against the exact target distribution, and
heads for another target are refused by name."""

from __future__ import annotations

import os

import pytest
import torch

from parspec import LLM, SamplingParams
from parspec.config import ConfigError, EngineConfig, ModelConfig
from parspec.spd.engine import PipelineEngine

from tests.test_spd_pipeline import BOUND, COMMON, N, PROMPT, SAMPLED, V, _inputs, _live, exact_joint

pytestmark = pytest.mark.timeout(180)

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "reference")
HEAD, TARGET = os.path.join(FIX, "eagle3"), os.path.join(FIX, "target")
MAX_TOKENS = 16


@pytest.fixture(scope="module", autouse=True)
def _shutdown_at_end():
    torch.set_num_threads(1)
    yield
    while _live:
        _live.pop().shutdown()


def _shutdown_all():
    while _live:
        _live.pop().shutdown()


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
    _shutdown_all()
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    single = {k: v for k, v in {**COMMON, **kw}.items() if k != "block_size"}
    plain = [o.outputs[0].token_ids for o in LLM(TARGET, **single).generate(_inputs(prompts), params, use_tqdm=False)]
    target, _ = load_model(TARGET, torch.float32, "cpu")
    return {"prompts": prompts, "kw": kw, "params": params, "plain": plain, "target": target}


@pytest.mark.parametrize("n", [2, 3])
def test_greedy_spd_with_eagle3_is_lossless_and_accepts_as_the_replay(fixture_run, n):
    from parspec.spd.simulate import Eagle3Drafting, simulate_sequence

    _shutdown_all()
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
    _shutdown_all()


def _spd(model: str, n: int, head: str, **kw) -> PipelineEngine:
    """A fresh SPD pipeline of ``n`` stages drafting with the EAGLE-3 head at ``head``."""
    _shutdown_all()
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
    _shutdown_all()
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
    _shutdown_all()


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
