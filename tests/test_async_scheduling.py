"""Asynchronous scheduling: a decode step launched from the previous step's device result,
before the host has read it, must change nothing a user can see. On the CPU the launches
run synchronously, but every piece of the logic runs: positions and last tokens derived
on the device, the in-flight step kept past a finish, the deferred KV rollback, the drains
before a prefill, a change of batch or a length limit."""

from __future__ import annotations

import os

import pytest

from parspec import LLM, SamplingParams

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "reference")
PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n", "for i in range(10):", "def fib(n):\n"]
SPECS = {
    "no-spec": None,
    "draft_model": {"method": "draft_model", "model": os.path.join(FIX, "draft"), "num_speculative_tokens": 3},
    "eagle3": {"method": "eagle3", "model": os.path.join(FIX, "eagle3"), "num_speculative_tokens": 3},
    "p-eagle": {"method": "eagle3", "model": os.path.join(FIX, "p-eagle"), "num_speculative_tokens": 4,
                "parallel_drafting": True},
}


def _run(spec, async_scheduling: bool, params, prompts=PROMPTS, **kw):
    llm = LLM(os.path.join(FIX, "target"), dtype="float32", speculative_config=spec,
              async_scheduling=async_scheduling, **kw)
    continued = []
    original = llm.engine._continue

    def counting():
        continued.append(1)
        return original()

    llm.engine._continue = counting
    outs = llm.generate(prompts, params, use_tqdm=False)
    return llm, outs, len(continued)


@pytest.mark.parametrize("max_num_seqs", [1, 3, 8])
@pytest.mark.parametrize("method", list(SPECS))
def test_async_greedy_equals_sync(method, max_num_seqs):
    params = SamplingParams(temperature=0.0, max_tokens=32)
    _, sync_outs, none = _run(SPECS[method], False, params, max_num_seqs=max_num_seqs)
    llm, async_outs, continued = _run(SPECS[method], True, params, max_num_seqs=max_num_seqs)
    assert none == 0 and continued >= len(PROMPTS)  # decode steps overlapped
    assert [o.outputs[0].token_ids for o in async_outs] == [o.outputs[0].token_ids for o in sync_outs]
    assert [o.spec_stats for o in async_outs] == [o.spec_stats for o in sync_outs]  # the same drafts
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    assert llm.engine._inflight is None
    assert all(s.inflight == 0 for s in llm.engine.scheduler.running)


@pytest.mark.parametrize("method", ["no-spec", "p-eagle"])
def test_async_sampled_seeded_equals_sync(method):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=5, max_tokens=24)
    _, a, _ = _run(SPECS[method], False, params)
    _, b, continued = _run(SPECS[method], True, params)
    assert continued > 0
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]


def test_async_stops_at_stop_tokens_and_length_limit():
    """A sequence that stops mid-flight (a stop token) or nears max_model_len: the step
    launched past its end is discarded, the output is the synchronous one, nothing leaks."""
    _, ref, _ = _run(SPECS["p-eagle"], False, SamplingParams(temperature=0.0, max_tokens=40), max_model_len=64)
    stop_ids = [ref[0].outputs[0].token_ids[9], ref[2].outputs[0].token_ids[5]]
    params = SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=stop_ids)
    _, sync_outs, _ = _run(SPECS["p-eagle"], False, params, max_model_len=64)
    llm, async_outs, continued = _run(SPECS["p-eagle"], True, params, max_model_len=64)
    assert continued > 0
    assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in async_outs] == \
           [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in sync_outs]
    assert any(o.outputs[0].finish_reason == "length" for o in async_outs)  # max_model_len reached
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_ngram_never_overlaps():
    """n-gram drafting reads the host's tokens, so its steps cannot be launched early."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 4}
    _, outs, continued = _run(spec, True, SamplingParams(temperature=0.0, max_tokens=16))
    assert continued == 0 and all(len(o.outputs[0].token_ids) == 16 for o in outs)


def test_abort_all_drops_the_step_in_flight():
    llm = LLM(os.path.join(FIX, "target"), dtype="float32", speculative_config=SPECS["draft_model"],
              async_scheduling=True)
    engine = llm.engine
    for p in PROMPTS:
        engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=30))
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None
    engine.abort_all()
    assert engine._inflight is None and not engine.has_unfinished_requests()
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in outs)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_abort_one_request_frees_its_blocks_and_the_rest_go_on(async_scheduling):
    params = SamplingParams(temperature=0.0, max_tokens=30)
    _, reference, _ = _run(SPECS["p-eagle"], False, params)
    llm = LLM(os.path.join(FIX, "target"), dtype="float32", speculative_config=SPECS["p-eagle"],
              async_scheduling=async_scheduling, max_num_seqs=3)
    engine = llm.engine
    seqs = [engine.add_request(p, params, request_id=f"r{i}") for i, p in enumerate(PROMPTS)]
    for _ in range(4):
        engine.step()
    free_before = engine.blocks.num_free_blocks
    assert engine.abort_request("r1") and engine.abort_request("r4")  # one running, one waiting
    assert not engine.abort_request("r1") and not engine.abort_request("nope")
    assert engine.blocks.num_free_blocks > free_before  # r1's blocks came back at once
    while engine.has_unfinished_requests():
        engine.step()
    assert seqs[1].finish_reason == "abort" and seqs[4].finish_reason == "abort"
    for i in (0, 2, 3):
        assert seqs[i].output_token_ids == reference[i].outputs[0].token_ids
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_failing_step_leaves_the_engine_usable():
    """An exception (here Ctrl-C) inside generate() aborts its requests, frees their blocks,
    and the next generate() works and is correct."""
    params = SamplingParams(temperature=0.0, max_tokens=20)
    _, reference, _ = _run(SPECS["draft_model"], False, params)
    llm = LLM(os.path.join(FIX, "target"), dtype="float32", speculative_config=SPECS["draft_model"],
              async_scheduling=True)
    runner_step = llm.engine.runner.step
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return runner_step(*args, **kwargs)

    llm.engine.runner.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests() and llm.engine._inflight is None
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in reference]
