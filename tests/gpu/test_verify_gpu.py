"""Verification kernels on CUDA: Triton == torch reference exactly (identical integer
outputs) at realistic sizes (B up to 64, K up to 8, V 6144 and 128256, float32 probs), an
end-to-end distribution check, and a timing table (printed, not asserted). Skipped without
a GPU and under TRITON_INTERPRET=1.

    pytest -q tests/gpu/test_verify_gpu.py -s
"""

from __future__ import annotations

import math
import os

import pytest
import torch

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

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="GPU tests run the compiled kernels, not the interpreter"),
]


def _assert_same(a, b):
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    assert torch.equal(a[1], b[1]), (a[1], b[1])


def _batch(batch, k, vocab, seed, sharp=8.0):
    """Drafts = target argmax with 20% random corruption; num_drafts random in 0..K."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    logits = torch.randn(batch, k + 1, vocab, generator=g, device="cuda") * sharp
    drafts = logits.argmax(-1)[:, :k].clone()
    corrupt = torch.rand(batch, k, generator=g, device="cuda") < 0.2
    drafts = torch.where(corrupt, torch.randint(0, vocab, (batch, k), generator=g, device="cuda"), drafts)
    nd = torch.randint(0, k + 1, (batch,), generator=g, device="cuda", dtype=torch.int32)
    if batch > 1:
        nd[0] = 0
    p = torch.softmax(logits, -1)
    q = torch.softmax(torch.randn(batch, k, vocab, generator=g, device="cuda") * 2, -1)
    u = torch.rand(batch, k, generator=g, device="cuda")
    noise = torch.empty(batch, vocab, device="cuda").exponential_(generator=g)
    return logits, drafts, nd, p, q, u, noise


SIZES = [(b, k, v) for b in (1, 16, 64) for k in (1, 4, 8) for v in (6144, 128256)]


@pytest.mark.parametrize("batch,k,vocab", SIZES)
def test_greedy_triton_matches_ref(batch, k, vocab):
    logits, drafts, nd, *_ = _batch(batch, k, vocab, seed=batch + 10 * k + vocab)
    _assert_same(verify_greedy_triton(drafts, nd, logits), verify_greedy_ref(drafts, nd, logits))
    _assert_same(verify_greedy(drafts, nd, logits), verify_greedy_ref(drafts, nd, logits))


@pytest.mark.parametrize("with_q", [True, False], ids=["draft_probs", "ngram"])
@pytest.mark.parametrize("batch,k,vocab", SIZES)
def test_rejection_triton_matches_ref(batch, k, vocab, with_q):
    _, drafts, nd, p, q, u, noise = _batch(batch, k, vocab, seed=batch + 10 * k + vocab + 1)
    q = q if with_q else None
    ref = verify_rejection_ref(drafts, nd, q, p, u, noise)
    _assert_same(verify_rejection_triton(drafts, nd, q, p, u, noise), ref)
    _assert_same(verify_rejection(drafts, nd, q, p, u, noise), ref)


@pytest.mark.parametrize("with_q", [True, False], ids=["draft_probs", "ngram"])
def test_one_hot_target_equals_greedy(with_q):
    logits, drafts, nd, _, q, u, noise = _batch(64, 8, 128256, seed=3)
    p = torch.nn.functional.one_hot(logits.argmax(-1), 128256).float()
    out = verify_rejection_triton(drafts, nd, q if with_q else None, p, u, noise)
    _assert_same(out, verify_greedy_ref(drafts, nd, logits))


def test_no_reads_beyond_num_drafts():
    batch, k, vocab = 9, 8, 6144
    logits, drafts, nd, p, q, u, noise = _batch(batch, k, vocab, seed=4)
    nd = torch.arange(batch, device="cuda", dtype=torch.int32)
    clean = [verify_rejection_triton(drafts, nd, q_, p, u, noise) for q_ in (q, None)]
    clean_greedy = verify_greedy_triton(drafts, nd, logits)
    pos = torch.arange(k, device="cuda")
    beyond = pos[None, :] >= nd[:, None]
    beyond_target = torch.arange(k + 1, device="cuda")[None, :] > nd[:, None]
    d2 = torch.where(beyond, torch.where(pos % 2 == 0, -7, 10**9), drafts)
    p2 = p.masked_fill(beyond_target[..., None], float("nan"))
    q2 = q.masked_fill(beyond[..., None], float("nan"))
    u2 = u.masked_fill(beyond, float("nan"))
    for q_, ref in zip((q2, None), clean):
        _assert_same(verify_rejection_triton(d2, nd, q_, p2, u2, noise), ref)
    _assert_same(verify_greedy_triton(d2, nd, logits.masked_fill(beyond_target[..., None], float("nan"))),
                 clean_greedy)


def test_components_triton_matches_ref():
    _, drafts, _, p, q, _, _ = _batch(16, 4, 128256, seed=5)
    for q_ in (q, None):
        a1, r1 = rejection_components_ref(drafts, q_, p)
        a2, r2 = rejection_components_triton(drafts, q_, p)
        assert torch.equal(a1, a2)
        torch.testing.assert_close(r1, r2, atol=1e-7, rtol=1e-5)


def test_seeded_noise_reproducible_on_cuda():
    def gen(seed):
        return torch.Generator(device="cuda").manual_seed(seed)

    u1, n1 = draw_verification_noise(3, 8, 128256, [None, gen(1), gen(2)], "cuda")
    u2, n2 = draw_verification_noise(2, 8, 128256, [gen(1), None], "cuda")
    assert torch.equal(u1[1], u2[0]) and torch.equal(n1[1], n2[0])
    assert (n1 > 0).all() and ((u1 >= 0) & (u1 < 1)).all()


def test_statistical_first_token_follows_target():
    """20k rows through the compiled kernel; TV bound as in tests/test_verify.py
    (0.5 sqrt(V/N) expected + McDiarmid deviation at failure probability 1e-6)."""
    n_rows, k = 20_000, 3
    p0 = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.10, 0.05, 0.00], device="cuda")
    q0 = torch.tensor([0.00, 0.05, 0.10, 0.10, 0.10, 0.15, 0.20, 0.30], device="cuda")
    vocab = p0.numel()
    g = torch.Generator(device="cuda").manual_seed(0)
    target = p0.expand(n_rows, k + 1, vocab).contiguous()
    draft_probs = q0.expand(n_rows, k, vocab).contiguous()
    drafts = torch.multinomial(q0, n_rows * k, replacement=True, generator=g).view(n_rows, k)
    nd = torch.randint(0, k + 1, (n_rows,), generator=g, device="cuda", dtype=torch.int32)
    with torch.random.fork_rng(devices=[torch.cuda.current_device()]):
        torch.manual_seed(1)
        u, noise = draw_verification_noise(n_rows, k, vocab, [None] * n_rows, "cuda")
    out, _ = verify_rejection_triton(drafts, nd, draft_probs, target, u, noise)
    hist = torch.bincount(out[:, 0], minlength=vocab).double() / n_rows
    tv = 0.5 * (hist - p0.double()).abs().sum().item()
    bound = 0.5 * math.sqrt(vocab / n_rows) + math.sqrt(math.log(1e6) / (2 * n_rows))
    assert tv < bound
    assert (out[:, k + 1:] == PLACEHOLDER).all()


def _time_ms(fn, iters=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def test_timing_table():
    """Per-call time of Triton vs reference (printed; run with -s)."""
    rows = []
    for batch, k, vocab in [(1, 8, 128256), (16, 8, 128256), (64, 8, 128256), (64, 8, 6144)]:
        logits, drafts, nd, p, q, u, noise = _batch(batch, k, vocab, seed=9)
        for name, fn in [
            ("greedy triton", lambda: verify_greedy_triton(drafts, nd, logits)),
            ("greedy ref", lambda: verify_greedy_ref(drafts, nd, logits)),
            ("rejection triton", lambda: verify_rejection_triton(drafts, nd, q, p, u, noise)),
            ("rejection ref", lambda: verify_rejection_ref(drafts, nd, q, p, u, noise)),
            ("ngram triton", lambda: verify_rejection_triton(drafts, nd, None, p, u, noise)),
            ("ngram ref", lambda: verify_rejection_ref(drafts, nd, None, p, u, noise)),
        ]:
            rows.append((batch, k, vocab, name, _time_ms(fn)))
    print("\n  B  K      V  impl                 ms/call")
    for batch, k, vocab, name, ms in rows:
        print(f"{batch:3d} {k:2d} {vocab:6d}  {name:18s} {ms:9.4f}")
