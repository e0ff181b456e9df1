"""Streaming: per-step deltas (pop_deltas) that concatenate to the final output, incremental
detokenization (multi-byte characters split over tokens, decoders whose suffix decode
differs), incremental stop strings (also completed in the middle of a multi-token accepted
step: cut there, nothing leaks), min_tokens, n > 1 completions, abort, a failing step, and
generate() on a busy engine."""

from __future__ import annotations

import os

import pytest

from parspec import LLM, SamplingParams
from parspec.detokenizer import CompletionText, IncrementalDetokenizer
from parspec.engine.llm_engine import StepError
from parspec.tokenizer import Tokenizer

FIX = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "reference")
TARGET = os.path.join(FIX, "target")
DRAFT = {"method": "draft_model", "model": os.path.join(FIX, "draft"), "num_speculative_tokens": 4}
PROMPTS = ["def add(a, b):", "import os\n", "class Stack:\n", "for i in range(10):"]
GREEDY = dict(temperature=0.0, ignore_eos=True)
PARAMS = SamplingParams(max_tokens=12, **GREEDY)


@pytest.fixture(scope="module")
def fixture_tokenizer():
    return Tokenizer(TARGET)


@pytest.fixture(scope="module")
def plain():
    return LLM(TARGET, dtype="float32")


@pytest.fixture(scope="module")
def drafted():
    return LLM(TARGET, dtype="float32", speculative_config=DRAFT, async_scheduling=True)


@pytest.fixture(scope="module")
def reference(plain):
    """The non-streamed, non-speculative outputs of PROMPTS under PARAMS."""
    return [o.outputs[0] for o in plain.generate(PROMPTS, PARAMS, use_tqdm=False)]


def collect(streams: dict, deltas) -> dict:
    """Adds deltas to per-completion streams; nothing may follow a completion's final delta."""
    for d in deltas:
        s = streams.setdefault((d.request_id, d.index), {"ids": [], "text": "", "sizes": [], "logprobs": [],
                                                         "last": None})
        assert s["last"] is None or not s["last"].finished, "a delta after the final one"
        s["ids"] += d.new_token_ids
        s["text"] += d.new_text
        s["sizes"].append(len(d.new_token_ids))
        s["logprobs"].append(d.new_logprobs)
        assert d.num_output_tokens == len(s["ids"])
        s["last"] = d
    return streams


def drain(engine, streams=None) -> dict:
    """Steps until the engine is idle, popping deltas after every step."""
    streams = {} if streams is None else streams
    while True:
        if engine.has_unfinished_requests():
            engine.step()
        deltas = engine.pop_deltas()
        collect(streams, deltas)
        if not deltas and not engine.has_unfinished_requests():
            return streams


def assert_streams_match(streams, seqs):
    for seq in seqs:
        s = streams[(seq.request_id, seq.index)]
        assert s["ids"] == seq.output_token_ids
        assert s["text"] == seq.text
        assert s["last"].finished and s["last"].finish_reason == seq.finish_reason
        assert s["last"].stop_reason == seq.stop_reason


# --- incremental detokenization ------------------------------------------------------------
def _push_all(tokenizer, ids, skip_special_tokens=True) -> tuple[list[str], str]:
    text = CompletionText(tokenizer, skip_special_tokens)
    pieces = []
    for t in ids:
        text.push(t)
        pieces.append(text.take(finished=False))
    final = tokenizer.decode(ids, skip_special_tokens)
    text.settle(final)
    pieces.append(text.take(finished=True))
    return pieces, final


def test_multibyte_characters_split_over_byte_level_tokens(fixture_tokenizer):
    tok = fixture_tokenizer
    ids = tok.encode("héllo € 😀 naïve — 日本語 ok")
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # the fixture's byte-level BPE splits them
    pieces, final = _push_all(tok, ids)
    assert "".join(pieces) == final == "héllo € 😀 naïve — 日本語 ok"
    assert not any("\ufffd" in p for p in pieces)
    # Each character comes out with the token that completes it, not later.
    detok = IncrementalDetokenizer(tok)
    out = [detok.push(t) for t in ids]
    assert out[:3] == ["h", "", "é"]
    # Tokens that never complete a character: U+FFFD only where the final text has it.
    broken = ids[:2] + ids[4:]  # drops the second byte of "é"
    pieces, final = _push_all(tok, broken)
    assert "".join(pieces) == final and final.count("\ufffd") == 1


def test_random_byte_level_token_streams_concatenate_to_decode(fixture_tokenizer):
    import random

    tok = fixture_tokenizer
    pool = tok.encode("naïve café — 😀 日本語 € def f(x):\n    return x ** 2\n")
    rng = random.Random(0)
    for _ in range(40):
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 30))]
        pieces, final = _push_all(tok, ids)
        assert "".join(pieces) == final
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in final


@pytest.fixture(scope="module")
def sentencepiece_like(tmp_path_factory):
    """A Llama-2 style decoder: Metaspace spaces (the first one stripped: decode of a suffix is
    not the suffix of the decode), byte-fallback tokens, a special token."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models

    words = ["<unk>", "▁hello", "▁world", "!", "▁", "<0xE2>", "<0x82>", "<0xAC>", "<0xF0>", "<0x9F>", "<0x98>",
             "<0x80>", "▁end", "</s>"]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["</s>"])
    path = tmp_path_factory.mktemp("spm")
    tok.save(str(path / "tokenizer.json"))
    return Tokenizer(str(path)), {w: i for i, w in enumerate(words)}


def test_decoder_whose_suffix_decode_differs(sentencepiece_like):
    tok, v = sentencepiece_like
    assert tok.decode([v["▁world"]]) == "world"  # the leading space goes when decoded alone
    ids = [v[w] for w in ["▁hello", "▁world", "!", "▁", "<0xE2>", "<0x82>", "<0xAC>", "<0xF0>", "<0x9F>", "<0x98>",
                          "<0x80>", "</s>", "▁end"]]
    pieces, final = _push_all(tok, ids)
    assert final == "hello world! €😀 end"
    assert "".join(pieces) == final
    assert pieces[:2] == ["hello", " world"]
    assert pieces[6] == "€" and pieces[4] == pieces[5] == ""  # nothing until the character is whole
    assert not any("\ufffd" in p for p in pieces)
    pieces, final = _push_all(tok, ids, skip_special_tokens=False)
    assert "".join(pieces) == final and "</s>" in final


def test_stop_string_hold_back_and_cut_in_completion_text(fixture_tokenizer):
    tok = fixture_tokenizer
    ids = tok.encode("x = 1\ny = 2\nz = 3\n")
    for include in (False, True):
        text = CompletionText(tok, stops=["y = 2\nz", "nothing"], include_stop_str_in_output=include)
        streamed, hit = "", None
        for t in ids:
            hit = text.push(t)
            streamed += text.take(finished=hit is not None)
            if hit:
                break
        assert hit == "y = 2\nz"
        expected = "x = 1\ny = 2\nz" if include else "x = 1\n"
        assert text.text == expected and streamed == expected


# --- deltas through the engine --------------------------------------------------------------
@pytest.mark.parametrize("which", ["plain", "drafted"])
def test_deltas_concatenate_to_the_final_outputs(which, request, reference):
    llm = request.getfixturevalue(which)
    engine = llm.engine
    seqs = [engine.add_request(p, PARAMS, request_id=f"{which}-{i}") for i, p in enumerate(PROMPTS)]
    with_logprobs = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=12, logprobs=2, **GREEDY))
    streams = drain(engine)
    assert_streams_match(streams, seqs + [with_logprobs])
    for seq, ref in zip(seqs + [with_logprobs], reference + reference[:1]):
        assert seq.output_token_ids == ref.token_ids and seq.text == ref.text
        assert seq.text == llm.get_tokenizer().decode(seq.output_token_ids)
    # Logprobs travel with their tokens: one per token, in the deltas and in the output.
    lps = [lp for d in streams[(with_logprobs.request_id, 0)]["logprobs"] for lp in d]
    assert [lp.token_id for lp in lps] == with_logprobs.output_token_ids
    assert all(lp.rank == 1 and len(lp.top) == 2 and lp.top[0][0] == lp.token_id for lp in lps)  # greedy
    assert with_logprobs.completion().logprobs == lps
    assert streams[(seqs[0].request_id, 0)]["logprobs"] == [None] * len(streams[(seqs[0].request_id, 0)]["sizes"])
    if which == "drafted":  # accepted drafts: several tokens reach the stream in one step
        assert max(n for s in streams.values() for n in s["sizes"]) > 1
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def _tokens_per_step(engine, prompt, params):
    seq = engine.add_request(prompt, params)
    steps = []
    while engine.has_unfinished_requests():
        engine.step()
        steps += [d.new_token_ids for d in engine.pop_deltas() if d.new_token_ids]
    return seq, steps


def _stop_inside_a_step(tok, steps):
    """A stop string whose first occurrence is completed by a token in the middle of a
    multi-token step; returns (stop, index of that token)."""
    ids = [t for s in steps for t in s]
    at = 0
    for step in steps:
        for j in range(len(step) - 1):  # a token with others after it in the same step
            k = at + j
            before, upto = tok.decode(ids[:k]), tok.decode(ids[:k + 1])
            if len(upto) > len(before) and "\ufffd" not in upto:
                for n in (3, 4, 5):
                    stop = upto[-n:]
                    if len(stop) == n and upto.find(stop) == len(upto) - n and stop.strip():
                        return stop, k
        at += len(step)
    pytest.skip("no multi-token step with a usable stop string")


@pytest.fixture(scope="module")
def steps_of_a_drafted_run(drafted):
    return _tokens_per_step(drafted.engine, PROMPTS[2], SamplingParams(max_tokens=40, **GREEDY))


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_completed_inside_a_multi_token_step(drafted, steps_of_a_drafted_run, include):
    engine, tok = drafted.engine, drafted.get_tokenizer()
    seq, steps = steps_of_a_drafted_run
    stop, k = _stop_inside_a_step(tok, steps)
    full = tok.decode(seq.output_token_ids)
    params = SamplingParams(max_tokens=40, stop=[stop, "never in the text!"], include_stop_str_in_output=include,
                            **GREEDY)
    stopped = engine.add_request(PROMPTS[2], params)
    streams = drain(engine)
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    assert stopped.output_token_ids == seq.output_token_ids[:k + 1]  # the step's later tokens are dropped
    cut = full.find(stop) + (len(stop) if include else 0)
    assert stopped.text == full[:cut]
    s = streams[(stopped.request_id, 0)]
    assert s["text"] == stopped.text and s["ids"] == stopped.output_token_ids
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_min_tokens_defers_every_kind_of_stop(plain):
    tok = plain.get_tokenizer()
    free = plain.generate(PROMPTS[0], SamplingParams(max_tokens=20, **GREEDY), use_tqdm=False)[0].outputs[0]
    ids = free.token_ids
    # A stop string first completed early: with min_tokens it only counts once it ends later.
    early = next(i for i in range(1, 8) if len(tok.decode(ids[:i + 1])) > len(tok.decode(ids[:i])))
    stop = tok.decode(ids[:early + 1])[-1]
    min_tokens = 10
    out = plain.generate(PROMPTS[0], SamplingParams(max_tokens=20, stop=[stop], min_tokens=min_tokens, **GREEDY),
                         use_tqdm=False)[0].outputs[0]
    floor = len(tok.decode(ids[:min_tokens]))
    later = free.text.find(stop, floor - len(stop) + 1)
    if later < 0:
        assert out.finish_reason == "length" and out.token_ids == ids
    else:
        assert out.finish_reason == "stop" and out.text == free.text[:later]
        assert len(out.token_ids) > min_tokens
    without = plain.generate(PROMPTS[0], SamplingParams(max_tokens=20, stop=[stop], **GREEDY),
                             use_tqdm=False)[0].outputs[0]
    assert len(without.token_ids) <= early + 1  # without min_tokens it stops early
    # stop_token_ids: no stop before min_tokens output tokens.
    out = plain.generate(PROMPTS[0], SamplingParams(max_tokens=20, stop_token_ids=[ids[1]], min_tokens=min_tokens,
                                                    **GREEDY), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) >= min_tokens  # without min_tokens it would stop at the second token
    assert out.finish_reason == "length" or out.token_ids[-1] == ids[1]


# --- n completions --------------------------------------------------------------------------
def test_n_greedy_completions_are_identical_and_seeded_ones_reproduce(plain, reference):
    three = plain.generate(PROMPTS[1], SamplingParams(max_tokens=12, n=3, **GREEDY), use_tqdm=False)[0]
    assert [o.index for o in three.outputs] == [0, 1, 2]
    assert all(o.token_ids == reference[1].token_ids and o.text == reference[1].text for o in three.outputs)
    sampled = dict(temperature=1.0, max_tokens=10, ignore_eos=True)
    a = plain.generate(PROMPTS[1], SamplingParams(n=2, seed=7, **sampled), use_tqdm=False)[0].outputs
    assert a[0].token_ids != a[1].token_ids
    # Reproducible, by vLLM's rule: completion i samples with seed + i.
    for i in range(2):
        alone = plain.generate(PROMPTS[1], SamplingParams(seed=7 + i, **sampled), use_tqdm=False)[0].outputs[0]
        assert a[i].token_ids == alone.token_ids


def test_n_completions_stream_under_one_request_id(drafted):
    engine = drafted.engine
    first = engine.add_request(PROMPTS[0], SamplingParams(max_tokens=12, n=3, **GREEDY), request_id="fan")
    seqs = engine.completions("fan")
    assert seqs[0] is first and [s.index for s in seqs] == [0, 1, 2]
    streams = drain(engine)
    assert sorted(k for k in streams if k[0] == "fan") == [("fan", 0), ("fan", 1), ("fan", 2)]
    assert_streams_match(streams, seqs)
    assert engine.completions("fan") == []


# --- abort, failures, a busy engine ---------------------------------------------------------
def test_abort_mid_generation_frees_blocks_and_streams_an_abort(drafted):
    engine = drafted.engine
    params = SamplingParams(max_tokens=40, **GREEDY)
    keep = engine.add_request(PROMPTS[0], params, request_id="keep")
    dropped = engine.add_request(PROMPTS[1], SamplingParams(max_tokens=40, n=2, **GREEDY), request_id="drop")
    streams = {}
    for _ in range(4):
        engine.step()
        collect(streams, engine.pop_deltas())
    assert dropped.num_output_tokens > 0 and not dropped.is_finished
    both = engine.completions("drop")
    free_before = engine.blocks.num_free_blocks
    assert engine.abort_request("drop") and not engine.abort_request("drop")
    assert engine.blocks.num_free_blocks > free_before
    final = engine.pop_deltas()
    aborts = [d for d in final if d.request_id == "drop"]
    assert sorted(d.index for d in aborts) == [0, 1]
    assert all(d.finished and d.finish_reason == "abort" for d in aborts)
    collect(streams, final)
    drain(engine, streams)
    assert_streams_match(streams, [keep] + both)
    assert keep.finish_reason == "length" and len(keep.output_token_ids) == 40
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("where", ["runner", "proposer"])
def test_a_step_that_raises_leaves_the_engine_serving(where, reference):
    llm = LLM(TARGET, dtype="float32", speculative_config=DRAFT, async_scheduling=True, max_num_seqs=2)
    engine = llm.engine
    owner = engine.runner if where == "runner" else engine.proposer
    name = "step" if where == "runner" else "propose"
    original, calls = getattr(owner, name), []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated device failure")
        return original(*args, **kwargs)

    setattr(owner, name, fails_once)
    seqs = [engine.add_request(p, PARAMS, request_id=f"r{i}") for i, p in enumerate(PROMPTS[:3])]
    streams, failed = {}, None
    while engine.has_unfinished_requests():
        try:
            engine.step()
        except StepError as e:
            assert failed is None and isinstance(e, RuntimeError)
            failed = e
        collect(streams, engine.pop_deltas())
    assert failed is not None and "simulated device failure" in str(failed)
    # The running batch (max_num_seqs=2) is hit; r2 was waiting and goes on.
    assert failed.request_ids and set(failed.request_ids) <= {"r0", "r1"}
    for seq, ref in zip(seqs, reference):
        last = streams[(seq.request_id, 0)]["last"]
        assert last.finished and last.finish_reason == seq.finish_reason
        if seq.request_id in failed.request_ids:
            assert seq.finish_reason == "error" and "simulated device failure" in last.error
        else:
            assert seq.output_token_ids == ref.token_ids and seq.finish_reason == "length"
    assert engine._inflight is None and engine.blocks.num_free_blocks == engine.blocks.num_blocks
    setattr(owner, name, original)
    again = llm.generate(PROMPTS[:2], PARAMS, use_tqdm=False)  # no abort_all needed
    assert [o.outputs[0].token_ids for o in again] == [r.token_ids for r in reference[:2]]


def test_generate_on_a_busy_engine(drafted, reference):
    engine = drafted.engine
    other = engine.add_request(PROMPTS[3], SamplingParams(max_tokens=64, **GREEDY), request_id="other")
    engine.step()
    early = engine.pop_deltas()
    outs = drafted.generate(PROMPTS[:3], PARAMS, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [r.token_ids for r in reference[:3]]
    assert [o.outputs[0].text for o in outs] == [r.text for r in reference[:3]]
    pending = engine.pop_deltas()  # only the other request's: generate() took its own
    assert {d.request_id for d in early} == {d.request_id for d in pending} == {"other"}
    assert other.num_output_tokens > 1 and not other.is_finished  # it went on during generate()
    streams = drain(engine, collect(collect({}, early), pending))
    assert_streams_match(streams, [other])
    assert len(other.output_token_ids) == 64
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
