"""Adaptive speculation depth: the policy on synthetic loads (costs and acceptance known), so
its choice can be checked against the best fixed depth computed by hand."""

import random

import pytest

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
    return [k for b, k in policy.history[-50:] if b == bucket]


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
