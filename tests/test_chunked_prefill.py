"""Chunked prefill: prompts are fed in chunks under a per-step token budget, in the same
forward as the running sequences' decode/verify rows. Greedy output must equal the
non-speculative, unchunked output token for token for every proposer (each keeps its
state across chunks), a running request must get tokens in every step while a long prompt
is prefilled, preemption must stay correct, and the KV pool must come back full."""

from __future__ import annotations

import os

import pytest
import torch

from parspec import LLM, SamplingParams
from parspec.attention import paged_attention_ref
from parspec.cli import build_parser, engine_kwargs
from parspec.config import ConfigError, EngineConfig
from parspec.engine.scheduler import Scheduler
from parspec.kv_cache import BlockManager
from parspec.metadata import build_attention_metadata, concat_metadata, decode_metadata
from parspec.sequence import Sequence, Status

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "reference")
TARGET = os.path.join(FIX, "target")
PROMPTS = [  # 7, 46 and 49 tokens: with a budget of 16 the long ones take 3-4 steps each
    "def add(a, b):",
    "import os\nimport sys\n\n\ndef read_lines(path):\n    with open(path) as f:\n"
    "        return [line.rstrip() for line in f]\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
BUDGET = 16
SMALL = dict(dtype="float32", max_model_len=128, max_num_seqs=4)  # a small KV cache builds fast
SPECS = {
    "no-spec": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3},
    "draft_model": {"method": "draft_model", "model": os.path.join(FIX, "draft"), "num_speculative_tokens": 3},
    "eagle3": {"method": "eagle3", "model": os.path.join(FIX, "eagle3"), "num_speculative_tokens": 3},
    "p-eagle": {"method": "eagle3", "model": os.path.join(FIX, "p-eagle"), "num_speculative_tokens": 3,
                "parallel_drafting": True},
}


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    """The target alone, prompts prefilled whole: what every chunked run must reproduce."""
    llm = LLM(TARGET, enable_chunked_prefill=False, **SMALL)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _recording(engine) -> list:
    """Records every batch the scheduler hands out (decode sequences, chunks)."""
    batches = []
    schedule = engine.scheduler.schedule

    def recorded():
        batch = schedule()
        batches.append((list(batch.decode), batch.prefill))
        return batch

    engine.scheduler.schedule = recorded
    return batches


def _mixed_with_partial_chunk(batches) -> bool:
    """Whether some step decoded running sequences beside a chunk that did not finish its prompt."""
    return any(decode and chunks is not None and chunks.num_done < len(chunks.seqs) for decode, chunks in batches)


@pytest.mark.parametrize("method", list(SPECS))
def test_chunked_greedy_equals_unchunked(reference, method):
    llm = LLM(TARGET, speculative_config=SPECS[method], max_num_batched_tokens=BUDGET, **SMALL)
    engine = llm.engine
    batches = _recording(engine)
    # The long prompt alone (its chunks, then decoding at batch 1); the others arrive while it decodes.
    arrivals = {0: 2, 6: 0, 7: 1}  # step -> prompt
    seqs, step = {}, 0
    while arrivals or engine.has_unfinished_requests():
        if step in arrivals:
            i = arrivals.pop(step)
            seqs[i] = engine.add_request(PROMPTS[i], GREEDY)
        engine.step()
        step += 1
    assert [chunks.lens for _, chunks in batches[:4]] == [[16], [16], [16], [1]]  # 49 tokens alone
    assert [batches[i][1] for i in (4, 5)] == [None, None]  # then it decodes alone
    assert _mixed_with_partial_chunk(batches)  # prompt chunks beside decodes
    assert [seqs[i].output_token_ids for i in range(3)] == reference
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert not engine.scheduler.running and engine._inflight is None


@pytest.mark.parametrize("chunked", [True, False])
def test_running_request_is_not_stalled_by_a_long_prompt(reference, chunked):
    """While the long prompt is prefilled, the running request gets tokens in every step
    with chunked prefill; without it, the prefill step gives it none (the stall)."""
    llm = LLM(TARGET, speculative_config=SPECS["p-eagle"], max_num_batched_tokens=BUDGET,
              enable_chunked_prefill=chunked, **SMALL)
    engine = llm.engine
    # Room for every step of the long prefill, however many drafts the head gets accepted.
    running = engine.add_request(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True))
    engine.step()
    engine.step()
    assert running.num_output_tokens > 0
    long = engine.add_request(PROMPTS[2], GREEDY)
    gained = []  # the running request's new tokens in each step that fed the long prompt
    while long.num_output_tokens == 0:
        before = running.num_output_tokens
        engine.step()
        gained.append(running.num_output_tokens - before)
    if chunked:
        assert len(gained) >= 4 and all(g >= 1 for g in gained)  # 49 tokens in chunks of <= 16 - (K+1)
    else:
        assert gained == [0]
    while engine.has_unfinished_requests():
        engine.step()
    assert len(running.output_token_ids) == 96 and running.output_token_ids[:12] == reference[0]
    assert long.output_token_ids == reference[2]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("method,order,blocks,max_model_len", [
    ("ngram", (0, 1, 2), range(30, 31), 96),  # preempts a partially prefilled sequence, later a decoding one
    # Where preemption falls depends on the committed head's drafts: with the round-8 head, 26, 27
    # and 31 blocks preempt a prefilling sequence, 28-30 and 32-34 only a decoding one. The test
    # walks the range until a prefilling sequence (and its drafter state) is preempted, checking
    # the output at every size, so retraining the head cannot make it pass vacuously or fail.
    ("p-eagle", (1, 2, 0), range(26, 41), 72),
])
def test_chunked_prefill_under_preemption(reference, method, order, blocks, max_model_len):
    """A cache too small for all three: decodes preempt the newest sequence, which is
    recomputed in chunks later; the output does not change."""
    for num_blocks in blocks:
        llm = LLM(TARGET, speculative_config=SPECS[method], max_num_batched_tokens=BUDGET,
                  block_size=4, num_kv_blocks=num_blocks, **{**SMALL, "max_model_len": max_model_len})
        sched = llm.engine.scheduler
        preempted = []  # whether each preempted sequence was still prefilling
        preempt = sched.preempt

        def recorded(seq, sched=sched, preempt=preempt, preempted=preempted):
            preempted.append(sched.is_prefilling(seq))
            preempt(seq)

        sched.preempt = recorded
        outs = llm.generate([PROMPTS[i] for i in order], GREEDY, use_tqdm=False)
        assert sched.num_preemptions == len(preempted), num_blocks
        assert [o.outputs[0].token_ids for o in outs] == [reference[i] for i in order], num_blocks
        assert llm.engine.blocks.num_free_blocks == num_blocks
        if True in preempted:
            return
    pytest.fail(f"no cache size in {blocks} preempted a sequence still prefilling")


def test_concat_metadata_is_the_joint_batch():
    """Decode rows built on the device joined with host-built chunks = the metadata of the
    whole ragged batch built at once, and attention over it is the same."""
    block_size, q = 4, 3
    dec_tables = torch.tensor([[0, 1, 2, 9], [3, 4, 9, 9]], dtype=torch.int32)  # 9: padding
    base = torch.tensor([5, 2])
    chunk_tables, chunk_starts, chunk_lens = [[5, 6], [7]], [2, 0], [5, 3]
    dec_pos, dec_meta = decode_metadata(base, dec_tables, q, block_size, 64)
    chunk_pos, chunk_meta = build_attention_metadata(chunk_tables, chunk_starts, chunk_lens, block_size, "cpu")
    meta = concat_metadata(dec_meta, chunk_meta)
    whole_pos, whole = build_attention_metadata([[0, 1, 2], [3, 4], *chunk_tables], [5, 2, *chunk_starts],
                                                [q, q, *chunk_lens], block_size, "cpu")
    assert torch.equal(torch.cat([dec_pos, chunk_pos]), whole_pos)
    for name in ("slot_mapping", "query_start_loc", "seq_lens"):
        assert torch.equal(getattr(meta, name), getattr(whole, name)), name
    assert meta.max_query_len == 5 and meta.block_tables.shape == (4, 4)
    g = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(10, block_size, 2, 8, generator=g) for _ in range(2))
    queries = torch.randn(whole_pos.shape[0], 4, 8, generator=g)
    assert torch.equal(paged_attention_ref(queries, k_cache, v_cache, meta, 0.3),
                       paged_attention_ref(queries, k_cache, v_cache, whole, 0.3))


# --- the scheduler's rules, without a model ---------------------------------------------------

def _seq(n: int) -> Sequence:
    return Sequence(list(range(1, n + 1)), SamplingParams(temperature=0.0))


def _emit(seq: Sequence, chunk: int, completes: bool) -> None:
    """What the engine does after a chunk: cache it; the completing one emits a token."""
    seq.num_cached += chunk
    if completes:
        seq.token_ids.append(7)
        seq.num_cached = len(seq) - 1


def test_scheduler_decodes_first_then_chunks_in_the_budget():
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=16, lookahead=3, decode_tokens=4,
                      chunked_prefill=True)
    a, b = _seq(30), _seq(10)
    sched.add(a)
    batch = sched.schedule()
    assert batch.decode == [] and batch.prefill.seqs == [a] and batch.prefill.lens == [16]
    assert batch.prefill.num_done == 0 and sched.is_prefilling(a)
    assert len(a.block_table) == 8  # every block of the prompt at admission: later chunks never wait
    _emit(a, 16, False)
    sched.add(b)
    batch = sched.schedule()  # a's last 14 tokens and the first 2 of b; a's chunk completes, so it comes first
    assert batch.decode == [] and batch.prefill.seqs == [a, b] and batch.prefill.lens == [14, 2]
    assert batch.prefill.num_done == 1 and not sched.is_prefilling(a) and sched.is_prefilling(b)
    _emit(a, 14, True)
    _emit(b, 2, False)
    batch = sched.schedule()  # a decodes (K + 1 = 4 tokens), b gets the 12 left
    assert batch.decode == [a] and batch.prefill.seqs == [b] and batch.prefill.lens == [8]
    assert batch.prefill.num_done == 1
    assert sched.has_prefill_work() is False


def test_scheduler_preempts_a_partially_prefilled_sequence():
    blocks = BlockManager(13, 4)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=16, lookahead=3, decode_tokens=4,
                      chunked_prefill=True)
    a, b = _seq(12), _seq(36)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert batch.prefill.seqs == [a, b] and batch.prefill.lens == [12, 4] and batch.prefill.num_done == 1
    _emit(a, 12, True)
    _emit(b, 4, False)
    assert blocks.num_free_blocks == 1  # a holds 3 blocks, b all 9 of its prompt
    batch = sched.schedule()
    assert batch.decode == [a] and batch.prefill.seqs == [b] and batch.prefill.lens == [12]
    assert batch.prefill.num_done == 0
    _emit(a, 0, True)
    _emit(b, 12, False)
    batch = sched.schedule()  # a needs a 5th block: b, the newest, loses its blocks and its 16 cached tokens
    assert sched.num_preemptions == 1 and b.status == Status.WAITING and b.num_cached == 0 and not b.block_table
    assert batch.decode == [a] and batch.prefill is None  # nobody is admitted in a step that preempted
    assert list(sched.waiting) == [b] and not sched.is_prefilling(b) and sched.has_prefill_work()
    assert blocks.num_free_blocks == 13 - 5


def test_unchunked_scheduler_prefills_whole_prompts_first():
    blocks = BlockManager(64, 4)
    sched = Scheduler(blocks, max_num_seqs=4, max_num_batched_tokens=16, lookahead=3, decode_tokens=4)
    a, b = _seq(30), _seq(10)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()  # the first prompt always goes, past the budget; b would exceed it
    assert batch.decode == [] and batch.prefill.seqs == [a] and batch.prefill.lens == [30]
    assert batch.prefill.num_done == 1
    _emit(a, 30, True)
    batch = sched.schedule()
    assert batch.decode == [] and batch.prefill.seqs == [b]
    _emit(b, 10, True)
    assert sched.schedule().decode == [a, b]


def test_config_and_cli_flags():
    with pytest.raises(ConfigError, match="max_num_batched_tokens.*0"):
        EngineConfig(model="x", max_num_batched_tokens=0)
    with pytest.raises(ConfigError, match="enable_chunked_prefill.*'yes'"):
        EngineConfig(model="x", enable_chunked_prefill="yes")
    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "m", "--prompt", "p", "--no-enable-chunked-prefill",
                              "--max-num-batched-tokens", "512"])
    kw = engine_kwargs(args)
    assert kw["enable_chunked_prefill"] is False and kw["max_num_batched_tokens"] == 512
    assert engine_kwargs(parser.parse_args(["generate", "--model", "m", "--prompt", "p"]))["enable_chunked_prefill"]
