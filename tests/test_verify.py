"""Tests of parspec.speculative.verify: Triton kernels (interpreter on CPU) == torch reference,
hand-computed greedy cases, and exactness of the rejection sampler's distribution."""

from __future__ import annotations

import math
import os

import pytest
import torch

import parspec.speculative.verify as verify
from parspec.speculative.verify import (
    PLACEHOLDER,
    draw_verification_noise,
    rejection_components_ref,
    rejection_components_triton,
    verify_greedy,
    verify_greedy_ref,
    verify_greedy_triton,
    verify_rejection,
    verify_rejection_ref,
    verify_rejection_triton,
)

# The kernels run on CPU tensors only through the interpreter (the Makefile sets it).
needs_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="Triton kernels on CPU need TRITON_INTERPRET=1")

REJECTION_IMPLS = [
    pytest.param(verify_rejection_ref, id="ref"),
    pytest.param(verify_rejection_triton, id="triton", marks=needs_triton),
]
COMPONENT_IMPLS = [
    pytest.param(rejection_components_ref, id="ref"),
    pytest.param(rejection_components_triton, id="triton", marks=needs_triton),
]


def _assert_same(a, b):
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    assert torch.equal(a[1], b[1]), (a[1], b[1])
    assert a[0].dtype == torch.int64 and a[1].dtype == torch.int32


def _random_batch(batch, k, vocab, seed, sharp=8.0):
    """Random logits/probs, drafts = target argmax with ~20% random corruption (so both
    accepts and rejects happen), num_drafts random in 0..K with row 0 forced to 0."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, k + 1, vocab, generator=g) * sharp
    drafts = logits.argmax(-1)[:, :k].clone()
    corrupt = torch.rand(batch, k, generator=g) < 0.2
    drafts = torch.where(corrupt, torch.randint(0, vocab, (batch, k), generator=g), drafts)
    num_drafts = torch.randint(0, k + 1, (batch,), generator=g, dtype=torch.int32)
    if batch > 1:
        num_drafts[0] = 0
    target_probs = torch.softmax(logits, -1)
    draft_probs = torch.softmax(torch.randn(batch, k, vocab, generator=g), -1)
    uniforms = torch.rand(batch, k, generator=g)
    noise = torch.empty(batch, vocab).exponential_(generator=g)
    return logits, drafts, num_drafts, target_probs, draft_probs, uniforms, noise


# ---------------------------------------------------------------------------------------
# Triton == reference, exactly
# ---------------------------------------------------------------------------------------

SIZES = [(b, k, v) for b in (1, 3, 8) for k in (1, 4, 8) for v in (17, 1000, 1500)]


@needs_triton
@pytest.mark.parametrize("batch,k,vocab", SIZES)
def test_greedy_triton_matches_ref(batch, k, vocab):
    logits, drafts, nd, *_ = _random_batch(batch, k, vocab, seed=batch * 100 + k * 10 + vocab)
    _assert_same(verify_greedy_triton(drafts, nd, logits), verify_greedy_ref(drafts, nd, logits))


@needs_triton
@pytest.mark.parametrize("with_q", [True, False], ids=["draft_probs", "ngram"])
@pytest.mark.parametrize("batch,k,vocab", SIZES)
def test_rejection_triton_matches_ref(batch, k, vocab, with_q):
    _, drafts, nd, p, q, u, noise = _random_batch(batch, k, vocab, seed=batch * 100 + k * 10 + vocab + 7)
    q = q if with_q else None
    _assert_same(verify_rejection_triton(drafts, nd, q, p, u, noise),
                 verify_rejection_ref(drafts, nd, q, p, u, noise))


@needs_triton
def test_rejection_triton_matches_ref_many_rows_small_blocks():
    """Many rows, a BLOCK_V that splits V unevenly, non-contiguous inputs, K = 0."""
    _, drafts, nd, p, q, u, noise = _random_batch(64, 3, 300, seed=5)
    for q_ in (q, None):
        ref = verify_rejection_ref(drafts, nd, q_, p, u, noise)
        _assert_same(verify_rejection_triton(drafts, nd, q_, p, u, noise, block_v=128), ref)
        accepted = ref[1]
        assert (accepted > 0).any() and (accepted < nd).any()  # both branches exercised
    # non-contiguous views
    p_big = torch.cat([p, p], dim=2)[:, :, :300]
    drafts_t = drafts.t().contiguous().t()
    _assert_same(verify_rejection_triton(drafts_t, nd, q, p_big, u, noise),
                 verify_rejection_ref(drafts, nd, q, p, u, noise))
    # K == 0: only the bonus token
    empty = torch.zeros(4, 0, dtype=torch.int64)
    zeros = torch.zeros(4, dtype=torch.int32)
    for q_ in (torch.zeros(4, 0, 300), None):
        args = (empty, zeros, q_, p[:4, :1].contiguous(), torch.zeros(4, 0), noise[:4])
        out = verify_rejection_ref(*args)
        _assert_same(verify_rejection_triton(*args), out)
        assert torch.equal(out[0][:, 0], (p[:4, 0] / noise[:4]).argmax(-1))


def test_dispatch_on_cpu_uses_reference():
    logits, drafts, nd, p, q, u, noise = _random_batch(5, 3, 40, seed=2)
    _assert_same(verify_greedy(drafts, nd, logits), verify_greedy_ref(drafts, nd, logits))
    _assert_same(verify_rejection(drafts, nd, q, p, u, noise),
                 verify_rejection_ref(drafts, nd, q, p, u, noise))


# ---------------------------------------------------------------------------------------
# greedy, by hand
# ---------------------------------------------------------------------------------------

GREEDY_IMPLS = [
    pytest.param(verify_greedy_ref, id="ref"),
    pytest.param(verify_greedy_triton, id="triton", marks=needs_triton),
]


@pytest.mark.parametrize("impl", GREEDY_IMPLS)
def test_greedy_hand_cases(impl):
    vocab, k = 6, 3
    # target argmax per row and position
    target = torch.tensor([
        [1, 2, 3, 4],   # all 3 drafts match -> bonus 4
        [5, 0, 0, 0],   # first draft wrong -> 5
        [2, 1, 1, 1],   # num_drafts = 0 -> argmax of position 0
        [3, 4, 5, 0],   # second draft wrong -> [3, 4]
        [0, 0, 2, 1],   # 2 drafts, both match -> bonus at position 2; draft 3 ignored
        [1, 2, 3, 4],   # tie at position 0 (argmax picks index 1), draft 4 rejected
    ])
    drafts = torch.tensor([[1, 2, 3], [4, 0, 0], [2, 1, 1], [3, 1, 5], [0, 0, 5], [4, 2, 3]])
    nd = torch.tensor([3, 3, 0, 3, 2, 3], dtype=torch.int32)
    logits = torch.nn.functional.one_hot(target, vocab).float()
    logits[5, 0, 4] = 1.0  # tie with index 1
    out, acc = impl(drafts, nd, logits)
    P = PLACEHOLDER
    assert out.tolist() == [[1, 2, 3, 4], [5, P, P, P], [2, P, P, P], [3, 4, P, P], [0, 0, 2, P],
                            [1, P, P, P]]
    assert acc.tolist() == [3, 0, 0, 1, 2, 0]
    assert out.shape == (6, k + 1)


# ---------------------------------------------------------------------------------------
# rejection sampling: special cases
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", REJECTION_IMPLS)
@pytest.mark.parametrize("with_q", [True, False], ids=["draft_probs", "ngram"])
def test_one_hot_target_equals_greedy(impl, with_q):
    batch, k, vocab = 8, 4, 1100  # two vocabulary blocks
    logits, drafts, nd, _, q, u, noise = _random_batch(batch, k, vocab, seed=11)
    p = torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
    u[0] = 0.0
    u[1] = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))  # largest u < 1
    nd[1] = k
    drafts[1] = logits[1].argmax(-1)[:k]  # all accepted even at u -> 1
    q[2, 0].zero_()
    q[2, 0, drafts[2, 0]] = 1.0  # q(x) = 1: residual 1_t - 1_x
    out = impl(drafts, nd, q if with_q else None, p, u, noise)
    _assert_same(out, verify_greedy_ref(drafts, nd, logits))
    assert out[1][1] == k


@pytest.mark.parametrize("impl", REJECTION_IMPLS)
def test_ties_go_to_smallest_index(impl):
    vocab = 1500
    p = torch.zeros(2, 2, vocab)
    p[:, :, [3, 700, 1200]] = 1.0 / 3.0
    q = torch.zeros(2, 1, vocab)
    q[:, :, 700] = 1.0
    drafts = torch.tensor([[700], [700]])
    nd = torch.tensor([1, 0], dtype=torch.int32)
    u = torch.tensor([[0.9], [0.0]])  # row 0: a = 1/3 -> rejected
    noise = torch.ones(2, vocab)
    out, acc = impl(drafts, nd, q, p, u, noise)
    assert acc.tolist() == [0, 0]
    assert out[:, 0].tolist() == [3, 3]  # residual {3, 1200} tie -> 3; bonus {3, 700, 1200} -> 3


@pytest.mark.parametrize("impl", REJECTION_IMPLS)
def test_zero_residual_falls_back_to_target(impl):
    """p <= q everywhere (only possible for normalised probs through rounding; forced
    here with p = q / 2): a rejection then has an all-zero residual and samples p."""
    batch, vocab = 4, 1100
    g = torch.Generator().manual_seed(4)
    q = torch.softmax(torch.randn(batch, 1, vocab, generator=g), -1)
    p = torch.cat([q / 2, torch.softmax(torch.randn(batch, 1, vocab, generator=g), -1)], 1)
    drafts = q[:, 0].argmax(-1, keepdim=True)
    nd = torch.ones(batch, dtype=torch.int32)
    u = torch.full((batch, 1), 0.75)  # a = 1/2 -> rejected
    noise = torch.empty(batch, vocab).exponential_(generator=g)
    out, acc = impl(drafts, nd, q, p, u, noise)
    assert acc.tolist() == [0] * batch
    assert torch.equal(out[:, 0], (p[:, 0] / noise).argmax(-1))


@pytest.mark.parametrize("impl", REJECTION_IMPLS)
def test_no_reads_beyond_num_drafts(impl):
    batch, k, vocab = 6, 5, 1100
    logits, drafts, nd, p, q, u, noise = _random_batch(batch, k, vocab, seed=3)
    nd = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32)
    clean_rej = [impl(drafts, nd, q_, p, u, noise) for q_ in (q, None)]
    clean_greedy = verify_greedy_ref(drafts, nd, logits)
    pos = torch.arange(k)
    beyond = pos[None, :] >= nd[:, None]           # draft slots not in use
    beyond_target = torch.arange(k + 1)[None, :] > nd[:, None]  # past the bonus position
    d2 = torch.where(beyond, torch.where(pos % 2 == 0, -7, 10**9), drafts)
    p2 = p.masked_fill(beyond_target[..., None], float("nan"))
    q2 = q.masked_fill(beyond[..., None], float("nan"))
    u2 = u.masked_fill(beyond, float("nan"))
    logits2 = logits.masked_fill(beyond_target[..., None], float("nan"))
    for q_, clean in zip((q2, None), clean_rej):
        _assert_same(impl(d2, nd, q_, p2, u2, noise), clean)
    greedy = [verify_greedy_ref]
    if os.environ.get("TRITON_INTERPRET") == "1":
        greedy.append(verify_greedy_triton)
    for g in greedy:
        _assert_same(g(d2, nd, logits2), clean_greedy)


# ---------------------------------------------------------------------------------------
# noise
# ---------------------------------------------------------------------------------------

def test_seeded_noise_reproducible_regardless_of_batch():
    k, vocab = 4, 300

    def gen(seed):
        return torch.Generator().manual_seed(seed)

    u1, n1 = draw_verification_noise(3, k, vocab, [None, gen(123), gen(5)], "cpu")
    u2, n2 = draw_verification_noise(5, k, vocab, [gen(123), None, None, gen(9), None], "cpu")
    u3, n3 = draw_verification_noise(1, k, vocab, [gen(123)], "cpu")
    for u, n, row in ((u2, n2, 0), (u3, n3, 0)):
        assert torch.equal(u[row], u1[1]) and torch.equal(n[row], n1[1])
    # the seeded row draws uniforms first, then noise
    g = gen(123)
    assert torch.equal(u1[1], torch.rand(k, generator=g))
    assert torch.equal(n1[1], torch.empty(vocab).exponential_(generator=g).clamp_min(
        torch.finfo(torch.float32).tiny))
    for u, n in ((u1, n1), (u2, n2), (u3, n3)):
        assert u.dtype == n.dtype == torch.float32
        assert u.shape[1] == k and n.shape[1] == vocab
        assert ((u >= 0) & (u < 1)).all()
        assert (n > 0).all() and torch.isfinite(n).all()
    assert not torch.equal(u2[1], u2[2])  # unseeded rows are not copies of each other


# ---------------------------------------------------------------------------------------
# exactness of the implied distribution
# ---------------------------------------------------------------------------------------

def _prob_pairs(vocab, seed):
    """(p, q) pairs over a small vocabulary, including the edge cases."""
    g = torch.Generator().manual_seed(seed)

    def rand_dist(scale=1.5):
        return torch.softmax(torch.randn(vocab, generator=g) * scale, -1)

    def truncated(d, keep):
        d = d.clone()
        d[torch.randperm(vocab, generator=g)[: vocab - keep]] = 0.0
        return d / d.sum()

    p = rand_dist()
    disjoint_p = torch.zeros(vocab)
    disjoint_p[: vocab // 2] = 1.0 / (vocab // 2)
    disjoint_q = torch.zeros(vocab)
    disjoint_q[vocab // 2:] = 1.0 / (vocab - vocab // 2)
    one_hot = torch.zeros(vocab)
    one_hot[2] = 1.0
    return [
        (rand_dist(), rand_dist()),
        (rand_dist(3.0), rand_dist(0.5)),
        (truncated(rand_dist(), 3), rand_dist()),             # top-k style target
        (rand_dist(), truncated(rand_dist(), 4)),             # draft with zeros where p > 0
        (p, p.clone()),                                       # residual all zero -> p fallback
        (p, p[torch.randperm(vocab, generator=g)]),
        (disjoint_p, disjoint_q),                             # disjoint supports
        (one_hot, rand_dist()),                               # greedy target
    ]


@pytest.mark.parametrize("impl", COMPONENT_IMPLS)
@pytest.mark.parametrize("vocab", [7, 13])
def test_implied_distribution_equals_target(impl, vocab):
    """From the components the implementation returns: for draft x ~ q,
    P(emit v) = sum_x q(x) [ [x == v] a(x) + (1 - a(x)) r_x(v) ] must equal p(v);
    for the n-gram drafter (q one-hot at x) this must hold for EVERY x."""
    pairs = _prob_pairs(vocab, seed=vocab)
    n = len(pairs)
    # one row per (pair, draft value x); K = 2 with the pair at position 1 (position 0 junk)
    p = torch.stack([pp for pp, _ in pairs]).repeat_interleave(vocab, 0)  # [n*V, V]
    q = torch.stack([qq for _, qq in pairs]).repeat_interleave(vocab, 0)
    x = torch.arange(vocab).repeat(n)
    junk = torch.softmax(torch.randn(n * vocab, vocab), -1)
    drafts = torch.stack([torch.zeros_like(x), x], 1)
    target = torch.stack([junk, p, junk], 1)
    eye = torch.eye(vocab, dtype=torch.float64)
    for with_q in (True, False):
        dq = torch.stack([junk, q], 1) if with_q else None
        a, res = impl(drafts, dq, target)
        a, res = a[:, 1].double().view(n, vocab), res[:, 1].double().view(n, vocab, vocab)
        # per draft value x: [x == v] a(x) + (1 - a(x)) r_x(v)
        per_x = eye[None] * a[..., None] + (1 - a[..., None]) * res
        p_ref = torch.stack([pp for pp, _ in pairs]).double()
        if with_q:
            q_ref = torch.stack([qq for _, qq in pairs]).double()
            implied = (q_ref[..., None] * per_x).sum(1)
            torch.testing.assert_close(implied, p_ref, atol=1e-6, rtol=0)
        else:
            torch.testing.assert_close(per_x, p_ref[:, None, :].expand_as(per_x), atol=1e-6, rtol=0)
        assert ((a >= 0) & (a <= 1)).all()
        torch.testing.assert_close(res.sum(-1), torch.ones(n, vocab, dtype=torch.float64),
                                   atol=1e-6, rtol=0)


@needs_triton
def test_components_triton_matches_ref():
    _, drafts, _, p, q, _, _ = _random_batch(5, 3, 1500, seed=8)
    for q_ in (q, None):
        a1, r1 = rejection_components_ref(drafts, q_, p)
        a2, r2 = rejection_components_triton(drafts, q_, p)
        assert torch.equal(a1, a2)  # same IEEE operations
        torch.testing.assert_close(r1, r2, atol=1e-7, rtol=1e-5)  # sums differ in order only


@pytest.mark.parametrize("impl,comp", [
    pytest.param(verify_rejection_ref, rejection_components_ref, id="ref"),
    pytest.param(verify_rejection_triton, rejection_components_triton, id="triton", marks=needs_triton),
])
@pytest.mark.parametrize("with_q", [True, False], ids=["draft_probs", "ngram"])
def test_sampling_decisions_match_components(impl, comp, with_q):
    """Acceptance flips exactly at u = a(x) (u just below accepts, u = a rejects); the
    emitted token is the race argmax over the residual the components report (bonus: p_n)."""
    batch, k, vocab = 24, 4, 1100
    g = torch.Generator().manual_seed(17)
    p = torch.softmax(torch.randn(batch, k + 1, vocab, generator=g) * 3, -1)
    q = torch.softmax(torch.randn(batch, k, vocab, generator=g) * 3, -1) if with_q else None
    drafts = torch.randint(0, vocab, (batch, k), generator=g)
    drafts[: batch // 2] = p[: batch // 2, :k].argmax(-1)  # some a(x) == 1 rows
    nd = torch.randint(0, k + 1, (batch,), generator=g, dtype=torch.int32)
    a, res = comp(drafts, q, p)
    assert (a > 0).all()
    # desired number of accepted drafts per row, then u just below a before it, u = a at it
    want = (torch.rand(batch, generator=g) * (nd.float() + 1)).long().clamp_max(nd.long())
    pos = torch.arange(k)[None, :]
    below = torch.nextafter(a, torch.zeros_like(a))
    u = torch.where(pos < want[:, None], below, a)
    u = torch.where(pos > want[:, None], torch.rand(batch, k, generator=g), u)
    noise = torch.empty(batch, vocab).exponential_(generator=g)
    out, acc = impl(drafts, nd, q, p, u, noise)
    assert acc.tolist() == want.int().tolist()
    rows = torch.arange(batch)
    j = want.clamp_max(k - 1)
    recovered = (res[rows, j] / noise).argmax(-1)
    bonus = (p[rows, want] / noise).argmax(-1)
    expected = torch.where(want < nd.long(), recovered, bonus)
    assert torch.equal(out[rows, want], expected)
    for b in range(batch):
        assert out[b, : want[b]].tolist() == drafts[b, : want[b]].tolist()
        assert (out[b, want[b] + 1:] == PLACEHOLDER).all()
    assert (want < nd.long()).any() and (want == nd.long()).any()


# ---------------------------------------------------------------------------------------
# statistics end to end
# ---------------------------------------------------------------------------------------

P_STAT = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.10, 0.05, 0.00])
Q_STAT = torch.tensor([0.00, 0.05, 0.10, 0.10, 0.10, 0.15, 0.20, 0.30])  # TV(p, q) = 0.5


def _tv_bound(vocab: int, n: int, delta: float = 1e-6) -> float:
    """High-probability bound on TV(empirical, true) for n i.i.d. samples over `vocab` values.

    E|p̂_v - p_v| <= sqrt(p_v (1 - p_v) / n), so by Cauchy-Schwarz E[TV] <= 0.5 sqrt(vocab / n);
    TV changes by at most 1/n when one sample changes, so McDiarmid gives
    P(TV > E[TV] + t) <= exp(-2 n t^2); t = sqrt(ln(1/delta) / (2n)) for failure prob delta.
    """
    return 0.5 * math.sqrt(vocab / n) + math.sqrt(math.log(1 / delta) / (2 * n))


def _tv(samples: torch.Tensor, p: torch.Tensor) -> float:
    hist = torch.bincount(samples, minlength=p.numel()).double() / samples.numel()
    return 0.5 * (hist - p.double()).abs().sum().item()


def _stat_batch(n_rows, k, seed, with_q):
    vocab = P_STAT.numel()
    g = torch.Generator().manual_seed(seed)
    # a different (p, q) per position: a permutation of the same pair
    perms = [torch.randperm(vocab, generator=g) for _ in range(k + 1)]
    p_pos = torch.stack([P_STAT[perm] for perm in perms])      # [K+1, V]
    q_pos = torch.stack([Q_STAT[perm] for perm in perms[:k]])  # [K, V]
    target = p_pos.expand(n_rows, k + 1, vocab).contiguous()
    if with_q:
        draft_probs = q_pos.expand(n_rows, k, vocab).contiguous()
        drafts = torch.stack([torch.multinomial(q_pos[i], n_rows, replacement=True, generator=g)
                              for i in range(k)], 1)
    else:
        # deterministic drafter: a fixed token per position (one with p(x) large, one with p(x) = 0)
        draft_probs = None
        fixed = torch.stack([perm.argsort()[i % 2 * 7] for i, perm in enumerate(perms[:k])])
        drafts = fixed.expand(n_rows, k).contiguous()
    nd = torch.randint(0, k + 1, (n_rows,), generator=g, dtype=torch.int32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        u, noise = draw_verification_noise(n_rows, k, vocab, [None] * n_rows, "cpu")
    return drafts, nd, draft_probs, target, u, noise, p_pos


@pytest.mark.parametrize("with_q", [True, False], ids=["draft_probs", "ngram"])
def test_statistical_emitted_tokens_follow_target(with_q, monkeypatch):
    n_rows, k = 20_000, 3
    vocab = P_STAT.numel()
    drafts, nd, dq, target, u, noise, p_pos = _stat_batch(n_rows, k, seed=42, with_q=with_q)
    out, acc = verify_rejection_ref(drafts, nd, dq, target, u, noise)
    bound = _tv_bound(vocab, n_rows)
    assert _tv(out[:, 0], p_pos[0]) < bound
    # second emitted token, among rows that accepted their first draft: ~ p_1 (selection
    # depends only on position-0 randomness)
    second = out[acc >= 1, 1]
    assert second.numel() > 2000
    assert _tv(second, p_pos[1]) < _tv_bound(vocab, second.numel())

    # Negative controls: the same check must FAIL for wrong samplers.
    # (1) always emit the draft (rows without drafts keep their bonus token)
    wrong = torch.where(nd > 0, drafts[:, 0], out[:, 0])
    # (2) recover from p instead of the residual max(p - q, 0)
    monkeypatch.setattr(verify, "residual_ref", lambda p, q: p.clone())
    wrong2, _ = verify_rejection_ref(drafts, nd, dq, target, u, noise)
    monkeypatch.undo()
    assert _tv(wrong, p_pos[0]) > bound
    assert _tv(wrong2[:, 0], p_pos[0]) > bound
    # and by a margin that sampling noise cannot explain (analytic TV >= 0.75 * 0.2 here)
    assert _tv(wrong2[:, 0], p_pos[0]) > 2 * bound


@needs_triton
@pytest.mark.parametrize("with_q", [True, False], ids=["draft_probs", "ngram"])
def test_statistical_triton_small_batch(with_q):
    n_rows, k = 800, 2  # the interpreter runs ~8 ms per program
    drafts, nd, dq, target, u, noise, p_pos = _stat_batch(n_rows, k, seed=7, with_q=with_q)
    out = verify_rejection_triton(drafts, nd, dq, target, u, noise)
    _assert_same(out, verify_rejection_ref(drafts, nd, dq, target, u, noise))
    assert _tv(out[0][:, 0], p_pos[0]) < _tv_bound(P_STAT.numel(), n_rows)
