"""CUDA graphs on the GPU: graphs on and off give identical output for every proposer (the
graphs replay the same kernels over the same padded shapes), seeded sampling reproduces
under graphs, and a steady-state decode step makes no hidden host synchronisation."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from tests.gpu.test_engine_gpu import FIX, SPECS, _prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU (and compiled Triton)")

TARGET = os.path.join(FIX, "target")
METHODS = ["no-spec", "ngram", "draft_model", "eagle3", "p-eagle", "eagle3-k1", "p-eagle-k3", "p-eagle-r2"]


def _run(spec, eager: bool, n: int, params, max_num_seqs: int = 8):
    from parspec import LLM

    llm = LLM(TARGET, dtype="bfloat16", device="cuda", speculative_config=spec, enforce_eager=eager,
              max_num_seqs=max_num_seqs, max_model_len=1024)
    outs = llm.generate(_prompts(n), params, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("num_prompts", [1, 3, 8])
@pytest.mark.parametrize("method", METHODS)
def test_graphs_on_and_off_give_identical_greedy_output(method, num_prompts):
    from parspec import SamplingParams

    spec = None if method == "no-spec" else SPECS[method]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    eager_llm, eager = _run(spec, True, num_prompts, params)
    graph_llm, graphed = _run(spec, False, num_prompts, params)
    assert graphed == eager
    assert graph_llm.engine.runner.graphs.graphs, "no graph was captured"
    assert not eager_llm.engine.runner.graphs.graphs
    if spec is not None:
        assert graph_llm.engine.stats.acceptance_length == eager_llm.engine.stats.acceptance_length
    assert graph_llm.engine.blocks.num_free_blocks == graph_llm.engine.blocks.num_blocks


@pytest.mark.parametrize("method", ["no-spec", "draft_model", "p-eagle", "eagle3", "p-eagle-r2"])
def test_seeded_sampling_reproduces_under_graphs(method):
    from parspec import SamplingParams

    spec = None if method == "no-spec" else SPECS[method]
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=11, max_tokens=48, ignore_eos=True)
    _, first = _run(spec, False, 4, params)
    _, second = _run(spec, False, 4, params)
    _, eager = _run(spec, True, 4, params)
    assert first == second == eager
    assert all(len(x) == 48 for x in first)


def assert_steady_steps_have_no_host_sync(llm, num_prompts: int = 4) -> None:
    """After a warm-up generate, decode steps synchronise only where the engine reads the
    verified tokens (an event wait, which sync-debug mode does not flag)."""
    from parspec import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    llm.generate(_prompts(num_prompts), params, use_tqdm=False)  # compile, capture the graphs
    engine = llm.engine
    for p in _prompts(num_prompts):
        engine.add_request(p, params)
    engine.step()  # the prefill (host-built metadata) and the first decode
    engine.step()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):
                engine.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert syncs == [], syncs
    while engine.has_unfinished_requests():
        engine.step()


@pytest.mark.parametrize("method", ["no-spec", "p-eagle", "eagle3", "p-eagle-r2"])
def test_decode_step_has_no_hidden_host_sync(method):
    from parspec import LLM

    spec = None if method == "no-spec" else SPECS[method]
    assert_steady_steps_have_no_host_sync(LLM(TARGET, dtype="bfloat16", device="cuda", speculative_config=spec,
                                              max_num_seqs=4, max_model_len=1024))


@pytest.mark.parametrize("method", ["no-spec", "draft_model", "p-eagle"])
def test_async_scheduling_changes_nothing_on_gpu(method):
    """Graphs on, the next step launched before the last is read (default) or not."""
    from parspec import LLM, SamplingParams

    spec = None if method == "no-spec" else SPECS[method]
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    outs = {}
    for flag in (False, True):
        llm = LLM(TARGET, dtype="bfloat16", device="cuda", speculative_config=spec, async_scheduling=flag,
                  max_num_seqs=4, max_model_len=1024)
        outs[flag] = [o.outputs[0].token_ids for o in llm.generate(_prompts(6), params, use_tqdm=False)]
        assert llm.engine.async_scheduling is flag
        assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    assert outs[True] == outs[False]


def test_capture_survives_garbage_collection_of_an_old_graph():
    """Seen on the H200: an engine dropped by an earlier test still owned captured graphs in a
    reference cycle; the collector destroyed them in the middle of a later capture, which
    invalidated that capture. GraphCache keeps the collector off while it captures."""
    import gc

    from parspec.cuda_graphs import GraphCache

    x = torch.ones(64, device="cuda")

    class Owner:  # a graph kept alive only by a reference cycle, as an engine's were
        def __init__(self):
            self.me = self
            self.cache = GraphCache(lambda key: x * key, enabled=True)
            self.cache.run(2)

    gc.collect()
    Owner()  # unreachable now; only the collector frees it

    def busy(key):  # allocates enough cyclic garbage to trigger automatic collection
        for _ in range(5000):
            a = []
            a.append(a)
        return x + key

    cache = GraphCache(busy, enabled=True)
    torch.testing.assert_close(cache.run(3), x + 3)
    torch.testing.assert_close(cache.run(3), x + 3)  # the replay
    gc.collect()
