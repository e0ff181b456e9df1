"""After LLMEngine.warm_up(), serving compiles no Triton kernel (issue 13: a request that
brought a new specialization waited 1.1-1.8 s for its first token on an H200).

For each proposer (and the adaptive depth, and the batch-invariant mode) the engine is built
on the reference pair, warmed up, then serves requests of prompt lengths 1..700 arriving while
others decode, greedy and sampled, at every batch size up to max_num_seqs and, with
"auto", at every depth; the count of compiled variants of parspec's kernels
(parspec.compiled_kernels) must not grow. tests/test_compiled_kernels.py checks the launchers'
specialization keys on the CPU."""

from __future__ import annotations

import gc
import itertools
import os
import random
import time

import pytest
import torch

from tests.gpu.test_adaptive_gpu import _auto
from tests.gpu.test_engine_gpu import FIX, SPECS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU (and compiled Triton)")

TARGET = os.path.join(FIX, "target")
MAX_NUM_SEQS = 16
CONFIGS = {
    "no-spec": (None, {}),
    "ngram": (SPECS["ngram"], {}),
    "draft_model": (SPECS["draft_model"], {}),
    "eagle3": (SPECS["eagle3"], {}),
    "p-eagle": (SPECS["p-eagle"], {}),
    "p-eagle-auto": (_auto("p-eagle"), {}),
    "p-eagle-batch-invariant": (SPECS["p-eagle"], {"batch_invariant": True}),
}


def _requests(vocab: int, rng: random.Random) -> list[tuple[dict, object]]:
    """Prompts of every length class (1 token to several hundred, multiples of 16 and not),
    half greedy, half sampled with a seed, and outputs of 1 to 48 tokens."""
    from parspec import SamplingParams

    lengths = list(range(5, 301, 7)) + [1, 2, 3, 4, 16, 32, 64, 128, 256, 300, 512, 700]
    rng.shuffle(lengths)
    out = []
    for i, n in enumerate(lengths):
        prompt = {"prompt_token_ids": [rng.randrange(1, vocab) for _ in range(n)]}
        max_tokens = rng.randint(1, 48)
        if i % 2:
            params = SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=max_tokens, ignore_eos=True)
        else:
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        out.append((prompt, params))
    return out


def _serve(engine, requests, rng: random.Random) -> None:
    """Requests arrive while others run: 0 to 2 before each step, so steps mix decode rows
    with prefills of new arrivals and the batch grows and shrinks."""
    pending = list(requests)
    while pending or engine.has_unfinished_requests():
        for _ in range(rng.choice((0, 0, 1, 2))):
            if pending:
                engine.add_request(*pending.pop())
        if engine.has_unfinished_requests():
            engine.step()
    engine.pop_deltas()


@pytest.fixture
def fresh_kernel_caches():
    """Each configuration starts from no compiled variant in memory (loads from Triton's disk
    cache are quick), so one configuration's serving cannot hide what another's warm-up missed."""
    from parspec import attention
    from parspec.compiled_kernels import triton_kernels

    gc.collect()  # the previous test's engine and its graphs
    torch.cuda.synchronize()
    for kernel in triton_kernels().values():
        getattr(kernel, "device_caches", {}).clear()
    # and the record of which split twins were compiled, or a twin the cleared caches lost is not
    # compiled again with its sibling and a step compiles it (an artefact of clearing, not of serving)
    attention._SPLIT_SIBLINGS.clear()
    yield


def _new_variants(before: dict[str, set[str]], after: dict[str, set[str]]) -> str:
    lines = []
    for name, keys in sorted(after.items()):
        for key in sorted(keys - before.get(name, set())):
            lines.append(f"{name}: ...{key[-600:]}")  # the constexprs and options are at the end
    return "\n".join(lines)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_serving_after_warm_up_compiles_no_kernel(config, fresh_kernel_caches):
    from parspec import LLM, SamplingParams
    from parspec.compiled_kernels import compiled_variants, num_compiled_variants

    spec, extra = CONFIGS[config]
    if spec is not None and "model" in spec and not os.path.isdir(spec["model"]):
        pytest.skip(f"{spec['model']} is not in fixtures")
    llm = LLM(TARGET, dtype="bfloat16", device="cuda", speculative_config=spec, max_num_seqs=MAX_NUM_SEQS,
              max_model_len=1024, **extra)
    engine = llm.engine
    warm_s = engine.warm_up()
    before = compiled_variants()
    assert num_compiled_variants() > 0, "the counter sees none of the warm-up's compiles (Triton's cache layout?)"
    warm_variants = num_compiled_variants()
    if engine.depth_policy is not None:  # every depth at every batch size, not only the policy's favourites
        cycle = itertools.cycle(engine.depth_policy.candidates)
        engine.depth_policy.choose = lambda seq_ids, bucket: next(cycle)

    start = time.perf_counter()
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    _serve(engine, _requests(vocab, rng), rng)
    for batch in range(1, MAX_NUM_SEQS + 1):  # steady decode steps at every batch size
        prompts = [{"prompt_token_ids": [rng.randrange(1, vocab) for _ in range(rng.randint(5, 300))]}
                   for _ in range(batch)]
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    serve_s = time.perf_counter() - start

    after = compiled_variants()
    print(f"\n{config}: warm-up {warm_s:.1f} s, {warm_variants} kernel variants; serving {serve_s:.1f} s, "
          f"{num_compiled_variants() - warm_variants} more")
    assert after == before, "kernels compiled after warm_up():\n" + _new_variants(before, after)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
