"""The OpenAI sampling fields with vLLM's semantics, lossless under speculation.

Each processing stage is checked against an independent oracle (HF transformers' logits
processors where they mean what vLLM means, hand-computed values otherwise); verify
position j of a row must see the history the non-speculative sampler would have there
(output + drafts 0..j-1), bit for bit; the rejection sampler applied to those processed
distributions emits exactly them; greedy speculative output with penalties equals the
non-speculative output for n-gram, the draft LM and P-EAGLE; logprobs are the raw
log-softmax of the target; every invalid value is a SamplingError naming it."""

from __future__ import annotations

import itertools
import math
import os
from collections import Counter

import pytest
import torch
from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from parspec import LLM, SamplingParams
from parspec.sampling import (BatchSampling, SamplingError, SamplingHistory, probs_from_logits, process_logits,
                              token_logprobs, unpack_logprobs)
from parspec.speculative.verify import rejection_components_ref, rejection_components_triton
from tests.test_spec_decode import perturbed_copy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "fixtures", "reference")
TARGET = os.path.join(FIX, "target")
needs_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="Triton kernels on CPU need TRITON_INTERPRET=1")
COMPONENT_IMPLS = [pytest.param(rejection_components_ref, id="ref"),
                   pytest.param(rejection_components_triton, id="triton", marks=needs_triton)]
INF = float("inf")


# --- validation ------------------------------------------------------------------------------
BAD = [("n", 0), ("n", 1.5), ("n", True), ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0),
       ("presence_penalty", 2.5), ("presence_penalty", -2.01), ("presence_penalty", math.nan),
       ("frequency_penalty", 3), ("frequency_penalty", "1"), ("repetition_penalty", 0),
       ("repetition_penalty", -1.0), ("repetition_penalty", INF), ("min_p", -0.1), ("min_p", 1.5),
       ("min_tokens", -1), ("min_tokens", 1.5), ("min_tokens", 17),  # > max_tokens=16
       ("logit_bias", [1, 2]), ("logit_bias", {-1: 1.0}), ("logit_bias", {"x": 1.0}), ("logit_bias", {1: "a"}),
       ("logit_bias", {1: math.nan}), ("include_stop_str_in_output", "yes")]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_invalid_values_are_sampling_errors_naming_them(name, value):
    with pytest.raises(SamplingError, match=name):
        SamplingParams(**{name: value})


def test_defaults_and_accepted_values_as_vllm():
    p = SamplingParams()
    assert (p.n, p.logprobs, p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p,
            p.min_tokens, p.logit_bias, p.include_stop_str_in_output) == (1, None, 0.0, 0.0, 1.0, 0.0, 0, None, False)
    assert not p.needs_history
    p = SamplingParams(n=3, logprobs=20, presence_penalty=-2, frequency_penalty=2, repetition_penalty=0.5,
                       min_p=1.0, min_tokens=16, include_stop_str_in_output=True)
    assert p.n == 3 and p.needs_history
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(max_tokens=None, min_tokens=1000).min_tokens == 1000
    # JSON sends string keys; OpenAI's range is [-100, 100] and vLLM clamps to it
    assert SamplingParams(logit_bias={"5": 150, 7: -300.5, 9: 0.25}).logit_bias == {5: 100.0, 7: -100.0, 9: 0.25}
    assert not SamplingParams(logit_bias={1: 5.0}).needs_history  # a bias reads no history


def test_out_of_vocabulary_logit_bias_is_rejected_and_the_engine_goes_on(model_factory):
    path, hf = model_factory("llama")
    llm = LLM(path, dtype="float32")
    vocab = hf.config.vocab_size
    with pytest.raises(SamplingError, match=f"logit_bias.*{vocab + 3}"):
        llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(logit_bias={vocab + 3: 1.0}), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=3, ignore_eos=True,
                                                                      logit_bias={vocab - 1: 1.0}), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3


# --- the oracle: vLLM's order, built from HF processors and plain Python -------------------
def oracle_logits(x: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int], eos=()) -> torch.Tensor:
    """One row's logits [V] before temperature: min_tokens, logit_bias, repetition (HF's
    processor over prompt + output), frequency and presence (OpenAI's formula, by hand)."""
    x = x.float().clone()
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos)):
            x[t] = -INF
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if p.repetition_penalty != 1:
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([prompt + output]), x[None])[0]
    for t, c in Counter(output).items():
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def oracle_probs(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Processed logits [V] -> the sampler's distribution: temperature, min_p, top-k, top-p."""
    if p.temperature == 0:
        return torch.nn.functional.one_hot(x.argmax(), x.numel()).float()
    x = (x / p.temperature)[None]
    if p.min_p > 0:
        x = MinPLogitsWarper(p.min_p)(None, x)
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(None, x)
    if p.top_p < 1:
        x = TopPLogitsWarper(p.top_p)(None, x)
    return x[0].softmax(-1)


def _batch(params, prompts, outputs, vocab, eos=()):
    s = BatchSampling.from_params(params, "cpu", prompts=prompts, vocab_size=vocab, eos_token_ids=eos)
    return s, SamplingHistory.build(outputs, len(params), vocab, "cpu")


def _random_rows(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=g) * 3
    prompts = [torch.randint(0, vocab, (5 + i,), generator=g).tolist() for i in range(n)]
    outputs = [torch.randint(0, vocab, (i * 3,), generator=g).tolist() for i in range(n)]
    return logits, prompts, outputs


def test_repetition_penalty_equals_hf():
    vocab = 40
    logits, prompts, outputs = _random_rows(4, vocab, seed=0)
    params = [SamplingParams(repetition_penalty=r) for r in (1.3, 0.7, 1.0, 2.5)]
    s, hist = _batch(params, prompts, outputs, vocab)
    got = process_logits(logits[:, None], s, hist)[:, 0]
    for i, p in enumerate(params):
        want = oracle_logits(logits[i], p, prompts[i], outputs[i])
        torch.testing.assert_close(got[i], want, rtol=1e-6, atol=0)
    assert torch.equal(got[2], logits[2])  # 1.0: untouched
    assert not torch.equal(got[0], logits[0])


def test_frequency_presence_min_tokens_and_logit_bias_by_hand():
    vocab, eos = 10, (9,)
    logits = torch.linspace(-2, 2, vocab).repeat(3, 1)
    params = [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
              SamplingParams(min_tokens=3, stop_token_ids=[4], logit_bias={2: 1.5, 4: 50.0}),
              SamplingParams(min_tokens=3, ignore_eos=True, logit_bias={9: -1.0})]
    outputs = [[3, 3, 5], [1, 1], [1, 1]]
    s, hist = _batch(params, [[0]] * 3, outputs, vocab, eos)
    got = process_logits(logits[:, None], s, hist)[:, 0]
    want = logits.clone()
    want[0, 3] -= 0.5 * 2 + 0.25
    want[0, 5] -= 0.5 * 1 + 0.25
    want[1, 2] += 1.5
    want[1, 4] = -INF  # a stop token while fewer than min_tokens are out: the bias does not revive it
    want[1, 9] = -INF  # EOS too
    want[2, 9] -= 1.0  # ignore_eos: EOS is not masked
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # at min_tokens output tokens nothing is masked any more
    s, hist = _batch(params[1:2], [[0]], [[1, 1, 1]], vocab, eos)
    assert torch.isfinite(process_logits(logits[1:2, None], s, hist)).all()


def test_min_p_top_k_top_p_equal_hf():
    vocab = 64
    logits, _, _ = _random_rows(6, vocab, seed=1)
    params = [SamplingParams(temperature=0.7, min_p=0.1), SamplingParams(temperature=1.3, min_p=0.02),
              SamplingParams(temperature=0.9, top_k=7), SamplingParams(temperature=1.0, top_p=0.8),
              SamplingParams(temperature=0.6, top_k=20, top_p=0.9, min_p=0.05), SamplingParams(temperature=0.0)]
    s = BatchSampling.from_params(params, "cpu")
    got = probs_from_logits(logits, s)
    for i, p in enumerate(params):
        torch.testing.assert_close(got[i], oracle_probs(logits[i], p), rtol=1e-5, atol=1e-7)
    assert (got[0] == 0).sum() > 0 and (got[2] > 0).sum() == 7


def test_the_whole_chain_in_vllms_order_equals_the_oracle():
    """Every stage at once, greedy and sampled rows, rows without any field in between."""
    vocab, eos = 48, (0,)
    logits, prompts, outputs = _random_rows(5, vocab, seed=2)
    full = dict(repetition_penalty=1.4, frequency_penalty=0.6, presence_penalty=-0.3, min_tokens=6,
                stop_token_ids=[7], logit_bias={3: 2.0, 11: -4.0})
    params = [SamplingParams(temperature=0.8, min_p=0.05, top_k=30, top_p=0.95, **full),
              SamplingParams(temperature=0.0, **full),  # penalties change greedy
              SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0, logit_bias={5: 3.0}),
              SamplingParams(temperature=1.1, presence_penalty=1.5)]
    s, hist = _batch(params, prompts, outputs, vocab, eos)
    got = probs_from_logits(process_logits(logits[:, None], s, hist), s)[:, 0]
    for i, p in enumerate(params):
        want = oracle_probs(oracle_logits(logits[i], p, prompts[i], outputs[i], eos), p)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-7)
    plain = BatchSampling.from_params([SamplingParams(temperature=0.0)], "cpu")
    assert not torch.equal(got[1], probs_from_logits(logits[1:2], plain)[0])  # greedy moved


# --- speculation: per-position history ------------------------------------------------------
PENALIZED = [SamplingParams(temperature=0.8, repetition_penalty=1.6, frequency_penalty=0.7, presence_penalty=0.4,
                            min_tokens=5, logit_bias={1: 0.5}),
             SamplingParams(temperature=0.0, frequency_penalty=1.5, min_tokens=3, stop_token_ids=[2]),
             SamplingParams(temperature=1.0),
             SamplingParams(temperature=0.6, repetition_penalty=0.6, presence_penalty=-1.0, min_p=0.1)]


def _spec_batch(vocab, k, seed):
    g = torch.Generator().manual_seed(seed)
    b = len(PENALIZED)
    logits = torch.randn(b, k + 1, vocab, generator=g) * 2
    drafts = torch.randint(0, 4, (b, k), generator=g)  # few distinct tokens: drafts repeat
    drafts[0, :3] = torch.tensor([3, 3, 3])
    num_drafts = torch.tensor([k, k - 1, k, 1], dtype=torch.int32)
    prompts = [torch.randint(0, vocab, (4,), generator=g).tolist() for _ in range(b)]
    outputs = [[3], [0, 1], [], [2, 2, 3]]
    return logits, drafts, num_drafts, prompts, outputs


def _non_speculative(logits_row, p, prompt, output, vocab, eos):
    """The processed logits the sampler would use at one position, with that history."""
    s, hist = _batch([p], [prompt], [output], vocab, eos)
    return process_logits(logits_row[None, None], s, hist)[0, 0]


def test_position_j_sees_the_output_plus_drafts_before_it_bit_for_bit():
    vocab, k, eos = 12, 4, (0,)
    logits, drafts, nd, prompts, outputs = _spec_batch(vocab, k, seed=3)
    s, hist = _batch(PENALIZED, prompts, outputs, vocab, eos)
    got = process_logits(logits, s, hist, drafts, nd)
    for b, j in itertools.product(range(len(PENALIZED)), range(k + 1)):
        if j > nd[b]:
            continue  # never read: a position past the row's drafts
        want = _non_speculative(logits[b, j], PENALIZED[b], prompts[b], outputs[b] + drafts[b, :j].tolist(),
                                vocab, eos)
        assert torch.equal(got[b, j], want), (b, j)
    # draft j-1 repeated at position j changes the penalty: token 3 was out once, then drafted 3 times
    p = PENALIZED[0]
    raw = [logits[0, j, 3].item() for j in range(4)]
    for j in range(4):
        x = raw[j] / p.repetition_penalty if raw[j] > 0 else raw[j] * p.repetition_penalty
        assert got[0, j, 3].item() == pytest.approx(x - p.frequency_penalty * (1 + j) - p.presence_penalty, abs=1e-5)
    # min_tokens counts the drafts too: row 1 has 2 tokens out and min_tokens=3
    assert got[1, 0, 2] == -INF and got[1, 0, 0] == -INF
    assert torch.isfinite(got[1, 1, [0, 2]]).all()


@pytest.mark.parametrize("impl", COMPONENT_IMPLS)
@pytest.mark.parametrize("with_q", [True, False], ids=["draft_probs", "ngram"])
def test_rejection_sampler_emits_the_processed_distribution_at_every_position(impl, with_q):
    """For each position j, with drafts 0..j-1 fixed and the draft at j ranging over every
    token x ~ q: P(emit v at j) = sum_x q(x) ([x == v] a(x) + (1 - a(x)) r_x(v)) must be the
    non-speculative sampler's distribution with the output + drafts 0..j-1 as history."""
    vocab, k, eos = 9, 3, (0,)
    g = torch.Generator().manual_seed(4)
    prompt, output = [1, 2, 3], [4, 4]
    prefix = [4, 5, 4]
    eye = torch.eye(vocab, dtype=torch.float64)
    for p in (PENALIZED[0], PENALIZED[3]):
        logits = (torch.randn(1, k + 1, vocab, generator=g) * 2).expand(vocab, k + 1, vocab)
        q = torch.softmax(torch.randn(k, vocab, generator=g), -1)
        s, hist = _batch([p] * vocab, [prompt] * vocab, [output] * vocab, vocab, eos)
        nd = torch.full((vocab,), k, dtype=torch.int32)
        for j in range(k):
            drafts = torch.tensor(prefix).repeat(vocab, 1)
            drafts[:, j] = torch.arange(vocab)  # row x drafts x at position j
            target = probs_from_logits(process_logits(logits, s, hist, drafts, nd), s)
            dq = q.expand(vocab, k, vocab).contiguous() if with_q else None
            a, res = impl(drafts, dq, target)
            per_x = eye * a[:, j, None].double() + (1 - a[:, j, None].double()) * res[:, j].double()  # [x, v]
            want = oracle_probs(oracle_logits(logits[0, j], p, prompt, output + prefix[:j], eos), p).double()
            if with_q:
                torch.testing.assert_close((q[j].double()[:, None] * per_x).sum(0), want, atol=1e-6, rtol=0)
            else:  # a deterministic draft: exact for every x
                torch.testing.assert_close(per_x, want.expand(vocab, vocab), atol=1e-6, rtol=0)
            if j > 0 and p.frequency_penalty:  # ignoring the drafts' history: another distribution
                stale = oracle_probs(oracle_logits(logits[0, j], p, prompt, output, eos), p).double()
                assert (stale - want).abs().max() > 1e-3


# --- end to end: the exact joint distribution of three sampled tokens ----------------------
V, N, PROMPT = 6, 20_000, [1, 2, 3]
STAT_PARAMS = SamplingParams(temperature=0.9, repetition_penalty=1.8, frequency_penalty=0.7, presence_penalty=0.5,
                             logit_bias={4: 0.8}, min_tokens=2, min_p=0.05, max_tokens=3)
BOUND = 0.5 * math.sqrt(V ** 3 / N) + math.sqrt(math.log(1e6) / (2 * N))  # see tests/test_spec_sampling.py


def _exact_joint(hf, params) -> torch.Tensor:
    joint = torch.zeros(V, V, V, dtype=torch.float64)
    with torch.no_grad():
        for t1, t2 in itertools.product(range(V), range(V)):
            logits = hf(torch.tensor([PROMPT + [t1, t2]])).logits[0, -3:].float()
            p = [oracle_probs(oracle_logits(logits[i], params, PROMPT, [t1, t2][:i], eos=(0,)), params).double()
                 for i in range(3)]
            joint[t1, t2] = p[0][t1] * p[1][t2] * p[2]
    return joint.flatten()


def _empirical(llm) -> torch.Tensor:
    counts = torch.zeros(V ** 3, dtype=torch.float64)
    for o in llm.generate([{"prompt_token_ids": PROMPT}] * N, STAT_PARAMS, use_tqdm=False):
        a, b, c = o.outputs[0].token_ids
        counts[a * V * V + b * V + c] += 1
    return counts / N


def test_speculative_sampling_with_penalties_has_the_exact_distribution(model_factory, tmp_path_factory):
    """The speculative engine's samples against the exact joint (the oracle's, from HF's
    logits): prefill, verify positions with drafts in the history, rejections and bonuses."""
    target, hf = model_factory("llama", seed=5, vocab_size=V, tokenizer=False, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    draft = perturbed_copy(hf, str(tmp_path_factory.mktemp("draft6p")), 0.4, seed=1, tokenizer=False)
    exact = _exact_joint(hf, STAT_PARAMS)
    common = dict(dtype="float32", skip_tokenizer_init=True, max_num_seqs=4096, max_num_batched_tokens=4096 * 4,
                  block_size=16, max_model_len=32, num_kv_blocks=4200)
    torch.manual_seed(0)
    spec_llm = LLM(target, speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 2},
                   **common)
    spec = _empirical(spec_llm)
    stats = spec_llm.engine.stats
    assert 0.05 < stats.num_accepted / stats.num_drafted < 0.95  # both accept and reject paths ran
    tv = lambda p, q: 0.5 * (p - q).abs().sum().item()  # noqa: E731
    assert tv(spec, exact) < BOUND
    # The test can fail: without the fields the distribution is far outside the bound.
    unprocessed = _exact_joint(hf, SamplingParams(temperature=0.9, max_tokens=3))
    assert tv(unprocessed, exact) > 2 * BOUND


# --- end to end on the fixture pair: greedy speculation stays lossless ----------------------
PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n", "for i in range(10):"]
SPECS = {
    "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3},
    "draft_model": {"method": "draft_model", "model": os.path.join(FIX, "draft"), "num_speculative_tokens": 3},
    "p-eagle": {"method": "eagle3", "model": os.path.join(FIX, "p-eagle"), "num_speculative_tokens": 4,
                "parallel_drafting": True},
}


@pytest.fixture(scope="module")
def hf_target():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def fixture_runs():
    """Per-prompt params mixing every field with plain rows; the non-speculative outputs."""
    llm = LLM(TARGET, dtype="float32")
    tok = llm.get_tokenizer()
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    first = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain, use_tqdm=False)]
    params = [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, repetition_penalty=1.3,
                             frequency_penalty=0.4, presence_penalty=0.3, min_tokens=4, stop_token_ids=[first[0][1]],
                             logit_bias={tok.encode(" x")[0]: 2.5}),
              plain,
              SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, frequency_penalty=1.2),
              SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logit_bias={first[3][2]: -100})]
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    return llm, params, first, outs


def test_non_speculative_greedy_with_the_fields_equals_an_hf_oracle(fixture_runs, hf_target):
    llm, params, first, outs = fixture_runs
    hf = hf_target
    for i in (0, 2, 3):
        prompt, p, got = outs[i].prompt_token_ids, params[i], outs[i].outputs[0].token_ids
        assert got != first[i]  # the fields changed the output
        ids = []
        with torch.no_grad():
            while len(ids) < p.max_tokens:
                logits = hf(torch.tensor([prompt + ids])).logits[0, -1]
                ids.append(int(oracle_logits(logits, p, prompt, ids).argmax()))
                if ids[-1] in p.stop_token_ids:
                    break
        assert got == ids
    assert outs[1].outputs[0].token_ids == first[1]


@pytest.mark.parametrize("method", list(SPECS))
def test_greedy_speculation_with_the_fields_is_lossless(fixture_runs, method):
    _, params, _, expected = fixture_runs
    llm = LLM(TARGET, dtype="float32", speculative_config=SPECS[method])
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    assert llm.engine.stats.num_accepted > 0
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_async_scheduling_waits_for_the_history_and_stays_lossless(fixture_runs):
    plain_llm, params, _, expected = fixture_runs
    llm = LLM(TARGET, dtype="float32", speculative_config=SPECS["p-eagle"], async_scheduling=True)
    continued, original = [], llm.engine._continue

    def spy():  # records, for each step launched ahead, whether a row reading the history was in it
        continued.append(any(s.params.needs_history for s in llm.engine._inflight[0]))
        return original()

    llm.engine._continue = spy
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    # Penalties / min_tokens read the host's tokens: no step is launched ahead while such a row
    # runs. Once those rows finish, the rows left (plain, bias) may overlap; whether any steps
    # remain then depends on how many tokens each row's drafts were accepted for.
    assert not any(continued)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    continued.clear()
    bias_only = [params[3]] * 2  # a bias reads no history: the steps still overlap
    outs = llm.generate(PROMPTS[:2], bias_only, use_tqdm=False)
    assert continued and not any(continued)
    sync = plain_llm.generate(PROMPTS[:2], bias_only, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in sync]


# --- logprobs ---------------------------------------------------------------------------------
def _generate_observing_steps(llm, prompts, params):
    """Generate, keeping every StepOutput the engine advanced its sequences with."""
    steps, original = [], llm.engine._advance

    def observe(seqs, out, *args, **kw):
        steps.append(out)
        return original(seqs, out, *args, **kw)

    llm.engine._advance = observe
    try:
        return llm.generate(prompts, params, use_tqdm=False), steps
    finally:
        del llm.engine._advance  # the class's method again


def test_logprobs_are_raw_log_softmax_with_rank_and_top(hf_target):
    hf = hf_target
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.5, max_tokens=12, ignore_eos=True, logprobs=0, seed=3,
                             repetition_penalty=1.5)]
    for spec in (None, SPECS["p-eagle"]):
        llm = LLM(TARGET, dtype="float32", speculative_config=spec)
        outs, steps = _generate_observing_steps(llm, PROMPTS[:3], params)
        assert any(s.logprobs is not None for s in steps)
        for o, p in zip(outs, params):
            lps, ids = o.outputs[0].logprobs, o.outputs[0].token_ids
            if p.logprobs is None:
                assert lps is None
                continue
            assert [t.token_id for t in lps] == ids  # one per token, the prefill's first included
            with torch.no_grad():
                ref = torch.log_softmax(hf(torch.tensor([o.prompt_token_ids + ids])).logits[0].float(), -1)
            ref = ref[len(o.prompt_token_ids) - 1:-1]  # the distribution each output token was drawn at
            got = torch.tensor([t.logprob for t in lps])
            torch.testing.assert_close(got, ref[torch.arange(len(ids)), ids], atol=1e-4, rtol=0)  # raw, not processed
            for i, t in enumerate(lps):  # 1 + the tokens more likely (HF's logits differ in the last bits)
                assert int((ref[i] > t.logprob + 1e-4).sum()) + 1 <= t.rank <= int((ref[i] >= t.logprob - 1e-4).sum())
            if p.greedy:
                assert all(t.rank == 1 and t.top[0][0] == t.token_id for t in lps)
            else:
                assert any(t.rank > 1 for t in lps)
            for i, t in enumerate(lps):
                assert len(t.top) == p.logprobs
                if t.top:
                    top = ref[i].topk(p.logprobs)
                    assert [x for x, _ in t.top] == top.indices.tolist()
                    torch.testing.assert_close(torch.tensor([v for _, v in t.top]), top.values, atol=1e-4, rtol=0)
        # nothing extra on a step where no row asked
        _, steps = _generate_observing_steps(llm, PROMPTS[:2], params[1])
        assert steps and all(s.logprob_data is None and s.logprobs is None for s in steps)


def test_token_logprobs_packing_round_trips():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2, 30, generator=g)
    tokens = torch.tensor([[4, -1], [0, 29], [7, 7]])
    packed = token_logprobs(logits, tokens, 4)
    assert packed.dtype == torch.int64 and packed.shape == (3, 2, 10)
    lp, rank, top_ids, top_lp = unpack_logprobs(packed)
    ref = torch.log_softmax(logits, -1)
    assert torch.equal(lp, ref.gather(2, tokens.clamp_min(0)[..., None])[..., 0])
    assert torch.equal(top_lp, ref.topk(4, -1).values) and torch.equal(top_ids, ref.topk(4, -1).indices)
    assert torch.equal(rank, (ref >= lp[..., None]).sum(-1))
    assert token_logprobs(logits[:, :, :3], tokens.clamp(0, 2), 20).shape == (3, 2, 2 + 2 * 3)  # top <= vocab
