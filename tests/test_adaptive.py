"""Adaptive speculation depth: the policy on synthetic loads (costs and acceptance known), so
its choice can be checked against the best fixed depth computed by hand."""

import os
import random

import pytest

from parspec import LLM, SamplingParams
from parspec.config import ConfigError, SpeculativeConfig
from parspec.speculative.adaptive import AdaptiveDepth, candidate_depths, expected_tokens


def test_expected_tokens_is_the_mean_of_emitted_tokens():
    assert expected_tokens([0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens([1.0] * 7, 7) == 8.0
    assert candidate_depths(7) == [0, 1, 2, 3, 5, 7]
    assert candidate_depths(4) == [0, 1, 2, 3, 4]


def _simulate(policy, bucket, num_seqs, cost, accept, steps, seed=0):
    """Run `steps` decode steps: costs from cost(k), each draft accepted with prob accept[i]."""
    rng = random.Random(seed)
    seq_ids = list(range(num_seqs))
    for _ in range(steps):
        k = policy.choose(seq_ids, bucket)
        policy.record_cost(bucket, k, cost(k) * (1 + 0.02 * rng.random()))
        for s in seq_ids:
            n = 0
            while n < k and rng.random() < accept[n]:
                n += 1
            policy.observe(s, k, n)
    return [k for b, k in list(policy.history)[-50:] if b == bucket]


def _best_fixed(cost, accept, num_seqs, candidates):
    return max(candidates, key=lambda k: num_seqs * expected_tokens(accept, k) / cost(k))


def test_memory_bound_batch_speculates_deep():
    accept = [0.8] * 7
    cost = lambda k: 1.0 + 0.02 * k  # batch 1: a step reads the weights whatever k is
    chosen = _simulate(AdaptiveDepth(7), 1, 1, cost, accept, 300)
    assert _best_fixed(cost, accept, 1, candidate_depths(7)) == 7
    assert chosen.count(7) >= 45  # explores a neighbour 1 step in 16


def test_compute_bound_batch_with_poor_acceptance_stops_speculating():
    accept = [0.3] * 7
    cost = lambda k: 1.0 + 0.9 * k  # batch 64: every fed token costs compute
    chosen = _simulate(AdaptiveDepth(7), 64, 64, cost, accept, 300)
    assert _best_fixed(cost, accept, 64, candidate_depths(7)) == 0
    assert chosen.count(0) >= 45


def test_choice_tracks_an_intermediate_optimum_and_per_request_acceptance():
    cost = lambda k: 1.0 + 0.15 * k
    accept = [0.7] * 7
    best = _best_fixed(cost, accept, 8, candidate_depths(7))
    assert 0 < best < 7
    chosen = _simulate(AdaptiveDepth(7), 8, 8, cost, accept, 400)
    assert max(set(chosen), key=chosen.count) == best
    # Requests that stopped accepting pull the choice down.
    policy = AdaptiveDepth(7)
    for _ in range(50):
        policy.observe(1, 7, 7)
        policy.observe(2, 7, 0)
    assert policy.goodput_tokens([1], 7) > 7.0
    assert policy.goodput_tokens([2], 7) < 1.1


def test_release_forgets_a_request_and_bad_depth_is_refused():
    policy = AdaptiveDepth(3)
    policy.observe(5, 3, 0)
    assert 5 in policy.requests
    policy.release(5)
    assert 5 not in policy.requests
    with pytest.raises(ValueError, match="maximum depth"):
        AdaptiveDepth(0)


# --- wired into the engine -------------------------------------------------------------------

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "reference")
PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n", "for i in range(10):", "def fib(n):\n"]
AUTO = {
    "ngram": {"method": "ngram", "num_speculative_tokens": "auto", "max_num_speculative_tokens": 4,
              "prompt_lookup_min": 2},
    "draft_model": {"method": "draft_model", "model": os.path.join(FIX, "draft"), "num_speculative_tokens": "auto",
                    "max_num_speculative_tokens": 3},
    "p-eagle": {"method": "eagle3", "model": os.path.join(FIX, "p-eagle"), "num_speculative_tokens": "auto",
                "parallel_drafting": True},
}


@pytest.fixture(scope="module")
def no_spec_outputs():
    llm = LLM(os.path.join(FIX, "target"), dtype="float32")
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=40),
                                                         use_tqdm=False)]


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("max_num_seqs", [1, 3])
@pytest.mark.parametrize("method", list(AUTO))
def test_auto_depth_is_lossless_at_every_depth(method, max_num_seqs, async_scheduling, no_spec_outputs):
    """Greedy output with "auto" equals no-spec while the policy walks every candidate depth
    (0 .. K: its first steps measure each one), for every proposer, batch size and with the
    next step launched before the last is read; the KV pool is whole afterwards."""
    llm = LLM(os.path.join(FIX, "target"), dtype="float32", speculative_config=AUTO[method],
              max_num_seqs=max_num_seqs, async_scheduling=async_scheduling)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == no_spec_outputs
    policy = llm.engine.depth_policy
    assert set(k for _, k in policy.history) == set(policy.candidates)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    assert all(s.inflight == 0 for s in llm.engine.scheduler.running)
    # Verified drafts never exceed the step's depth: drafted <= sum of the chosen depths.
    assert llm.engine.stats.num_drafted <= sum(k for _, k in policy.history) * max_num_seqs


def test_shallow_step_verifies_exactly_a_fixed_k_step():
    """A step at depth 2 of K = 4 verifies what a K = 2 engine verifies: with n-gram drafts
    (whose first two are the K = 2 ones) and seeded sampling, the outputs agree token for token,
    so the shallow path feeds, verifies and draws noise as the fixed-K path does."""
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=32)
    fixed = LLM(os.path.join(FIX, "target"), dtype="float32",
                speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 2})
    want = [o.outputs[0].token_ids for o in fixed.generate(PROMPTS, params, use_tqdm=False)]
    auto = LLM(os.path.join(FIX, "target"), dtype="float32", speculative_config=AUTO["ngram"])
    auto.engine.depth_policy.choose = lambda seq_ids, bucket: 2
    got = [o.outputs[0].token_ids for o in auto.generate(PROMPTS, params, use_tqdm=False)]
    assert got == want
    assert fixed.engine.stats.num_drafted == auto.engine.stats.num_drafted > 0


def test_auto_config_keys():
    spec = SpeculativeConfig.from_any({"method": "ngram", "num_speculative_tokens": "auto"})
    assert spec.adaptive and spec.num_speculative_tokens == 7
    spec = SpeculativeConfig.from_any(AUTO["draft_model"])
    assert spec.adaptive and spec.num_speculative_tokens == 3
    with pytest.raises(ConfigError, match="max_num_speculative_tokens applies only"):
        SpeculativeConfig.from_any({"method": "ngram", "num_speculative_tokens": 3, "max_num_speculative_tokens": 5})
    with pytest.raises(ConfigError, match="max_num_speculative_tokens must be an integer >= 1, got 0"):
        SpeculativeConfig.from_any({"method": "ngram", "num_speculative_tokens": "auto",
                                    "max_num_speculative_tokens": 0})
    with pytest.raises(ConfigError, match="got 'deep'"):
        SpeculativeConfig.from_any({"method": "ngram", "num_speculative_tokens": "deep"})
    with pytest.raises(ConfigError, match="unknown speculative config keys \\['adaptive'\\]"):
        SpeculativeConfig.from_any({"method": "ngram", "num_speculative_tokens": 3, "adaptive": True})


def test_outlier_costs_are_dropped_and_a_slow_first_sample_is_replaced():
    policy = AdaptiveDepth(3)
    policy.record_cost(1, 3, 2.0)  # the step that captured a graph
    policy.record_cost(1, 3, 0.010)
    assert policy.buckets[1].seconds[3] == 0.010
    policy.record_cost(1, 3, 0.5)  # a pause of the host
    assert policy.buckets[1].seconds[3] == 0.010
    policy.record_cost(1, 3, 0.014)
    assert policy.buckets[1].seconds[3] == pytest.approx(0.011)


def test_current_borrows_the_nearest_measured_bucket():
    policy = AdaptiveDepth(3)
    assert policy.current([0], 8) == 3  # nothing known: K
    for k in policy.candidates:
        policy.record_cost(16, k, 1.0 + 2.0 * k)  # compute-bound: depth costs a lot
    for _ in range(20):
        policy.observe(0, 3, 0)
    assert policy.current([0], 8) == 0
    assert policy.current([0], 64) == 0


@pytest.mark.parametrize("method", ["ngram", "p-eagle"])
def test_warm_up_visits_every_bucket_and_depth_and_leaves_no_trace(method, no_spec_outputs):
    llm = LLM(os.path.join(FIX, "target"), dtype="float32", speculative_config=AUTO[method], max_num_seqs=3)
    engine = llm.engine
    calls = []
    original = engine.runner.step

    def recording(seqs, proposal, previous=None, chunks=None, depth=None):
        calls.append((len(seqs), chunks is not None, depth))
        return original(seqs, proposal, previous, chunks, depth)

    engine.runner.step = recording
    seconds = engine.warm_up()
    engine.runner.step = original
    assert seconds > 0
    policy = engine.depth_policy
    # Every (rows, depth) ran as a steady step and as one that also prefilled an arrival; on the
    # CPU every batch size is its own bucket, and the largest (3) runs one row short, to leave a
    # slot for the arrival.
    for mixed in (False, True):
        assert {(b, d) for b, m, d in calls if m == mixed and b} == {(b, d) for b in (1, 2) for d in policy.candidates}
    assert all(set(policy.buckets[b].seconds) == set(policy.candidates) for b in (1, 2))
    assert not policy.requests and policy.population.rates == [policy.prior_acceptance] * policy.k_max
    assert engine.stats.num_drafts == 0 and engine.pop_deltas() == []
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not engine.has_unfinished_requests()
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == no_spec_outputs


def test_population_estimate_is_not_set_by_the_last_few_requests():
    """At batch 64 each step brings 64 observations: the population's acceptance must reflect
    all of them, not the last handful (which made the served choice jump between depths)."""
    policy = AdaptiveDepth(7, prior_acceptance=0.9)
    rng = random.Random(0)
    for _ in range(40):  # steps
        for s in range(64):  # requests accept ~85% per position
            n = 0
            while n < 7 and rng.random() < 0.85:
                n += 1
            policy.observe(s, 7, n)
    assert 0.78 < policy.population.rates[0] < 0.92
    for s in range(61, 64):  # three requests in a row that reject at once
        policy.observe(s, 7, 0)
    assert policy.population.rates[0] > 0.75
