"""The SPD speculation module: window shapes and padding, config / weight validation, the
vectorised training windows against a slow loop, a short training run, the cycle simulator's
losslessness, and function-preserving expansion."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from parspec import LLM, SamplingParams
from parspec.bench.expand import ExpansionError, expand_spd_module
from parspec.config import ConfigError
from parspec.loader import LoadError, load_model
from parspec.models.layers import RMSNorm
from parspec.spd.features import depth_features
from parspec.spd.module import SPDModule, SPDModuleConfig
from parspec.spd.simulate import simulate_sequence, summarize
from parspec.train.data import DrafterData
from parspec.train.spd import (SPDTrainConfig, SPDTrainer, batch_windows, train_spd, window_inputs, window_layout,
                               window_logits)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "fixtures", "reference")
H, V = 48, 97


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _target_parts(hidden: int = H, vocab: int = V, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embed = nn.Embedding(vocab, hidden)
    norm = RMSNorm(hidden, 1e-5)
    lm_head = nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        embed.weight.copy_(torch.randn(vocab, hidden, generator=g))
        norm.weight.copy_(1 + 0.1 * torch.randn(hidden, generator=g))
        lm_head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.3)
    return embed, norm, lm_head


def _module(n: int = 3, mixer: str = "attention", seed: int = 0, parts=None, **sizes) -> SPDModule:
    torch.manual_seed(seed)
    cfg = SPDModuleConfig.for_target(6, n, H, V, hidden_size=32, intermediate_size=40, num_heads=4, mixer=mixer,
                                     **sizes)
    m = SPDModule(cfg).attach_target(*(parts or _target_parts())).eval()
    with torch.no_grad():  # non-zero depth embeddings, so depths matter
        m.depth_embed.normal_(0, 0.5)
    return m


def _windows(n: int, B: int = 4, seed: int = 1):
    """Left-padded windows of sizes d = n, n-1, ..., with garbage in the padding."""
    g = torch.Generator().manual_seed(seed)
    T = n + 1
    ids = torch.randint(0, V, (B, T), generator=g)
    feats = torch.randn(B, T, H, generator=g) * 3
    depths = torch.full((B, T), -1)
    for b in range(B):
        d = n - b % n
        depths[b, n - d] = n
        depths[b, n - d + 1:] = torch.arange(d - 1, -1, -1)
    return ids, depths, feats


@pytest.mark.parametrize("mixer", ["attention", "mlp"])
def test_shapes_and_padding(mixer):
    n = 3
    m = _module(n, mixer)
    ids, depths, feats = _windows(n)
    out = m(ids, depths, feats)
    assert out.shape == (4, V) and out.dtype == torch.float32 and torch.isfinite(out).all()
    # Padding (depth -1) and depth-0 features are ignored, whatever they hold.
    ids2, feats2 = ids.clone(), feats.clone()
    ids2[depths < 0] = 0
    feats2[depths <= 0] = float("nan")
    assert torch.equal(m(ids2, depths, feats2), out)
    # ... but a real slot's feature and token do count.
    feats3 = feats.clone()
    feats3[:, -2] += 1.0
    assert not torch.allclose(m(ids, depths, feats3), out)
    ids3 = ids.clone()
    ids3[:, -1] = (ids3[:, -1] + 1) % V
    assert not torch.allclose(m(ids3, depths, feats), out)
    # An unused batch row (all padding) gives finite logits.
    assert torch.isfinite(m(ids, torch.full_like(depths, -1), feats)).all()
    # Rows are independent (a batch of one gives the same row).
    assert torch.allclose(m(ids[1:2], depths[1:2], feats[1:2]), out[1:2], atol=1e-5)


def test_config_errors():
    good = SPDModuleConfig.for_target(5, 2, 512, 6144).to_dict()
    SPDModuleConfig.from_dict(good)
    bad = [({"architectures": ["LlamaForCausalLM"]}, "architectures"),
           ({"num_stages": 0}, "num_stages=0"),
           ({"stage_bounds": [0, 3]}, "stage_bounds=[0, 3]"),
           ({"stage_bounds": [0, 3, 3]}, "stage_bounds=[0, 3, 3]"),
           ({"mixer": "rnn"}, "mixer='rnn'"),
           ({"hidden_size": 30, "num_heads": 4}, "num_heads=4"),
           ({"vocab_size": "6144"}, "vocab_size='6144'"),
           ({"rms_norm_eps": -1.0}, "rms_norm_eps=-1.0")]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            SPDModuleConfig.from_dict({**good, **change})


def test_save_load_and_weight_errors(tmp_path):
    parts = _target_parts()
    m = _module(2, parts=parts)
    path = str(tmp_path / "spd")
    m.save_pretrained(path, dtype=torch.float32)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["SPDModule"] and cfg["num_stages"] == 2 and cfg["stage_bounds"] == [0, 3, 6]
    loaded = SPDModule.from_pretrained(path, *parts, device="cpu", dtype=torch.float32)
    ids, depths, feats = _windows(2)
    assert torch.equal(loaded(ids, depths, feats), m(ids, depths, feats))
    weights = load_file(os.path.join(path, "model.safetensors"))
    assert not any(k.startswith(("embed", "lm_head")) for k in weights)  # the target's, never stored

    def broken(change) -> str:
        w = dict(weights)
        change(w)
        save_file(w, os.path.join(path, "model.safetensors"))
        return path

    with pytest.raises(LoadError, match="lacks out_proj.weight"):
        SPDModule.from_pretrained(broken(lambda w: w.pop("out_proj.weight")), *parts)
    with pytest.raises(LoadError, match=r"in_proj has shape \(3, 32, 47\)"):
        SPDModule.from_pretrained(broken(lambda w: w.update(in_proj=w["in_proj"][..., :47].contiguous())), *parts)
    with pytest.raises(LoadError, match="unexpected tensor.*extra"):
        SPDModule.from_pretrained(broken(lambda w: w.update(extra=torch.zeros(1))), *parts)
    save_file(weights, os.path.join(path, "model.safetensors"))
    with pytest.raises(ConfigError, match="hidden_size=48"):
        SPDModule.from_pretrained(path, *_target_parts(hidden=64))
    with pytest.raises(LoadError, match="no config.json"):
        SPDModule.from_pretrained(str(tmp_path), *parts)


@pytest.mark.parametrize("context", [0, 2])
def test_window_layout_equals_slow_loop(context):
    n, L = 3, 9
    positions, depths, label = window_layout(L, n, context=context)
    for j in range(L):
        for d in range(1, n + 1):
            before = [(n, j - c) if j - c >= 0 else (-1, None) for c in range(context, 0, -1)]
            slots = before + [(-1, None)] * (n - d) + [(n, j)] + [(d - k, j + k) for k in range(1, d + 1)]
            assert depths[j, d - 1].tolist() == [s[0] for s in slots]
            assert [p for (s, _), p in zip(slots, positions[j, d - 1].tolist()) if s >= 0] == \
                   [p for s, p in slots if s >= 0]
            assert label[j, d - 1] == j + d


@pytest.mark.parametrize("mixer,context", [("attention", 0), ("mlp", 0), ("attention", 2), ("mlp", 2)])
def test_vectorised_windows_equal_module_forward(mixer, context):
    """Training's gathered windows give what the runtime's per-window forward gives, and the
    raw windows are what a slow loop over positions builds."""
    n, L, C = 3, 8, context
    m = _module(n, mixer, context=C)
    if C and mixer == "attention":
        with torch.no_grad():
            m.slot_embed.normal_(0, 0.5)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (2, L), generator=g)
    feats = torch.randn(2, L, n, H, generator=g)
    lengths = torch.tensor([8, 5])
    w = batch_windows(lengths, L, n, context=C)
    assert len(w.b) == sum(max(0, int(length) - d) for length in lengths for d in range(1, n + 1))
    ids, depths, f = window_inputs(tokens, feats, w)
    for r in range(len(w.b)):
        b, j, d = int(w.b[r]), int(w.anchor[r]), int(w.d[r])
        assert int(w.label[r]) == j + d < int(lengths[b])
        ctx = [(int(tokens[b, j - c]), n) if j - c >= 0 else (0, -1) for c in range(C, 0, -1)]
        want_ids = [t for t, _ in ctx] + [0] * (n - d) + [int(tokens[b, j + k]) for k in range(d + 1)]
        want_depths = [s for _, s in ctx] + [-1] * (n - d) + [n] + list(range(d - 1, -1, -1))
        assert ids[r].tolist() == want_ids and depths[r].tolist() == want_depths
        for c in range(1, C + 1):
            if j - c >= 0:
                assert torch.equal(f[r, C - c], feats[b, j - c, n - 1])
        assert torch.equal(f[r, C + n - d], feats[b, j, n - 1])
        for k in range(1, d):
            assert torch.equal(f[r, C + n - d + k], feats[b, j + k, d - k - 1])
    assert torch.allclose(window_logits(m, tokens, feats, w), m(ids, depths, f), atol=1e-5)
    if C:  # the context counts: other tokens there change the logits
        other = tokens.clone()
        other[:, :2] = (other[:, :2] + 1) % V
        far = w.anchor >= 2  # windows whose own tokens are all past position 1 differ only in context
        assert not torch.allclose(window_logits(m, other, feats, w)[far], window_logits(m, tokens, feats, w)[far])


@pytest.fixture(scope="module")
def tiny_target(model_factory):
    path, _ = model_factory("llama", seed=5)
    model, cfg = load_model(path, torch.float32, "cpu")
    return path, model.requires_grad_(False).eval(), cfg


def test_depth_features_match_target_forward(tiny_target):
    _, target, cfg = tiny_target
    tokens = torch.randint(0, cfg.vocab_size, (2, 10))
    bounds = [0, 1, 3]  # features at the inputs of layer 1, then the final stream
    feats, logits = depth_features(target, tokens, bounds)
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    hidden, aux = target(tokens, torch.arange(10).expand(2, 10), causal, aux_layers=(1,))
    assert torch.allclose(feats[:, :, 0], aux[0], atol=1e-6)
    assert torch.allclose(logits, target.compute_logits(hidden), atol=1e-5)
    assert torch.allclose(target.model.norm(feats[:, :, 1]), hidden, atol=1e-5)


def test_short_training_lowers_loss(tiny_target, tmp_path):
    path, target, cfg = tiny_target
    g = torch.Generator().manual_seed(0)
    # Sequences from a tiny cyclic grammar, so there is something to learn.
    seqs = [torch.tensor([(s + 7 * i) % 50 + 3 for i in range(int(torch.randint(20, 30, (1,), generator=g)))])
            for s in range(24)]
    data = DrafterData(seqs, [4] * len(seqs), [True] * len(seqs), {"corpus": "test"})
    tc = SPDTrainConfig(num_stages=2, hidden_size=32, intermediate_size=48, num_heads=2, steps=40, batch_size=4,
                        lr=3e-3, heldout=4, eval_every=0, device="cpu", max_bytes=1 << 20)
    trainer = SPDTrainer(target, cfg, data, tc, {})
    probe = trainer.train_idx[:8]
    with torch.no_grad():
        before, _ = trainer.batch_loss(probe)
    out = str(tmp_path / "spd-2")
    metrics = train_spd(path, out, data, tc, command="test")
    after_module = SPDModule.from_pretrained(out, target.model.embed_tokens, target.model.norm, target.lm_head,
                                             dtype=torch.float32)
    trainer.module = after_module.train()
    with torch.no_grad():
        after, _ = trainer.batch_loss(probe)
    assert float(after) < 0.7 * float(before)
    assert metrics["steps_done"] == 40 and len(metrics["final_eval"]["acc"]) == 2
    for name in ("config.json", "model.safetensors", "metrics.json", "README.md"):
        assert os.path.isfile(os.path.join(out, name))
    # A warm start takes the saved weights; a module of another shape is refused by name.
    from dataclasses import replace

    warm = SPDTrainer(target, cfg, data, replace(tc, init_from=out), {})
    assert torch.equal(warm.module.out_proj.weight, after_module.out_proj.weight)
    with pytest.raises(ConfigError, match="differs in hidden_size"):
        SPDTrainer(target, cfg, data, replace(tc, init_from=out, hidden_size=16, num_heads=2), {})
    # A module with context slots warm-starts from it and computes the same (the new slots'
    # weights start at zero) until training teaches it to use them.
    wide = SPDTrainer(target, cfg, data, replace(tc, init_from=out, context=3, steps=5), {})
    assert wide.cfg.window == 6 and wide.cfg.extra["init_from"] == os.path.normpath(out)
    with torch.no_grad():
        narrow_loss, narrow = warm.batch_loss(probe)
        wide_loss, wide_stats = wide.batch_loss(probe)
    torch.testing.assert_close(wide_loss, narrow_loss)
    assert torch.equal(wide_stats["hits"], narrow["hits"])
    for _ in range(3):
        wide.train_step(0.0)
    assert wide.module.mlp.gate_up.weight[:, :3 * 32].abs().sum() > 0  # the context columns learn
    with pytest.raises(ConfigError, match="differs in context, mixer"):
        SPDTrainer(target, cfg, data, replace(tc, init_from=out, context=3, mixer="attention"), {})


def _engine_greedy(target_dir: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    llm = LLM(target_dir, dtype="float32", device="cpu", max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_simulator_is_lossless_with_random_module(tiny_target):
    """Every draft of an untrained module is rejected: the rejection path, KV overwrites included."""
    path, target, cfg = tiny_target
    prompts = [[5, 9, 13, 2, 7], [40, 41, 42, 43, 44, 45, 46, 47]]
    want = _engine_greedy(path, prompts, 12)
    for n in (2, 3):
        torch.manual_seed(n)
        mcfg = SPDModuleConfig.for_target(cfg.num_hidden_layers, n, cfg.hidden_size, cfg.vocab_size, hidden_size=32,
                                          intermediate_size=32, num_heads=2)
        module = SPDModule(mcfg).attach_target(target.model.embed_tokens, target.model.norm, target.lm_head).eval()
        results = [simulate_sequence(target, module, p, 12) for p in prompts]
        assert [r.tokens for r in results] == want
        s = summarize(results, n)
        assert s["tokens_after_first"] == sum(len(w) - 1 for w in want)
        # Rejected drafts cost n cycles per token; accepted ones (if any by chance) one.
        assert s["cycles"] >= s["tokens_after_first"]


class OracleModule:
    """Drafts the target's own next greedy token (it is never rejected, so call k drafts the
    token k + 1 places after the first output): checks the cycle accounting."""

    def __init__(self, n: int, num_layers: int, vocab: int, stream: list[int]):
        from parspec.spd.partition import stage_bounds

        self.config = type("Cfg", (), {"num_stages": n, "stage_bounds": stage_bounds(num_layers, n)})
        self.vocab, self.stream, self.calls = vocab, stream, 0

    def __call__(self, ids, depths, feats):
        assert ids.shape == depths.shape == (1, self.config.num_stages + 1) and feats.shape[:2] == ids.shape
        d = int((depths >= 0).sum()) - 1  # the window's size: grows by one a cycle up to n
        assert d == min(self.calls + 1, self.config.num_stages) and depths[0, -1] == 0
        self.calls += 1
        logits = torch.zeros(1, self.vocab)
        logits[0, self.stream[min(self.calls, len(self.stream) - 1)]] = 1.0
        return logits


@pytest.mark.parametrize("n", [1, 2, 3])
def test_simulator_cycle_accounting_when_every_draft_is_accepted(tiny_target, n):
    path, target, cfg = tiny_target
    prompt = [5, 9, 13, 2, 7]
    want = _engine_greedy(path, [prompt], 10)[0]
    r = simulate_sequence(target, OracleModule(n, cfg.num_hidden_layers, cfg.vocab_size, want), prompt, 10)
    assert r.tokens == want
    # The first token comes from the prefill; it needs n cycles to cross the pipeline, then
    # one token leaves every cycle.
    assert r.cycles == len(want) - 1 + (n - 1)
    assert sum(r.accepted) == sum(r.verified) == len(want) - 1
    assert r.verified[n - 1] == len(want) - 1 - (n - 1)  # all but the fill's drafts are steady-state


@pytest.mark.parametrize("n", [2, 4])
def test_simulator_is_lossless_with_fixture_module(n):
    """The committed module accepts drafts and the emitted stream is still the target's."""
    module_dir = os.path.join(FIX, f"spd-{n}")
    if not os.path.isdir(module_dir):
        pytest.skip(f"{module_dir} not trained yet")
    target_dir = os.path.join(FIX, "target")
    target, _ = load_model(target_dir, torch.float32, "cpu")
    module = SPDModule.from_pretrained(module_dir, target.model.embed_tokens, target.model.norm, target.lm_head,
                                       dtype=torch.float32)
    from parspec.tokenizer import Tokenizer

    tok = Tokenizer(target_dir)
    prompts = [tok.encode("def fibonacci(n):\n"), tok.encode("import os\n\n\ndef list_files(path):\n")]
    want = _engine_greedy(target_dir, prompts, 24)
    results = [simulate_sequence(target, module, p, 24) for p in prompts]
    assert [r.tokens for r in results] == want
    accepted = sum(sum(r.accepted) for r in results)
    verified = sum(sum(r.verified) for r in results)
    assert 0 < accepted <= verified and summarize(results, n)["tokens_per_cycle"] > 1 / n


@pytest.fixture(scope="module")
def eagle3_run():
    """The fixture target and EAGLE-3 head; the plain greedy outputs of two prompts and, from
    an engine drafting K=4 with the head, every (sequence tokens, drafts) pair it proposed."""
    head_dir, target_dir = os.path.join(FIX, "eagle3"), os.path.join(FIX, "target")
    if not os.path.isdir(head_dir):
        pytest.skip(f"{head_dir} not trained yet")
    from parspec.tokenizer import Tokenizer

    tok = Tokenizer(target_dir)
    prompts = [tok.encode("def fibonacci(n):\n"), tok.encode("import os\n\n\ndef list_files(path):\n")]
    llm = LLM(target_dir, dtype="float32", device="cpu", max_model_len=512,
              speculative_config={"method": "eagle3", "model": head_dir, "num_speculative_tokens": 4})
    proposals = []
    propose = llm.engine.proposer.propose

    def spy(seqs):
        proposal = propose(seqs)
        proposals.extend((list(s.token_ids), d) for s, d in zip(seqs, proposal.draft_tokens.tolist()))
        return proposal

    llm.engine.proposer.propose = spy
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=20),
                        use_tqdm=False)
    target, _ = load_model(target_dir, torch.float32, "cpu")
    return {"target": target, "head_dir": head_dir, "prompts": prompts, "proposals": proposals,
            "greedy": [list(o.outputs[0].token_ids) for o in outs]}  # lossless: plain greedy's tokens


def _eagle3_dense_logits(target, head, aux_layers, prefix: list[int], chain: list[int]) -> torch.Tensor:
    """Independently of the simulator: the target's aux features from one dense causal forward,
    then per draft one dense causal head forward over real entries 0..m (token x[p+1], fc of the
    features of p) and the chained entries (in-flight token, the previous step's output hidden)."""
    m = len(prefix) - 1
    causal = torch.ones(m + 1, m + 1, dtype=torch.bool).tril()
    _, aux = target(torch.tensor(prefix), torch.arange(m + 1), causal, aux_layers=aux_layers)
    tokens = prefix[1:] + chain[:1]
    hidden = head.project(torch.cat(aux, dim=-1))
    logits = []
    for i in range(len(chain)):
        L = len(tokens)
        normed, prenorm = head(torch.tensor(tokens), torch.arange(L), hidden, torch.ones(L, L, dtype=torch.bool).tril())
        logits.append(head.compute_logits(normed[-1]))
        if i + 1 < len(chain):
            tokens, hidden = tokens + [chain[i + 1]], torch.cat([hidden, prenorm[-1:]])
    return torch.stack(logits)


@pytest.mark.parametrize("n", [2, 4])
@torch.no_grad()
def test_eagle3_drafter_simulation_is_lossless_and_drafts_like_the_proposer(eagle3_run, n):
    """EAGLE-3 as SPD's drafter: the emitted stream is the target's greedy one, and chaining from
    an exited prefix drafts what the engine's Eagle3Proposer drafted after that prefix (its K=4
    sequential drafts = windows 1..4), with the logits of a dense recomputation."""
    from parspec.spd.partition import stage_bounds
    from parspec.spd.simulate import Eagle3Drafting, InFlight, StagedTarget

    target = eagle3_run["target"]
    bounds = stage_bounds(target.config.num_hidden_layers, n)
    drafter = Eagle3Drafting.load(eagle3_run["head_dir"], target, bounds)
    assert drafter.aux_layers == (1, 2, 4)
    results = [simulate_sequence(target, drafter, p, 20) for p in eagle3_run["prompts"]]
    assert [r.tokens for r in results] == eagle3_run["greedy"]
    assert 0 < sum(sum(r.accepted) for r in results) <= sum(sum(r.verified) for r in results)
    passes = [p for r in results for p in r.drafter_passes]
    assert set(passes) == {1, n} and len(passes) == sum(r.cycles for r in results)  # n: a steady-state cycle
    proposals = eagle3_run["proposals"]
    assert len(proposals) >= 10
    for k, (ids, drafts) in enumerate(proposals):
        # The engine's sequence ends in the token the target just emitted: our in-flight token at
        # window 1; the prefix before it has exited, so its features are the target's own.
        prefix = ids[:-1]
        staged = StagedTarget(target, bounds, len(ids) + 8, drafter.aux_layers)
        drafter.start(staged, prefix, staged.prefill(torch.tensor(prefix)), ids[-1])
        chain, mine = [InFlight(ids[-1], len(prefix))], []
        for j in range(len(drafts)):
            mine.append(drafter.draft(chain))
            chain.append(InFlight(mine[-1], len(prefix) + 1 + j))
        assert mine == drafts
        assert drafter.passes == len(drafts)  # one pass per window while the anchor stays
        if k % 5 == 0:
            ours = torch.stack([drafter.head.compute_logits(step.normed) for step in drafter.chain])
            ref = _eagle3_dense_logits(target, drafter.head, drafter.aux_layers, prefix, [c.token for c in chain[:-1]])
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)


def _expanded_parts(parts, Hn: int):
    """The target's embedding / norm / lm_head as the target expansion writes them."""
    embed, norm, lm_head = parts
    H0 = embed.weight.shape[1]
    e2 = nn.Embedding(V, Hn)
    n2 = RMSNorm(Hn, norm.eps * H0 / Hn)
    l2 = nn.Linear(Hn, V, bias=False)
    with torch.no_grad():
        e2.weight.zero_()
        e2.weight[:, :H0] = embed.weight
        n2.weight.fill_(0.7)
        n2.weight[:H0] = norm.weight * math.sqrt(H0 / Hn)
        l2.weight.normal_()
        l2.weight[:, :H0] = lm_head.weight
    return e2, n2, l2


@pytest.mark.parametrize("mixer,context", [("attention", 0), ("mlp", 0), ("attention", 2), ("mlp", 2)])
def test_expansion_is_exact(tmp_path, mixer, context):
    n, Hn = 3, 80
    parts = _target_parts()
    m = _module(n, mixer, parts=parts, context=context)
    with torch.no_grad():
        m.in_norm.uniform_(0.5, 1.5)
        if context and mixer == "attention":
            m.slot_embed.normal_(0, 0.5)
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    m.save_pretrained(src, dtype=torch.float32)
    bounds = expand_spd_module(src, dst, Hn, layer_map=[0, 2, 4, 6, 8, 10], num_layers_new=12, dtype="float32",
                               device="cpu", progress=False)
    assert bounds == [0, 4, 8, 12]
    big = SPDModule.from_pretrained(dst, *_expanded_parts(parts, Hn), dtype=torch.float32)
    ids, depths, feats = _windows(n)
    if context:  # two context slots in front, the first before the sequence's start
        ids = torch.cat([torch.randint(0, V, (ids.shape[0], context)), ids], dim=1)
        depths = torch.cat([torch.tensor([[-1, n]]).expand(ids.shape[0], -1), depths], dim=1)
        feats = torch.cat([torch.randn(feats.shape[0], context, H), feats], dim=1)
    padded = torch.cat([feats, torch.zeros(*feats.shape[:-1], Hn - H)], dim=-1)
    assert torch.allclose(big(ids, depths, padded), m(ids, depths, feats), atol=1e-4, rtol=1e-5)
    # A deeper target whose even split moves a source layer into another stage is refused.
    with pytest.raises(ExpansionError, match="do not hold the source's stages"):
        expand_spd_module(src, str(tmp_path / "bad"), Hn, layer_map=[0, 1, 2, 3, 4, 9], num_layers_new=10,
                          dtype="float32", device="cpu", progress=False)
    with pytest.raises(ExpansionError, match="target_hidden_new=32"):
        expand_spd_module(src, str(tmp_path / "bad"), 32, dtype="float32", device="cpu", progress=False)


def test_fixture_modules_fit_their_budget_and_match_their_names():
    dirs = [os.path.join(FIX, f"spd-{n}") for n in (2, 4)]
    if not all(os.path.isdir(d) for d in dirs):
        pytest.skip("fixture SPD modules not trained yet")
    total = sum(os.path.getsize(os.path.join(d, f)) for d in dirs for f in os.listdir(d))
    assert total <= 5 * (1 << 20)
    for n, d in zip((2, 4), dirs):
        cfg = SPDModuleConfig.from_pretrained(d)
        assert cfg.num_stages == n and cfg.target_hidden_size == 512 and cfg.vocab_size == 6144


def test_cli_refuses_options_of_the_other_methods(tmp_path, capsys):
    from parspec.cli import main

    data = str(tmp_path / "data.safetensors")
    DrafterData([torch.arange(3, 40)] * 6, [4] * 6, [True] * 6).save(data)
    target = os.path.join(FIX, "target")
    common = ["train-drafter", "--target", target, "--data", data, "--out", str(tmp_path / "out")]
    for extra, message in ((["--method", "spd", "--aux-layers", "1,2"], "does not take --aux-layers"),
                           (["--method", "spd", "--rebuild-vocab"], "does not take --rebuild-vocab"),
                           (["--method", "eagle3", "--num-stages", "4"], "does not take --num-stages"),
                           (["--method", "spd", "--module-hidden-size", "4096"], "over the 8.00 MiB budget")):
        assert main(common + extra) == 2
        assert message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_loader_refuses_a_lookahead_experiment_module(tmp_path):
    parts = _target_parts()
    m = _module(2, parts=parts)
    m.config.extra["lookahead"] = 2
    m.save_pretrained(str(tmp_path), dtype=torch.float32)
    with pytest.raises(ConfigError, match="lookahead=2"):
        SPDModule.from_pretrained(str(tmp_path), *parts)
