"""AsyncLLMEngine, the serving loop, in-process on a tiny random model: deltas add up to the
offline output, a failing step ends only the requests it ran and the loop goes on, the
bounded queue refuses with QueueFull, an abort frees the blocks at once, an idle loop
sleeps, and stop() answers every open request."""

from __future__ import annotations

import asyncio

import pytest

from parspec.config import EngineConfig
from parspec.engine.async_engine import AsyncLLMEngine, EngineStopped, QueueFull, RequestRejected
from parspec.engine.llm_engine import LLMEngine
from parspec.sampling import SamplingParams

PROMPTS = ["def add(a, b):\n", "for i in range(10):\n", "class Point:\n"]


@pytest.fixture(scope="module")
def model_dir(model_factory):
    return model_factory("llama")[0]


def _engine(model_dir, **kw) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model_dir, dtype="float32", device="cpu", max_model_len=256, **kw))


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


async def _collect(sink: asyncio.Queue, n: int = 1, timeout: float = 60.0) -> list:
    """The request's items up to its n-th final delta (or a RequestRejected)."""
    items, done = [], 0
    while done < n:
        item = await asyncio.wait_for(sink.get(), timeout)
        items.append(item)
        if isinstance(item, RequestRejected) or item.finished:
            done += 1
    return items


def _run(coro):
    return asyncio.run(coro)


def test_deltas_add_up_to_the_offline_output(model_dir):
    offline = _engine(model_dir).generate(PROMPTS, _greedy(20), use_tqdm=False)
    llm = _engine(model_dir)

    async def main():
        engine = AsyncLLMEngine(llm)
        engine.start()
        sinks = [asyncio.Queue() for _ in PROMPTS]
        for i, (prompt, sink) in enumerate(zip(PROMPTS, sinks)):
            engine.add_request(f"r{i}", prompt, _greedy(20), sink)
        try:
            return await asyncio.gather(*(_collect(s) for s in sinks))
        finally:
            await asyncio.to_thread(engine.stop)

    for deltas, ref in zip(_run(main()), offline):
        assert len(deltas) > 1  # streamed, not one final blob
        assert [t for d in deltas for t in d.new_token_ids] == ref.outputs[0].token_ids
        assert "".join(d.new_text for d in deltas) == ref.outputs[0].text
        assert [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
        assert deltas[-1].finish_reason == "length" and deltas[-1].num_output_tokens == 20
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_a_failing_step_ends_only_its_requests(model_dir, monkeypatch):
    """A step that raises finishes the requests it ran with "error", the message carried in
    their last delta and their blocks freed; the loop goes on and a later request completes."""
    llm = _engine(model_dir)
    offline = _engine(model_dir).generate(PROMPTS[1:2], _greedy(12), use_tqdm=False)[0].outputs[0]
    real_step = llm.runner.step
    fail = {"armed": False}

    def step(*args, **kw):
        if fail["armed"]:
            fail["armed"] = False
            raise RuntimeError("injected device fault")
        return real_step(*args, **kw)

    monkeypatch.setattr(llm.runner, "step", step)

    async def main():
        engine = AsyncLLMEngine(llm)
        engine.start()
        a, b = asyncio.Queue(), asyncio.Queue()
        engine.add_request("a", PROMPTS[0], _greedy(200), a)
        first = await asyncio.wait_for(a.get(), 60)  # "a" is running: the next step will fail
        fail["armed"] = True
        rest = await _collect(a)
        assert engine.is_running and engine.error is None
        engine.add_request("b", PROMPTS[1], _greedy(12), b)
        later = await _collect(b)
        await asyncio.to_thread(engine.stop)
        return [first] + rest, later

    failed, later = _run(main())
    assert failed[-1].finished and failed[-1].finish_reason == "error"
    assert "injected device fault" in failed[-1].error
    assert [t for d in later for t in d.new_token_ids] == offline.token_ids
    assert later[-1].finish_reason == "length"
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_queue_bound_abort_and_idle(model_dir):
    llm = _engine(model_dir, max_num_seqs=1)

    async def main():
        engine = AsyncLLMEngine(llm, max_queue_len=0)
        engine.start()
        a, b = asyncio.Queue(), asyncio.Queue()
        engine.add_request("a", PROMPTS[0], _greedy(200), a)
        with pytest.raises(QueueFull, match="capacity"):
            engine.add_request("b", PROMPTS[1], _greedy(4), b)
        await asyncio.wait_for(a.get(), 60)
        held = llm.blocks.num_blocks - llm.blocks.num_free_blocks
        engine.abort("a")
        deltas = await _collect(a)
        assert deltas[-1].finish_reason == "abort"
        assert held > 0 and llm.blocks.num_free_blocks == llm.blocks.num_blocks
        engine.add_request("b", PROMPTS[1], _greedy(4), b)  # the slot is free again
        assert (await _collect(b))[-1].finish_reason == "length"
        await asyncio.sleep(0.1)
        idle_from = engine.iterations
        await asyncio.sleep(0.5)
        idle_passes = engine.iterations - idle_from
        rejected = asyncio.Queue()
        engine.add_request("bad", {"prompt_token_ids": [10**6]}, _greedy(4), rejected)
        refusal = await _collect(rejected)
        await asyncio.to_thread(engine.stop)
        return idle_passes, refusal, engine.num_active

    idle_passes, refusal, active = _run(main())
    assert idle_passes == 0  # the thread slept on its condition
    assert isinstance(refusal[0], RequestRejected) and "out of range" in refusal[0].message
    assert active == 0


def test_stop_answers_open_requests_and_refuses_new_ones(model_dir):
    llm = _engine(model_dir)

    async def main():
        engine = AsyncLLMEngine(llm)
        engine.start()
        a = asyncio.Queue()
        engine.add_request("a", PROMPTS[0], _greedy(200), a)
        await asyncio.wait_for(a.get(), 60)
        await asyncio.to_thread(engine.stop)
        deltas = await _collect(a)
        with pytest.raises(EngineStopped):
            engine.add_request("late", PROMPTS[0], _greedy(4), asyncio.Queue())
        return deltas

    deltas = _run(main())
    assert deltas[-1].finished and deltas[-1].finish_reason == "abort"
    assert llm.blocks.num_free_blocks == llm.blocks.num_blocks


def test_n_completions_share_a_request(model_dir):
    llm = _engine(model_dir)
    offline = _engine(model_dir).generate(PROMPTS[:1], _greedy(8), use_tqdm=False)[0].outputs[0]

    async def main():
        engine = AsyncLLMEngine(llm)
        engine.start()
        sink = asyncio.Queue()
        engine.add_request("n", PROMPTS[0], _greedy(8, n=3), sink)
        items = await _collect(sink, n=3)
        await asyncio.to_thread(engine.stop)
        return items

    items = _run(main())
    for index in range(3):
        mine = [d for d in items if d.index == index]
        assert [t for d in mine for t in d.new_token_ids] == offline.token_ids
        assert mine[-1].finished
