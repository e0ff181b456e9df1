"""`parspec generate` on a saved tiny model, with and without speculation, and its errors."""

from __future__ import annotations

import json

from parspec.cli import main


def test_generate_prints_completion_and_stats(model_factory, capsys):
    path, _ = model_factory("llama")
    rc = main(["generate", "--model", path, "--prompt", "def add(a, b):\n", "--max-tokens", "8", "--ignore-eos",
               "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("def add(a, b):\n")
    assert "8 tokens" in out and "acceptance length" in out and "K=3" in out


def test_generate_json_matches_api(model_factory, capsys, tmp_path):
    from parspec import LLM, SamplingParams

    path, _ = model_factory("llama")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "for i in range(10):\n"}) + "\n" + json.dumps({"prompt": "import os\n"}) + "\n")
    assert main(["generate", "--model", path, "--prompts-file", str(prompts), "--max-tokens", "6", "--json",
                 "--ignore-eos"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    expected = LLM(path).generate(["for i in range(10):\n", "import os\n"],
                                  SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [x["token_ids"] for x in lines] == [o.outputs[0].token_ids for o in expected]


def test_generate_errors_exit_2_with_the_bad_value(model_factory, capsys, tmp_path):
    path, _ = model_factory("llama")
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["generate", "--model", path, "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(["generate", "--model", path, "--prompt", "x", "--speculative-config", '{"method": "nope"}']) == 2
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json}\n")
    assert main(["generate", "--model", path, "--prompts-file", str(bad)]) == 2
    assert "bad.jsonl:1" in capsys.readouterr().err
