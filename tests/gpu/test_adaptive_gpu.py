"""Adaptive speculation depth on the GPU: one CUDA graph per (batch bucket, depth), graphs on
and off identical at every depth, lossless against no-spec in float32 with the real policy
choosing, and no hidden host synchronisation in a step."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from tests.gpu.test_cuda_graphs_gpu import assert_steady_steps_have_no_host_sync
from tests.gpu.test_engine_gpu import FIX, SPECS, _prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU (and compiled Triton)")

TARGET = os.path.join(FIX, "target")
METHODS = ["ngram", "draft_model", "eagle3", "p-eagle"]


def _auto(method: str) -> dict:
    spec = dict(SPECS[method])
    spec["max_num_speculative_tokens"] = spec.pop("num_speculative_tokens")
    spec["num_speculative_tokens"] = "auto"
    return spec


def _llm(spec, eager: bool, dtype: str = "bfloat16", max_num_seqs: int = 8):
    from parspec import LLM

    return LLM(TARGET, dtype=dtype, device="cuda", speculative_config=spec, enforce_eager=eager,
               max_num_seqs=max_num_seqs, max_model_len=1024)


@pytest.mark.parametrize("method", METHODS)
def test_graphs_on_and_off_identical_at_every_depth(method):
    """The depth sequence is fixed (a cycle over every candidate), so both runs verify the
    same depths; bf16 output must agree bit for bit, and graphs exist for several depths."""
    from parspec import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        llm = _llm(_auto(method), eager)
        cycle = itertools.cycle(llm.engine.depth_policy.candidates)
        llm.engine.depth_policy.choose = lambda seq_ids, bucket: next(cycle)
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(_prompts(8), params, use_tqdm=False)]
        if not eager:
            depths = {q - 1 for _, q in llm.engine.runner.graphs.graphs}
            assert depths == set(llm.engine.depth_policy.candidates), depths
        assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    assert outs[True] == outs[False]


@pytest.mark.parametrize("method", ["ngram", "p-eagle"])
def test_auto_is_lossless_in_float32(method):
    from parspec import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in _llm(None, False, "float32").generate(_prompts(8), params, use_tqdm=False)]
    llm = _llm(_auto(method), False, "float32")
    got = [o.outputs[0].token_ids for o in llm.generate(_prompts(8), params, use_tqdm=False)]
    assert got == ref
    assert len({k for _, k in llm.engine.depth_policy.history}) > 1


def test_auto_step_has_no_hidden_host_sync():
    assert_steady_steps_have_no_host_sync(_llm(_auto("p-eagle"), False, max_num_seqs=4))
