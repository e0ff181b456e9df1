"""Speculative decoding through the engine: greedy output is the non-speculative output,
token for token, for every proposer, batch size and K (float32, CPU); KV blocks all
come back; sampled output has the target's distribution."""

from __future__ import annotations

import itertools

import pytest
import torch

from parspec import LLM, SamplingParams
from parspec.config import ConfigError

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=24)


def _prompts(batch: int, vocab: int, seed: int = 0) -> list[dict]:
    """Prompts of varied length with repeats inside, so n-gram lookup finds matches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batch):
        motif = torch.randint(0, vocab, (3 + i % 4,), generator=g).tolist()
        noise = torch.randint(0, vocab, (1 + (5 * i) % 7,), generator=g).tolist()
        out.append({"prompt_token_ids": motif + noise + motif * (1 + i % 3)})
    return out


def perturbed_copy(hf, path: str, scale: float, seed: int = 0, tokenizer: bool = True) -> str:
    """The target with noise on every matrix: a draft model that agrees often, not always."""
    import copy

    from tests.conftest import write_tokenizer

    model = copy.deepcopy(hf)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * scale)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        write_tokenizer(path, hf.config.vocab_size)
    return path


@pytest.fixture(scope="module")
def pair(model_factory, tmp_path_factory):
    target, hf = model_factory("llama", seed=0)
    draft, _ = model_factory("llama", seed=1, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    close = perturbed_copy(hf, str(tmp_path_factory.mktemp("perturbed")), 0.03)
    prompts = _prompts(16, hf.config.vocab_size)
    reference = LLM(target, dtype="float32", block_size=4).generate(prompts, GREEDY, use_tqdm=False)
    return {"target": target, "draft": draft, "close": close}, prompts, [o.outputs[0].token_ids for o in reference]


SPECS = {
    "ngram": lambda m, k: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1,
                           "prompt_lookup_max": 3},
    # An unrelated random draft: almost everything is rejected.
    "draft_model": lambda m, k: {"method": "draft_model", "model": m["draft"], "num_speculative_tokens": k},
    # A perturbed copy of the target: a mix of accepts and rejects at every position.
    "close_draft": lambda m, k: {"method": "draft_model", "model": m["close"], "num_speculative_tokens": k},
    # The target drafting for itself: every draft is accepted, the bonus path runs every step.
    "self_draft": lambda m, k: {"method": "draft_model", "model": m["target"], "num_speculative_tokens": k},
}


@pytest.mark.parametrize("method,batch,k", list(itertools.product(SPECS, (1, 3, 8, 16), (1, 2, 4, 8))))
def test_greedy_speculation_is_lossless(pair, method, batch, k):
    models, prompts, expected = pair
    llm = LLM(models["target"], dtype="float32", block_size=4, speculative_config=SPECS[method](models, k))
    outs = llm.generate(prompts[:batch], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[:batch]
    stats = llm.engine.stats
    assert stats.num_steps > 0 and stats.num_accepted <= stats.num_drafted
    if method == "close_draft" and batch >= 8:
        assert 0 < stats.num_accepted < stats.num_drafted
    if method == "self_draft":
        assert stats.num_accepted == stats.num_drafted  # identical models agree on every draft
        assert stats.acceptance_length > min(k + 1, 2) - 0.5
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    assert sum(o.spec_stats["num_drafts"] for o in outs) == stats.num_drafts


def test_speculation_under_preemption_is_lossless(pair):
    models, prompts, expected = pair
    llm = LLM(models["target"], dtype="float32", block_size=4, num_kv_blocks=48, max_model_len=96,
              speculative_config={"method": "draft_model", "model": models["close"], "num_speculative_tokens": 4})
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.blocks.num_free_blocks == 48


def test_ngram_accepts_on_repetitive_text(pair):
    models, prompts, _ = pair
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 4}
    llm = LLM(models["target"], dtype="float32", speculative_config=spec)
    llm.generate(prompts, GREEDY, use_tqdm=False)
    assert llm.engine.stats.num_accepted > 0


def test_draft_model_errors(model_factory, tmp_path):
    target, _ = model_factory("llama")
    other_vocab, _ = model_factory("llama", seed=2, vocab_size=512)
    with pytest.raises(ConfigError, match="vocab_size=512"):
        LLM(target, speculative_config={"method": "draft_model", "model": other_vocab, "num_speculative_tokens": 2})
    with pytest.raises(ConfigError, match="needs \"model\""):
        LLM(target, speculative_config={"method": "draft_model", "num_speculative_tokens": 2})
    with pytest.raises(Exception, match="not found"):
        LLM(target, speculative_config={"method": "draft_model", "model": str(tmp_path / "none"),
                                        "num_speculative_tokens": 2})
