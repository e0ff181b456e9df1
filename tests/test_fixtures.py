"""The bundled reference pair: it loads, writes what it wrote when it was committed, fits
its size budget, and every proposer stays lossless on it at realistic acceptance."""

from __future__ import annotations

import itertools
import json
import os

import pytest

from parspec import LLM, SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "fixtures", "reference")
TARGET = os.path.join(FIX, "target")
MiB = 1 << 20


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _prompts(n: int) -> list[str]:
    with open(os.path.join(REPO, "fixtures", "demo_prompts.jsonl"), encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()][:n]


def test_fixture_size_budget():
    assert _dir_bytes(os.path.join(REPO, "fixtures")) <= 48 * MiB
    assert _dir_bytes(TARGET) <= 24 * MiB
    for head in ("eagle3", "p-eagle"):
        assert os.path.getsize(os.path.join(FIX, head, "model.safetensors")) <= 8 * MiB
    for root, _, files in os.walk(os.path.join(REPO, "fixtures")):
        for f in files:
            if f.endswith(".safetensors"):
                assert os.path.getsize(os.path.join(root, f)) <= 15 * MiB, f


@pytest.fixture(scope="module")
def target_llm():
    return LLM(TARGET, dtype="float32")


def test_fixture_target_greedy_completion_is_recorded_one(target_llm):
    """Recorded when the pair was committed (fp32, CPU); a change here means the model,
    the tokenizer or the engine changed what it computes."""
    out = target_llm.generate("def fibonacci(n):\n", SamplingParams(temperature=0.0, max_tokens=24),
                              use_tqdm=False)[0].outputs[0]
    assert out.text == EXPECTED_FIBONACCI
    assert out.token_ids[:6] == EXPECTED_FIBONACCI_IDS


EXPECTED_FIBONACCI = None  # filled below from the recorded file
EXPECTED_FIBONACCI_IDS = None
with open(os.path.join(FIX, "expected_completion.json"), encoding="utf-8") as _f:
    _rec = json.load(_f)
    EXPECTED_FIBONACCI, EXPECTED_FIBONACCI_IDS = _rec["text"], _rec["token_ids"][:6]


SPECS = {
    "ngram": lambda k: {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 4},
    "draft_model": lambda k: {"method": "draft_model", "model": os.path.join(FIX, "draft"), "num_speculative_tokens": k},
}


@pytest.fixture(scope="module")
def expected(target_llm):
    params = SamplingParams(temperature=0.0, max_tokens=20)
    return [o.outputs[0].token_ids for o in target_llm.generate(_prompts(16), params, use_tqdm=False)]


@pytest.mark.parametrize("method,batch,k", list(itertools.product(SPECS, (1, 3, 8, 16), (1, 2, 4, 8))))
def test_lossless_on_reference_pair(expected, method, batch, k):
    llm = LLM(TARGET, dtype="float32", speculative_config=SPECS[method](k))
    outs = llm.generate(_prompts(batch), SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[:batch]
    if method == "draft_model" and batch >= 8:
        assert llm.engine.stats.acceptance_length > 1.5  # a trained pair agrees often
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


HEADS = {
    "eagle3": lambda k: {"method": "eagle3", "model": os.path.join(FIX, "eagle3"), "num_speculative_tokens": k},
    "p-eagle": lambda k: {"method": "eagle3", "model": os.path.join(FIX, "p-eagle"), "num_speculative_tokens": k,
                          "parallel_drafting": True},
}


@pytest.mark.parametrize("head,batch,k", list(itertools.product(HEADS, (1, 3, 8), (1, 3, 7))))
def test_lossless_with_fixture_heads(expected, head, batch, k):
    llm = LLM(TARGET, dtype="float32", speculative_config=HEADS[head](k))
    outs = llm.generate(_prompts(batch), SamplingParams(temperature=0.0, max_tokens=20), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected[:batch]
    stats = llm.engine.stats
    assert llm.engine.drafter_passes_per_step == (1 if head == "p-eagle" else k)
    if batch == 8 and k >= 3:
        assert stats.acceptance_length > 1.8  # trained heads accept well beyond chance
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
