"""`parspec bench`: the matrix on the reference pair at a tiny size (values, not timings),
the roofline maths by hand, the peers, and the CLI wiring (expansion included)."""

from __future__ import annotations

import json
import os
import sys
import time
import types

import pytest
import torch
from torch import nn

from parspec.bench import report
from parspec.bench.harness import REFERENCE_PAIR, REPO, BenchConfig, ModelPair, run_bench, spec_config
from parspec.bench.peers import PeerUnsupported, gpt_fast_bench, hf_generate, run_peers
from parspec.cli import build_parser, main
from parspec.config import ConfigError, SpeculativeConfig

PROMPTS = os.path.join(REPO, "fixtures", "demo_prompts.jsonl")  # in the repo, unlike ../shared/data
GPT_FAST = os.path.join(REPO, ".peers", "gpt-fast")  # a local checkout, never committed
PAIR = ModelPair.under(REFERENCE_PAIR)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These GEMMs are tiny: one thread is faster, and does not spin against a busy host.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def prompt_ids(n: int) -> list[list[int]]:
    from parspec.bench.harness import read_prompts
    from parspec.tokenizer import Tokenizer

    tok = Tokenizer(PAIR.target)
    return [tok.encode(p) for p in read_prompts(PROMPTS, n)]


def engine_outputs(ids: list[list[int]], max_tokens: int) -> list[list[int]]:
    from parspec import LLM, SamplingParams

    llm = LLM(PAIR.target, dtype="float32", device="cpu", max_num_seqs=1, max_model_len=1024)
    outs = llm.generate([{"prompt_token_ids": x} for x in ids],
                        SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


# --- the matrix --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench") / "matrix.json")
    cfg = BenchConfig(methods=["ngram", "p-eagle"], ks=[2], concurrency=[2, 1], prompts=PROMPTS, num_prompts=2,
                      max_tokens=8, repeats=1, dtype="float32", device="cpu")
    record = run_bench(cfg, out=out, progress=False, log=lambda *_: None)
    return out, record


def test_matrix_has_every_cell_with_sane_values(matrix):
    out, record = matrix
    cells = {(c["method"], c["k"], c["concurrency"]): c for c in record["cells"]}
    # no-spec was added (the baseline) and runs first, at every concurrency
    assert [tuple(c[k] for k in ("method", "k", "concurrency")) for c in record["cells"][:2]] == \
        [("no-spec", None, 1), ("no-spec", None, 2)]
    assert set(cells) == {(m, k, c) for m, k in (("no-spec", None), ("ngram", 2), ("p-eagle", 2)) for c in (1, 2)}
    for (method, k, conc), c in cells.items():
        assert c.get("error") is None, c.get("error")
        assert c["num_prompts"] == 2 and c["tokens"] == 2 * 8
        assert c["tokens_per_s"] > 0 and c["tokens_per_s_min"] <= c["tokens_per_s"] <= c["tokens_per_s_max"]
        assert len(c["tokens_per_s_runs"]) == 1 and c["ms_per_output_token"] > 0
        # fp32 on the CPU: speculation changes nothing, token for token
        assert c["mismatch_rate_vs_no_spec"] == 0.0 and c["mismatched_prompts"] == []
        assert c["roofline_tokens_per_s"] is None and c["percent_of_roofline"] is None  # no bandwidth on CPU
        if c["draft_ms"] is not None:  # the engine's StepEvents hook, when present
            assert c["timed_steps"] > 0 and c["verify_ms"] > 0 and c["draft_ms"] >= 0
        if method == "no-spec":
            assert c["acceptance_length"] in (None, 1.0) and c["speedup_vs_no_spec"] == 1.0
            assert c["speculative_config"] is None
        else:
            assert 1.0 <= c["acceptance_length"] <= k + 1
            rates = c["acceptance_rate_per_position"]
            assert len(rates) == k and all(0.0 <= r <= 1.0 for r in rates)
            assert c["speedup_vs_no_spec"] == pytest.approx(
                c["tokens_per_s"] / cells[("no-spec", None, conc)]["tokens_per_s"])
            assert c["speculative_config"]["num_speculative_tokens"] == k
    assert cells[("p-eagle", 2, 1)]["speculative_config"]["parallel_drafting"] is True
    # the trained head accepts something on these prompts, at either concurrency alike
    assert cells[("p-eagle", 2, 1)]["acceptance_length"] > 1.0
    assert cells[("p-eagle", 2, 1)]["acceptance_length"] == cells[("p-eagle", 2, 2)]["acceptance_length"]


def test_record_echoes_parameters_and_provenance(matrix):
    out, record = matrix
    with open(out) as f:
        saved = json.load(f)
    assert saved["cells"] == json.loads(json.dumps(record["cells"]))
    p = saved["parameters"]
    assert p["methods"] == ["no-spec", "ngram", "p-eagle"] and p["ks"] == [2] and p["concurrency"] == [1, 2]
    assert (p["num_prompts"], p["max_tokens"], p["repeats"], p["dtype"], p["device"]) == (2, 8, 1, "float32", "cpu")
    assert p["prompts"] == PROMPTS and p["enforce_eager"] is False and p["peers"] == []
    assert p["models"] == PAIR.as_dict() and p["resolved_dtype"] == "float32"
    assert p["prompts_per_concurrency"] == {"1": 2, "2": 2}
    assert saved["commit"] and "CPU" in saved["device"]
    assert saved["versions"]["torch"] == torch.__version__
    assert saved["bandwidth"]["bytes_per_s"] is None
    t = saved["target"]
    # fixture target: 5 layers, 1 KV head of 128, fp32; tied 6144 x 512 embedding = the lm_head
    assert t["kv_bytes_per_token"] == 2 * 5 * 1 * 128 * 4
    assert t["weight_bytes_per_step"] == 4 * t["num_parameters"]  # tied: nothing left out
    assert t["mean_context_tokens"]["1"] == pytest.approx(t["mean_prompt_tokens"]["1"] + 4)


def test_plots_are_written_beside_the_json(matrix):
    out, record = matrix
    assert len(record["plots"]) == 4
    for name in record["plots"]:
        path = os.path.join(os.path.dirname(out), name)
        with open(path, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 10_000


def test_summary_table_lists_every_cell(matrix):
    _, record = matrix
    lines = report.summary_table(record).splitlines()
    assert lines[0].split()[:4] == ["method", "K", "conc", "tok/s"]
    assert len(lines) == 2 + len(record["cells"])
    assert any(line.startswith("p-eagle") for line in lines)


# --- roofline ----------------------------------------------------------------------------
def test_roofline_by_hand():
    # Llama-3.1-8B-like in bf16: 16e9 weight bytes, K+V = 2 x 32 layers x 8 heads x 128 x 2 bytes
    kv = report.kv_bytes_per_token(32, 8, 128, torch.bfloat16)
    assert kv == 131072
    assert report.bytes_per_step(16e9, kv, 500, 1) == 16e9 + 131072 * 500
    one = report.roofline_tokens_per_s(16e9, kv, 500, 1, 4e12)
    assert one == pytest.approx(4e12 / 16.065536e9)  # 248.98 tokens/s
    assert report.roofline_tokens_per_s(16e9, kv, 500, 1, 4e12, acceptance_length=3.0) == pytest.approx(3 * one)
    eight = report.roofline_tokens_per_s(16e9, kv, 500, 8, 4e12)
    assert eight == pytest.approx(8 * 4e12 / (16e9 + 8 * 65.536e6))  # 1936.6: KV grows with the batch
    assert report.percent_of(124.49, one) == pytest.approx(50.0, rel=1e-3)
    assert report.percent_of(None, one) is None and report.percent_of(1.0, None) is None
    with pytest.raises(ValueError, match="bandwidth"):
        report.roofline_tokens_per_s(1e9, kv, 10, 1, 0.0)


def test_streamed_weight_bytes_counts_a_tied_table_once_and_skips_an_untied_one():
    class Tiny(nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.norm = nn.LayerNorm(4, bias=False)
            self.lm_head = nn.Linear(4, 10, bias=False)
            if tied:
                self.lm_head.weight = self.embed.weight

    assert report.streamed_weight_bytes(Tiny(tied=False)) == (4 + 40) * 4  # norm + lm_head; the table is gathered
    assert report.streamed_weight_bytes(Tiny(tied=True)) == (4 + 40) * 4  # the table IS the lm_head: once
    assert report.streamed_weight_bytes(Tiny(tied=False).to(torch.bfloat16)) == (4 + 40) * 2


# --- peers -------------------------------------------------------------------------------
def test_hf_plain_peer_matches_the_engine():
    ids = prompt_ids(2)
    r = hf_generate(PAIR.target, ids, 8, "float32", "cpu")
    assert r["outputs"] == engine_outputs(ids, 8)  # eos is no stop, like ignore_eos
    assert r["tokens"] == 16 and r["tokens_per_s"] > 0 and r["batch_size"] == 1


def test_peer_failures_are_recorded_not_raised():
    ids = prompt_ids(1)
    peers = run_peers(["gpt-fast"], PAIR, ids, 4, 2, "float32", "cpu", gpt_fast_dir=None, log=lambda *_: None)
    assert "--gpt-fast" in peers["gpt_fast"]["error"]
    peers = run_peers(["gpt-fast"], PAIR, ids, 4, 2, "float32", "cpu", gpt_fast_dir="/nonexistent",
                      log=lambda *_: None)
    assert "not a gpt-fast checkout" in peers["gpt_fast"]["error"]


@pytest.mark.skipif(not os.path.isfile(os.path.join(GPT_FAST, "generate.py")),
                    reason="no gpt-fast checkout in .peers/gpt-fast")
def test_gpt_fast_peer_runs_our_weights_exactly():
    from parspec.bench.peers import gpt_fast_model_args, load_gpt_fast
    from parspec.config import ModelConfig

    ids = prompt_ids(2)
    r = gpt_fast_bench(GPT_FAST, PAIR.target, PAIR.draft, ids, 12, 3, "float32", "cpu", compile=False)
    expected = engine_outputs(ids, 12)
    # the converted weights (fused wqkv, rotary rows reordered) give the target's own tokens
    assert r["gpt_fast_plain"]["outputs"] == expected
    spec = r["gpt_fast_speculative"]
    assert spec["outputs"] == expected and spec["k"] == 3
    assert 1.0 <= spec["acceptance_length"] <= 4.0 and len(spec["accept_counts"]) == 4
    model_mod, _ = load_gpt_fast(GPT_FAST)
    assert "model" not in sys.modules or sys.modules["model"] is not model_mod  # names restored
    qwen3_like = ModelConfig.from_dict({"architectures": ["Qwen3ForCausalLM"], "vocab_size": 64, "hidden_size": 64,
                                        "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
                                        "num_key_value_heads": 2, "head_dim": 32})
    with pytest.raises(PeerUnsupported, match="head_dim"):
        gpt_fast_model_args(model_mod, qwen3_like)


# --- config and CLI ----------------------------------------------------------------------
def test_config_errors_name_the_value(tmp_path):
    with pytest.raises(ConfigError, match="nope"):
        BenchConfig(methods=["nope"], prompts=PROMPTS)
    with pytest.raises(ConfigError, match="ks"):
        BenchConfig(ks=[0], prompts=PROMPTS)
    with pytest.raises(ConfigError, match="drafter directory"):
        BenchConfig(pair=ModelPair.under(str(tmp_path)), methods=["eagle3"], prompts=PROMPTS)
    with pytest.raises(ConfigError, match="peer"):
        BenchConfig(peers=["vllm"], prompts=PROMPTS)


def test_refined_p_eagle_methods():
    """p-eagle-r1 / -r2: P-EAGLE's head with 1 / 2 refinement passes, valid speculative configs,
    picked by name in the matrix and on the CLI."""
    for method, passes in (("p-eagle-r1", 1), ("p-eagle-r2", 2)):
        spec = spec_config(method, 3, PAIR)
        assert spec == {"method": "eagle3", "model": PAIR.p_eagle, "num_speculative_tokens": 3,
                        "parallel_drafting": True, "draft_refine_passes": passes}
        assert SpeculativeConfig.from_any(spec).draft_refine_passes == passes
    cfg = BenchConfig(methods=["p-eagle-r2", "p-eagle-r1"], prompts=PROMPTS)
    assert cfg.methods == ["no-spec", "p-eagle-r1", "p-eagle-r2"]
    assert build_parser().parse_args(["bench", "--methods", "p-eagle-r2"]).methods == ["p-eagle-r2"]


def cli_args(tmp_path, *extra) -> list[str]:
    return ["bench", "--methods", "no-spec", "--concurrency", "1", "--num-prompts", "1", "--max-tokens", "4",
            "--repeats", "1", "--dtype", "float32", "--device", "cpu", "--prompts", PROMPTS,
            "--out", str(tmp_path / "cli.json"), "--no-progress", *extra]


def test_cli_bench_prints_the_table_and_writes_the_record(tmp_path, capsys):
    assert main(cli_args(tmp_path, "--enforce-eager")) == 0
    out = capsys.readouterr().out
    assert "no-spec" in out and "tok/s" in out and "cli.json" in out
    with open(tmp_path / "cli.json") as f:
        record = json.load(f)
    assert record["parameters"]["enforce_eager"] is True and len(record["cells"]) == 1
    assert main(["bench", "--prompts", str(tmp_path / "missing.jsonl"), "--methods", "no-spec"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


def test_cli_expand_builds_the_pair_once_then_reuses_it(tmp_path, monkeypatch, capsys):
    calls = []

    def fake_expand(src_root, dst_root, scale, dtype):
        calls.append((src_root, dst_root, scale, dtype))
        os.makedirs(dst_root, exist_ok=True)
        for name in ("target", "draft", "eagle3", "p-eagle"):
            os.symlink(os.path.join(src_root, name), os.path.join(dst_root, name))
        with open(os.path.join(dst_root, "expansion.json"), "w") as f:
            json.dump({"scale": scale, "dtype": dtype}, f)

    monkeypatch.setitem(sys.modules, "parspec.bench.expand",
                        types.SimpleNamespace(expand_reference_pair=fake_expand))
    dst = str(tmp_path / "expanded")
    for _ in range(2):
        assert main(cli_args(tmp_path, "--expand", "tiny", "--expand-dir", dst)) == 0
    assert calls == [(REFERENCE_PAIR, dst, "tiny", "float32")]  # the second run reused it
    with open(tmp_path / "cli.json") as f:
        record = json.load(f)
    assert record["parameters"]["models"]["target"] == os.path.join(dst, "target")
    assert record["parameters"]["expansion"] == {"scale": "tiny", "dtype": "float32", "reused": True}
    assert "tiny" in record["model_label"]
    assert main(["bench", "--expand", "8b"]) == 2  # needs --expand-dir
    assert "--expand-dir" in capsys.readouterr().err


def test_profile_host_split_times_launch_and_wait_then_restores_both():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        from profile_step import host_parts_timed
    finally:
        sys.path.pop(0)
    from parspec import LLM, SamplingParams
    from parspec.step import StepOutput

    engine = LLM(PAIR.target, dtype="float32", device="cpu", max_num_seqs=1, max_model_len=256).engine
    engine.add_request({"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(temperature=0.0, max_tokens=40,
                                                                          ignore_eos=True))
    engine.step()  # prefill, outside the measurement
    fetch = StepOutput.fetch
    with host_parts_timed(engine) as totals:
        t = time.perf_counter()
        for _ in range(5):
            engine.step()
        host = time.perf_counter() - t
    launch, wait = totals["launch"], totals["wait"]
    assert 0 < launch < host and 0 < wait < host and launch + wait < host
    for _ in range(3):
        engine.step()
    assert totals == {"launch": launch, "wait": wait}  # detached: nothing more is counted
    assert StepOutput.fetch is fetch and "_launch" not in engine.__dict__
