"""End to end through the engine: sampled output has the target's distribution, with and
without speculation. Over a 6-token vocabulary the exact joint distribution of the
first three generated tokens is computed from HF transformers' logits (216 outcomes)
and compared with 20,000 engine samples."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from parspec import LLM, SamplingParams
from parspec.sampling import BatchSampling, probs_from_logits
from tests.test_spec_decode import perturbed_copy

V, N, PROMPT = 6, 20_000, [1, 2, 3]
PARAMS = SamplingParams(temperature=0.9, top_k=5, max_tokens=3, ignore_eos=True)


def exact_joint(hf) -> torch.Tensor:
    """P(t1, t2, t3 | PROMPT) under the target with PARAMS' temperature and top-k."""
    sampling = BatchSampling.from_params([PARAMS], "cpu")
    joint = torch.zeros(V, V, V, dtype=torch.float64)
    with torch.no_grad():
        for t1, t2 in itertools.product(range(V), range(V)):
            logits = hf(torch.tensor([PROMPT + [t1, t2]])).logits[0, -3:].float()
            p = probs_from_logits(logits[None], sampling)[0].double()  # rows: after prompt, t1, t2
            joint[t1, t2] = p[0, t1] * p[1, t2] * p[2]
    return joint.flatten()


def empirical(llm) -> torch.Tensor:
    outs = llm.generate([{"prompt_token_ids": PROMPT}] * N, PARAMS, use_tqdm=False)
    counts = torch.zeros(V ** 3, dtype=torch.float64)
    for o in outs:
        a, b, c = o.outputs[0].token_ids
        counts[a * V * V + b * V + c] += 1
    return counts / N


def tv(p, q) -> float:
    return 0.5 * (p - q).abs().sum().item()


# E[TV] <= 0.5 * sqrt(outcomes / N) (Cauchy-Schwarz), and TV moves by at most 1/N per sample,
# so by McDiarmid it exceeds that by sqrt(ln(1e6) / (2N)) with probability below 1e-6.
BOUND = 0.5 * math.sqrt(V ** 3 / N) + math.sqrt(math.log(1e6) / (2 * N))


@pytest.fixture(scope="module")
def models(model_factory, tmp_path_factory):
    target, hf = model_factory("llama", seed=5, vocab_size=V, tokenizer=False, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    draft = perturbed_copy(hf, str(tmp_path_factory.mktemp("draft6")), 0.4, seed=1, tokenizer=False)
    return target, draft, hf


def test_speculative_sampling_has_target_distribution(models):
    target, draft, hf = models
    exact = exact_joint(hf)
    common = dict(dtype="float32", skip_tokenizer_init=True, max_num_seqs=4096, max_num_batched_tokens=4096 * 4,
                  block_size=16, max_model_len=32, num_kv_blocks=4200)
    torch.manual_seed(0)
    plain = empirical(LLM(target, **common))
    spec_llm = LLM(target, speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": 2},
                   **common)
    spec = empirical(spec_llm)
    stats = spec_llm.engine.stats
    assert 0.05 < stats.num_accepted / stats.num_drafted < 0.95  # both accept and reject paths ran
    assert tv(plain, exact) < BOUND
    assert tv(spec, exact) < BOUND
    # The test can fail: the draft's own distribution is far outside the bound.
    draft_hf = type(hf).from_pretrained(draft).eval()
    assert tv(exact_joint(draft_hf), exact) > 2 * BOUND


def test_shallow_adaptive_steps_keep_the_target_distribution(models):
    """Adaptive depth with the drafter's q sliced to the step's depth (cycling 0, 1, 2 of K = 3):
    the rejection sampler still samples the target's exact distribution."""
    target, draft, hf = models
    common = dict(dtype="float32", skip_tokenizer_init=True, max_num_seqs=4096, max_num_batched_tokens=4096 * 4,
                  block_size=16, max_model_len=32, num_kv_blocks=4200)
    torch.manual_seed(1)
    llm = LLM(target, speculative_config={"method": "draft_model", "model": draft, "num_speculative_tokens": "auto",
                                          "max_num_speculative_tokens": 3}, **common)
    depths = itertools.cycle([1, 2, 0])
    llm.engine.depth_policy.choose = lambda seq_ids, bucket: next(depths)
    spec = empirical(llm)
    stats = llm.engine.stats
    assert 0.05 < stats.num_accepted / stats.num_drafted < 0.95
    assert stats.num_drafted < 3 * stats.num_drafts  # shallow steps verified fewer than K drafts
    assert tv(spec, exact_joint(hf)) < BOUND
