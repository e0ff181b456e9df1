"""The engine end to end on CPU: greedy output equals HF generate, batching and
preemption change nothing, stop conditions, seeded sampling, and bad requests."""

from __future__ import annotations

import pytest
import torch

from parspec import LLM, SamplingParams
from parspec.config import ConfigError
from parspec.engine.llm_engine import RequestError
from parspec.sampling import SamplingError
from tests.conftest import FAMILIES

GREEDY = dict(temperature=0.0, ignore_eos=True)


def hf_greedy(hf, prompt_ids: list[int], n: int) -> list[int]:
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def _prompts(vocab: int, lens=(3, 9, 17, 1, 30), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_hf_generate(model_factory, family):
    path, hf = model_factory(family)
    llm = LLM(path, dtype="float32", block_size=4)
    prompts = _prompts(hf.config.vocab_size)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(max_tokens=12, **GREEDY),
                        use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(hf, p, 12)
        assert o.outputs[0].finish_reason == "length"
        assert o.prompt_token_ids == p


def test_batch_equals_one_at_a_time_and_survives_preemption(model_factory):
    path, hf = model_factory("llama")
    prompts = _prompts(hf.config.vocab_size, lens=[2 + 3 * i for i in range(12)], seed=3)
    params = SamplingParams(max_tokens=20, **GREEDY)
    single = LLM(path, dtype="float32", block_size=4)
    alone = [single.generate([{"prompt_token_ids": p}], params, use_tqdm=False)[0].outputs[0].token_ids
             for p in prompts]
    batched = LLM(path, dtype="float32", block_size=4)
    together = [o.outputs[0].token_ids for o in
                batched.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    assert together == alone
    # A cache too small for all twelve forces preemption and recomputation.
    tight = LLM(path, dtype="float32", block_size=4, num_kv_blocks=40, max_model_len=128)
    squeezed = [o.outputs[0].token_ids for o in
                tight.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert squeezed == alone
    assert tight.engine.blocks.num_free_blocks == 40


def test_text_prompts_stop_strings_and_eos(model_factory):
    path, hf = model_factory("qwen2")
    llm = LLM(path, dtype="float32")
    tok = llm.get_tokenizer()
    prompt = "def add(a, b):\n"
    free = llm.generate(prompt, SamplingParams(max_tokens=24, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert free.text == tok.decode(free.token_ids)
    assert free.token_ids == hf_greedy(hf, tok.encode(prompt), 24)
    # Stop at the first occurrence of a piece of the free-running text.
    stop = free.text[5:8]
    stopped = llm.generate(prompt, SamplingParams(max_tokens=24, stop=[stop], **GREEDY), use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.text == free.text[:free.text.find(stop)]
    # eos: make the 4th greedy token the eos id, without ignore_eos the request ends there.
    llm.engine.eos_token_ids = {free.token_ids[3]}
    eos_out = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)[0].outputs[0]
    first = free.token_ids.index(free.token_ids[3])
    assert eos_out.token_ids == free.token_ids[:first + 1] and eos_out.finish_reason == "stop"
    ids_stop = llm.generate(prompt, SamplingParams(max_tokens=24, stop_token_ids=[free.token_ids[5]], **GREEDY),
                            use_tqdm=False)[0].outputs[0]
    assert ids_stop.token_ids[-1] == free.token_ids[5] and ids_stop.stop_reason == free.token_ids[5]


def test_skip_tokenizer_init(model_factory, tmp_path):
    import shutil
    src, hf = model_factory("llama")
    dst = tmp_path / "no-tok"
    shutil.copytree(src, dst)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (dst / f).unlink()
    llm = LLM(str(dst), dtype="float32", skip_tokenizer_init=True)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf, [5, 6, 7], 5)
    with pytest.raises(RequestError, match="prompt_token_ids"):
        llm.generate("text needs a tokenizer", use_tqdm=False)


def test_seeded_sampling_is_reproducible_and_batch_independent(model_factory):
    path, _ = model_factory("llama")
    llm = LLM(path, dtype="float32")
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    p = {"prompt_token_ids": [4, 5, 6, 7]}
    a = llm.generate([p], seeded, use_tqdm=False)[0].outputs[0].token_ids
    b = llm.generate([{"prompt_token_ids": [9, 9]}, p, {"prompt_token_ids": [1]}], [other, seeded, other],
                     use_tqdm=False)[1].outputs[0].token_ids
    assert a == b
    c = llm.generate([p], SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99, max_tokens=16,
                                         ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    assert c != a


def test_bad_requests_leave_engine_working(model_factory):
    path, hf = model_factory("llama")
    llm = LLM(path, dtype="float32", max_model_len=64)
    good = {"prompt_token_ids": [1, 2, 3]}
    with pytest.raises(RequestError, match="70 tokens.*max_model_len is 64"):
        llm.generate([good, {"prompt_token_ids": list(range(70))}], use_tqdm=False)
    with pytest.raises(RequestError, match="out of range"):
        llm.generate({"prompt_token_ids": [1, 10_000]}, use_tqdm=False)
    with pytest.raises(RequestError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    for bad, match in [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -5}, "top_k"),
                       ({"max_tokens": 0}, "max_tokens"), ({"n": 0}, "n must be"), ({"seed": "x"}, "seed")]:
        with pytest.raises(SamplingError, match=match):
            SamplingParams(**bad)
    out = llm.generate(good, SamplingParams(max_tokens=4, **GREEDY), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_greedy(hf, [1, 2, 3], 4)
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_generation_stops_at_max_model_len(model_factory):
    path, _ = model_factory("llama")
    llm = LLM(path, dtype="float32", max_model_len=20)
    out = llm.generate({"prompt_token_ids": list(range(1, 16))}, SamplingParams(max_tokens=100, **GREEDY),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_engine_args_errors(model_factory):
    path, _ = model_factory("llama")
    with pytest.raises(ConfigError, match="max_model_len=100000"):
        LLM(path, max_model_len=100000)
    with pytest.raises(ConfigError, match="dtype"):
        LLM(path, dtype="int8")
    with pytest.raises(ConfigError, match="unknown engine argument.*bogus"):
        LLM(path, bogus=1)
