"""EAGLE-3 / P-EAGLE heads in vLLM's, speculators' and SafeAILab's layouts (CPU, float32).

Each reader is checked against files written here to that layout's spec (never downloaded);
each writer by a round trip: same config, same tensors, and the same drafts in the engine.
A vLLM-style P-EAGLE head (mask token under any of vLLM's keys, no parspec-only key) drafts
in parallel and sequentially; pickled-only directories and stray tensors fail clearly."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from parspec import LLM, SamplingParams
from parspec.cli import main as cli_main
from parspec.config import ConfigError
from parspec.loader import LoadError
from parspec.models.drafter import Eagle3Config, Eagle3Drafter, head_tensors, load_eagle3, save_eagle3
from parspec.models.head_formats import read_head, write_head
from tests.test_eagle import random_head

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=10)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pair(model_factory, tmp_path_factory):
    """A 5-layer target and a P-EAGLE head for it (default aux layers, the target's embedding)."""
    target, hf = model_factory("llama", seed=0, num_hidden_layers=5)
    head = random_head(hf, seed=2, parallel=True)
    path = str(tmp_path_factory.mktemp("peagle"))
    save_eagle3(head, path)
    g = torch.Generator().manual_seed(1)
    mask = head.config.mask_token_id
    prompts = [{"prompt_token_ids": [t for t in torch.randint(0, 383, (5 + 3 * i,), generator=g).tolist() if t != mask]}
               for i in range(2)]
    return {"target": target, "hf": hf, "head": head, "path": path, "prompts": prompts}


def _reference(pair):
    """The original head's parallel run, computed once."""
    if "reference" not in pair:
        pair["reference"] = _run(pair, pair["path"], parallel=True)
    return pair["reference"]


def _run(pair, path: str, parallel: bool, k: int = 3):
    llm = LLM(pair["target"], dtype="float32", block_size=4, skip_tokenizer_init=True,
              speculative_config={"method": "eagle3", "model": path, "num_speculative_tokens": k,
                                  "parallel_drafting": parallel})
    outs = llm.generate(pair["prompts"], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [o.spec_stats for o in outs]


def _same_head(a: str, b: str) -> None:
    cfg_a, ta = read_head(a)
    cfg_b, tb = read_head(b)
    assert cfg_a == cfg_b
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def _randomize(model: Eagle3Drafter, seed: int) -> Eagle3Drafter:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() >= 2 else 0.1) + (p.dim() == 1))
    return model.eval()


def _same_outputs(a: Eagle3Drafter, b: Eagle3Drafter, feature_width: int) -> None:
    tokens = torch.tensor([5, 17, 300, 2, 99, 383])
    feats = torch.randn(6, feature_width, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    with torch.no_grad():
        for x, y in zip(a(tokens, torch.arange(6), a.project(feats), mask),
                        b(tokens, torch.arange(6), b.project(feats), mask)):
            torch.testing.assert_close(x, y, atol=0, rtol=0)


# --- writers: round trips ----------------------------------------------------------------------

def test_default_save_is_the_vllm_layout_old_and_new_vllm_read(pair):
    cfg = json.load(open(os.path.join(pair["path"], "config.json")))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
    mask = pair["head"].config.mask_token_id
    assert cfg["mask_token_id"] == cfg["ptd_token_id"] == mask  # current vLLM, older vLLM
    names = load_file(os.path.join(pair["path"], "model.safetensors"))
    assert names["mask_hidden"].shape == (1, 3 * 64)
    assert not any(n.startswith("midlayer.") for n in names)
    assert "layers.0.self_attn.q_proj.weight" in names and "layers.0.hidden_norm.weight" in names


def test_aux_ids_written_top_level_and_nested_read_from_either(pair, tmp_path):
    head = random_head(pair["hf"], seed=3, aux=(0, 2, 4))
    save_eagle3(head, str(tmp_path / "both"))
    cfg = json.load(open(tmp_path / "both" / "config.json"))
    assert cfg["eagle_aux_hidden_state_layer_ids"] == cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 4]
    top = {k: v for k, v in cfg.items() if k != "eagle_config"}
    nested = {k: v for k, v in cfg.items() if k != "eagle_aux_hidden_state_layer_ids"}
    for variant in (top, nested):
        assert Eagle3Config.from_dict(variant).aux_layer_ids == (0, 2, 4)
    with pytest.raises(ConfigError, match=r"aux layer ids disagree.*\[0, 2, 4\].*\[1, 2, 4\]"):
        Eagle3Config.from_dict({**top, "eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 2, 4]}})


@pytest.mark.parametrize("fmt", ["vllm", "speculators", "eagle"])
def test_export_round_trip_drafts_identically(pair, tmp_path, fmt):
    out, back = str(tmp_path / fmt), str(tmp_path / "back")
    assert cli_main(["export-head", "--head", pair["path"], "--out", out, "--format", fmt,
                     "--verifier", "tiny-llama"]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    names = load_file(os.path.join(out, "model.safetensors"))
    if fmt == "speculators":
        assert cfg["speculators_model_type"] == "peagle" and cfg["mask_token_id"] == pair["head"].config.mask_token_id
        assert cfg["speculators_config"]["verifier"]["name_or_path"] == "tiny-llama"
        assert cfg["transformer_layer_config"]["hidden_size"] == 64 and names["mask_hidden"].shape == (1, 1, 192)
    if fmt == "eagle":
        assert any(n.startswith("midlayer.") for n in names) and not any(n.startswith("layers.") for n in names)
    _same_head(pair["path"], out)
    assert cli_main(["export-head", "--head", out, "--out", back, "--format", "vllm"]) == 0
    _same_head(pair["path"], back)
    assert _run(pair, out, parallel=True) == _reference(pair)


def test_eagle_export_refuses_what_safeailab_would_silently_drop(pair, tmp_path):
    two_layers = random_head(pair["hf"], seed=4, layers=2, aux=(0, 1, 3))
    with pytest.raises(ConfigError, match=r"num_hidden_layers=2.*aux layers \[0, 1, 3\]"):
        write_head(two_layers.config, head_tensors(two_layers), str(tmp_path / "x"), "eagle")
    biased = replace(random_head(pair["hf"], seed=4).config, mlp_bias=True)
    with pytest.raises(ConfigError, match="mlp_bias=True"):
        write_head(biased, {}, str(tmp_path / "y"), "eagle")


# --- readers: files written to each layout's spec ------------------------------------------------

@pytest.mark.parametrize("key", ["mask_token_id", "ptd_token_id", "pard_token"])
def test_vllm_peagle_head_without_parspec_key_drafts_both_ways(pair, tmp_path, key):
    cfg = json.load(open(os.path.join(pair["path"], "config.json")))
    mask = cfg["mask_token_id"]
    for k in ("parallel_drafting", "mask_token_id", "ptd_token_id"):
        del cfg[k]
    cfg[key] = mask
    tensors = load_file(os.path.join(pair["path"], "model.safetensors"))
    tensors["mask_hidden"] = tensors["mask_hidden"].reshape(1, 1, -1)  # speculators' shape
    os.makedirs(tmp_path / "h")
    save_file(tensors, str(tmp_path / "h" / "model.safetensors"))
    json.dump(cfg, open(tmp_path / "h" / "config.json", "w"))
    head = load_eagle3(str(tmp_path / "h"), torch.float32, CPU, pair["hf"].model.embed_tokens)
    assert head.config.parallel_drafting and head.config.mask_token_id == mask
    assert torch.equal(head.mask_hidden, pair["head"].mask_hidden)
    if key == "pard_token":  # the engine runs once; the other keys differ only in config.json
        assert _run(pair, str(tmp_path / "h"), parallel=True) == _reference(pair)
        ids, stats = _run(pair, str(tmp_path / "h"), parallel=False)  # greedy: the target's tokens either way
        assert ids == _reference(pair)[0] and all(s["num_drafts"] > 0 for s in stats)


def test_mask_token_without_mask_hidden_drafts_sequentially_only(pair, tmp_path):
    tensors = load_file(os.path.join(pair["path"], "model.safetensors"))
    del tensors["mask_hidden"]
    os.makedirs(tmp_path / "h")
    save_file(tensors, str(tmp_path / "h" / "model.safetensors"))
    json.dump(json.load(open(os.path.join(pair["path"], "config.json"))), open(tmp_path / "h" / "config.json", "w"))
    head = load_eagle3(str(tmp_path / "h"), torch.float32, CPU, pair["hf"].model.embed_tokens)
    assert head.mask_hidden is None and not head.config.parallel_drafting
    with pytest.raises(LoadError, match="mask_hidden"):
        load_eagle3(str(tmp_path / "h"), torch.float32, CPU, pair["hf"].model.embed_tokens, require_mask_hidden=True)


def _speculators_dir(path, model: Eagle3Drafter, kind: str, **extra) -> str:
    """A head as the speculators library writes one (config per its Eagle3 / P-EAGLE spec)."""
    c = model.config
    layer = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": c.hidden_size,
             "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
             "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "num_hidden_layers": 1,
             "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
             "max_position_embeddings": c.max_position_embeddings, "hidden_act": "silu",
             "attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias}
    cfg = {"architectures": ["Eagle3Speculator"], "speculators_model_type": kind, "speculators_version": "0.3.0",
           "transformer_layer_config": layer, "draft_vocab_size": c.draft_vocab_size,
           "target_hidden_size": c.target_hidden_size, "norm_before_residual": c.norm_before_residual,
           "norm_before_fc": c.norm_before_fc, "fc_norm": c.fc_norm, "norm_output": c.norm_output,
           "eagle_aux_hidden_state_layer_ids": list(c.aux_layer_ids),
           "speculators_config": {"algorithm": kind, "default_proposal_method": "greedy",
                                  "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                                  "verifier": {"name_or_path": "some/verifier", "architectures": ["LlamaForCausalLM"]}},
           **extra}
    tensors = head_tensors(model, include_embedding=True)
    if "mask_hidden" in tensors:
        tensors["mask_hidden"] = tensors["mask_hidden"].reshape(1, 1, -1)
    os.makedirs(path)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return str(path)


def test_speculators_head_with_vllm_biases_and_norms_loads(pair, tmp_path):
    base = random_head(pair["hf"], seed=5, aux=(0, 2, 4), parallel=True).config
    cfg = replace(base, norm_before_residual=True, attention_bias=True, o_proj_bias=True, mlp_bias=True,
                  norm_before_fc=True, fc_norm=True, norm_output=True)
    model = _randomize(Eagle3Drafter(cfg), seed=6)
    path = _speculators_dir(tmp_path / "spec", model, "peagle", mask_token_id=cfg.mask_token_id)
    loaded = load_eagle3(path, torch.float32, CPU)
    assert loaded.config == cfg
    assert loaded.layers[0].self_attn.o_proj.bias is not None and loaded.layers[0].mlp.down_proj.bias is not None
    _same_outputs(model, loaded, 3 * 64)
    torch.testing.assert_close(loaded.mask_hidden, model.mask_hidden, atol=0, rtol=0)
    # A bias the config does not declare is named, not silently loaded or dropped.
    plain = _speculators_dir(tmp_path / "plain", _randomize(Eagle3Drafter(base), 7), "peagle",
                             mask_token_id=base.mask_token_id)
    tensors = load_file(os.path.join(plain, "model.safetensors"))
    tensors["layers.0.mlp.down_proj.bias"] = torch.zeros(64)
    tensors["layers.0.extra_norm.weight"] = torch.ones(64)
    save_file(tensors, os.path.join(plain, "model.safetensors"))
    with pytest.raises(LoadError, match=r"'layers.0.(mlp.down_proj.bias|extra_norm.weight)'"):
        load_eagle3(plain, torch.float32, CPU)
    cfg_json = json.load(open(os.path.join(plain, "config.json")))
    cfg_json["speculators_model_type"] = "medusa"
    json.dump(cfg_json, open(os.path.join(plain, "config.json"), "w"))
    with pytest.raises(ConfigError, match="'medusa'"):
        Eagle3Config.from_pretrained(plain)


def test_safeailab_head_loads(pair, tmp_path):
    """SafeAILab's EAGLE-3: a Llama config.json (no aux ids: layers 2, L//2, L-3), `midlayer.*`."""
    model = random_head(pair["hf"], seed=8)
    tensors = {("midlayer." + n[len("layers.0."):] if n.startswith("layers.0.") else n): t
               for n, t in head_tensors(model, include_embedding=True).items()}
    c = model.config
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "bias": False, "hidden_size": c.hidden_size,
           "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
           "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim, "num_hidden_layers": 1,
           "vocab_size": c.vocab_size, "draft_vocab_size": c.draft_vocab_size, "rms_norm_eps": c.rms_norm_eps,
           "rope_theta": c.rope_theta, "max_position_embeddings": c.max_position_embeddings, "hidden_act": "silu",
           "pretraining_tp": 1, "tie_word_embeddings": False}
    os.makedirs(tmp_path / "ea")
    save_file(tensors, str(tmp_path / "ea" / "model.safetensors"))
    json.dump(cfg, open(tmp_path / "ea" / "config.json", "w"))
    loaded = load_eagle3(str(tmp_path / "ea"), torch.float32, CPU)
    assert loaded.config == c and loaded.config.aux_layer_ids is None
    _same_outputs(model, loaded, 3 * 64)


def test_pickled_only_head_is_refused_with_a_conversion_command(pair, tmp_path, monkeypatch):
    os.makedirs(tmp_path / "bin")
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"not unpickled")
    json.dump(pair["head"].config.to_dict(), open(tmp_path / "bin" / "config.json", "w"))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load called on a pickled checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(LoadError, match=r"pytorch_model\.bin(.|\n)*save_file\((.|\n)*model\.safetensors"):
        load_eagle3(str(tmp_path / "bin"), torch.float32, CPU, pair["hf"].model.embed_tokens)


def test_fixture_heads_read_in_the_new_layout():
    fix = os.path.join(os.path.dirname(__file__), "..", "fixtures", "reference")
    cfg, tensors = read_head(os.path.join(fix, "p-eagle"))
    assert cfg.parallel_drafting and cfg.mask_token_id == 6 and cfg.aux_layer_ids == (1, 2, 4)
    assert tensors["mask_hidden"].shape == (1, 3 * cfg.target_hidden_size)
    cfg, tensors = read_head(os.path.join(fix, "eagle3"))
    assert not cfg.parallel_drafting and "mask_hidden" not in tensors
