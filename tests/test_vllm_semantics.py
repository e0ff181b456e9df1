"""vLLM's config and request semantics: n-gram defaults and matching, method inference,
options rejected by name, speculation counters as vLLM counts them (and LLM.get_metrics),
eos from config.json, stop-token text, stop strings without a tokenizer, the engine seed."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from parspec import LLM, SamplingParams
from parspec.config import ConfigError, EngineConfig, SpeculativeConfig
from parspec.engine.llm_engine import RequestError
from parspec.sequence import SpecStats
from parspec.speculative.ngram import ngram_lookup
from tests.conftest import make_hf_model


def spec(**kw) -> SpeculativeConfig:
    return SpeculativeConfig.from_any({"num_speculative_tokens": 3, **kw})


# --- n-gram ------------------------------------------------------------------------------
@pytest.mark.parametrize("given,expected", [({}, (5, 5)), ({"prompt_lookup_max": 3}, (3, 3)),
                                            ({"prompt_lookup_min": 2}, (2, 2)),
                                            ({"prompt_lookup_min": 2, "prompt_lookup_max": 4}, (2, 4))])
def test_ngram_lookup_window_defaults_as_vllm(given, expected):
    cfg = spec(method="ngram", **given)
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == expected


def test_ngram_takes_the_earliest_match_of_the_longest_ngram():
    # [5, 6] occurs at 0 (followed by 7) and at 3 (followed by 8): vLLM continues the earliest.
    assert ngram_lookup(np.array([5, 6, 7, 5, 6, 8, 5, 6]), 2, 2, 2).tolist() == [7, 5]
    # A longer match wins over an earlier shorter one.
    assert ngram_lookup(np.array([1, 2, 9, 0, 1, 2, 7, 0, 1, 2]), 1, 3, 2).tolist() == [7, 0]
    # vLLM's docstring example: [2, 3] matches at 1, three tokens follow.
    assert ngram_lookup(np.array([1, 2, 3, 4, 2, 3]), 2, 3, 4).tolist() == [4, 2, 3]
    assert ngram_lookup(np.array([1, 2, 3]), 1, 2, 2).tolist() == []


# --- method inference and options rejected by name ---------------------------------------
@pytest.mark.parametrize("model,method", [("[ngram]", "ngram"), ("ngram", "ngram"),
                                          ("/ckpt/Qwen3-8B_eagle3", "eagle3"),
                                          ("yuhuili/EAGLE3-LLaMA3.1-Instruct-8B", "eagle3"),
                                          ("/ckpt/tiny-draft", "draft_model")])
def test_method_inferred_from_the_model_as_vllm(model, method):
    cfg = spec(model=model)
    assert cfg.method == method
    assert cfg.model == (None if method == "ngram" else model)


def test_inferred_eagle1_is_rejected_and_method_or_model_is_required():
    with pytest.raises(ConfigError, match="'eagle'"):
        spec(model="yuhuili/EAGLE-LLaMA3-Instruct-8B")
    with pytest.raises(ConfigError, match="method"):
        spec()


@pytest.mark.parametrize("key,value", [("draft_tensor_parallel_size", 2), ("disable_padded_drafter_batch", True)])
def test_unsupported_options_are_rejected_by_name(key, value):
    with pytest.raises(ConfigError, match=key):
        spec(method="ngram", **{key: value})


def test_no_op_option_values_are_accepted():
    for tp in (None, 1):
        assert spec(method="ngram", draft_tensor_parallel_size=tp).method == "ngram"
    assert spec(method="ngram", disable_padded_drafter_batch=False).method == "ngram"


def test_spd_config_takes_one_draft_per_cycle():
    cfg = SpeculativeConfig.from_any({"method": "spd", "model": "/ckpt/spd"})
    assert (cfg.method, cfg.num_speculative_tokens) == ("spd", 1)
    with pytest.raises(ConfigError, match="num_speculative_tokens must be 1"):
        spec(method="spd", model="/ckpt/spd")  # K=3
    with pytest.raises(ConfigError, match="needs \"model\""):
        SpeculativeConfig.from_any({"method": "spd"})


# --- counters ----------------------------------------------------------------------------
def test_spec_stats_count_as_vllm():
    s = SpecStats()
    s.record(0, 0)  # nothing proposed: not a draft
    s.record(3, 1)
    s.record(3, 3)
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens) == (2, 6, 4)
    assert s.num_accepted_tokens_per_pos == [2, 1, 1]
    assert s.acceptance_rate_per_position == [1.0, 0.5, 0.5]  # accepted at i / drafts
    assert s.acceptance_length == 3.0  # 1 + accepted / drafts
    other = SpecStats()
    other.record(2, 0)
    s.merge(other)
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens, s.num_accepted_tokens_per_pos) == (3, 8, 4, [2, 1, 1])
    assert SpecStats().acceptance_length == 1.0


def test_get_metrics_has_vllm_names_and_matches_per_request_stats(model_factory):
    path, hf = model_factory("llama")
    k = 3
    llm = LLM(path, dtype="float32", speculative_config={"method": "ngram", "num_speculative_tokens": k,
                                                         "prompt_lookup_min": 1, "prompt_lookup_max": 2})
    prompts = [{"prompt_token_ids": [5, 6, 7, 5, 6, 7, 5, 6]}, {"prompt_token_ids": [1, 2, 3, 4]}]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    metrics = {m.name: m for m in llm.get_metrics()}
    assert set(metrics) == {"vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens",
                            "vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens_per_pos"}
    drafts = metrics["vllm:spec_decode_num_drafts"].value
    per_pos = metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values
    assert drafts > 0 and len(per_pos) == k
    for name, key in (("drafts", "num_drafts"), ("draft_tokens", "num_draft_tokens"),
                      ("accepted_tokens", "num_accepted_tokens")):
        assert metrics[f"vllm:spec_decode_num_{name}"].value == sum(o.spec_stats[key] for o in outs)
    assert per_pos[0] <= drafts and sum(per_pos) == metrics["vllm:spec_decode_num_accepted_tokens"].value
    assert llm.engine.stats.acceptance_length == 1 + metrics["vllm:spec_decode_num_accepted_tokens"].value / drafts
    assert LLM(path, dtype="float32").get_metrics() == []


# --- request semantics -------------------------------------------------------------------
def _greedy_ids(llm, prompt, n=12):
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    return out.token_ids


def _visible_stop(tok, ids):
    """An index whose token is generated there first and adds visible text."""
    for i, t in enumerate(ids):
        if t not in ids[:i] and tok.decode(ids[:i + 1]) != tok.decode(ids[:i]) and i > 0:
            return i
    pytest.skip("no visible token in the greedy continuation")


def test_eos_from_config_json_without_generation_config(tmp_path):
    path = str(tmp_path)
    make_hf_model("llama", path)
    prompt = [3, 4, 5, 6]
    ids = _greedy_ids(LLM(path, dtype="float32"), prompt)
    tok = LLM(path, dtype="float32").get_tokenizer()
    i = _visible_stop(tok, ids)
    os.remove(os.path.join(path, "generation_config.json"))
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    tcfg.pop("eos_token")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = ids[i]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    llm = LLM(path, dtype="float32")
    assert llm.engine.eos_token_ids == {ids[i]}
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=12),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[:i + 1] and out.finish_reason == "stop" and out.stop_reason is None
    assert out.text == tok.decode(ids[:i])  # the EOS token stays in token_ids, not in text


def test_stop_token_text_is_left_out(model_factory):
    path, _ = model_factory("llama")
    llm = LLM(path, dtype="float32")
    prompt = [7, 8, 9]
    ids = _greedy_ids(llm, prompt)
    i = _visible_stop(llm.get_tokenizer(), ids)
    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop_token_ids=[ids[i]]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[:i + 1] and out.stop_reason == ids[i]
    assert out.text == llm.get_tokenizer().decode(ids[:i])


def test_stop_strings_without_a_tokenizer_are_a_request_error(model_factory):
    path, _ = model_factory("llama")
    llm = LLM(path, dtype="float32", skip_tokenizer_init=True)
    with pytest.raises(RequestError, match="stop strings"):
        llm.generate([{"prompt_token_ids": [1, 2]}], SamplingParams(stop=["\n"]), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


# --- seed --------------------------------------------------------------------------------
def test_engine_seed_makes_unseeded_sampling_repeat(model_factory):
    path, _ = model_factory("llama")
    prompts = [{"prompt_token_ids": [1 + i, 2 + i, 3 + i]} for i in range(4)]
    params = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)

    def run(seed, before):
        torch.manual_seed(before)  # whatever ran before, the engine seed decides
        return [o.outputs[0].token_ids for o in LLM(path, dtype="float32", seed=seed).generate(
            prompts, params, use_tqdm=False)]

    first = run(1, before=11)
    assert run(1, before=22) == first
    assert run(2, before=11) != first
    with pytest.raises(ConfigError, match="seed"):
        EngineConfig(model=path, seed="1")
