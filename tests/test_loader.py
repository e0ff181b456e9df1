"""Bad checkpoints and configs fail at the boundary with a message naming the problem."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from parspec.config import ConfigError, EngineConfig, ModelConfig, SpeculativeConfig
from parspec.loader import LoadError, load_model
from parspec.tokenizer import Tokenizer

CPU = torch.device("cpu")


@pytest.fixture
def llama_dir(model_factory, tmp_path):
    src, _ = model_factory("llama")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


def test_missing_directory():
    with pytest.raises((LoadError, ConfigError), match="not found"):
        load_model("/nonexistent/model", torch.float32, CPU)


@pytest.mark.parametrize("pickled", ["pytorch_model.bin", "weights.pt"])
def test_missing_weights_names_pickles(llama_dir, monkeypatch, pickled):
    tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
    os.remove(os.path.join(llama_dir, "model.safetensors"))
    torch.save(tensors, os.path.join(llama_dir, pickled))

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the loader must never unpickle a checkpoint")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(LoadError, match=f"{pickled}.*safetensors") as err:
        load_model(llama_dir, torch.float32, CPU)
    # The message says how to convert, not only that safetensors is wanted.
    assert "save_pretrained" in str(err.value) and "safe_serialization=True" in str(err.value)


def test_integer_weight_is_rejected(llama_dir):
    path = os.path.join(llama_dir, "model.safetensors")
    tensors = load_file(path)
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = (tensors[name] * 100).to(torch.int32)
    save_file(tensors, path)
    with pytest.raises(LoadError, match=rf"{name}.*model\.safetensors.*torch\.int32.*floating"):
        load_model(llama_dir, torch.float32, CPU)
    tensors[name] = tensors[name].to(torch.float16)  # another float dtype is a cast, not an error
    save_file(tensors, path)
    load_model(llama_dir, torch.float32, CPU)


def test_drafter_integer_buffers_still_load(tmp_path):
    from parspec.models.drafter import Eagle3Config, Eagle3Drafter, load_eagle3, save_eagle3

    cfg = Eagle3Config(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=8, vocab_size=50, draft_vocab_size=5, target_hidden_size=16, aux_layer_ids=(0, 1, 2))
    head = Eagle3Drafter(cfg)
    head.d2t.copy_(torch.tensor([0, 2, 4, 6, 8]))
    head.t2d.zero_()[[0, 3, 6, 9, 12]] = True
    save_eagle3(head, str(tmp_path / "head"), include_embedding=True)
    saved = load_file(str(tmp_path / "head" / "model.safetensors"))
    assert saved["d2t"].dtype == torch.int64 and saved["t2d"].dtype == torch.bool
    loaded = load_eagle3(str(tmp_path / "head"), torch.float32, "cpu")
    assert torch.equal(loaded.d2t, head.d2t) and torch.equal(loaded.t2d, head.t2d)
    assert torch.equal(loaded.fc.weight, head.fc.weight)


def test_corrupt_safetensors(llama_dir):
    path = os.path.join(llama_dir, "model.safetensors")
    with open(path, "r+b") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(LoadError, match="model.safetensors"):
        load_model(llama_dir, torch.float32, CPU)


def test_truncated_safetensors(llama_dir):
    path = os.path.join(llama_dir, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(LoadError, match="model.safetensors"):
        load_model(llama_dir, torch.float32, CPU)


def _shard(llama_dir):
    tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
    os.remove(os.path.join(llama_dir, "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    files = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in files.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(llama_dir, fname))
        weight_map.update({k: fname for k in keys})
    with open(os.path.join(llama_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_sharded_checkpoint_loads_same_weights(model_factory, llama_dir):
    ref, _ = load_model(model_factory("llama")[0], torch.float32, CPU)
    _shard(llama_dir)
    model, _ = load_model(llama_dir, torch.float32, CPU)
    for (n, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n


def test_missing_shard(llama_dir):
    _shard(llama_dir)
    os.remove(os.path.join(llama_dir, "model-00002-of-00002.safetensors"))
    with pytest.raises(LoadError, match="model-00002-of-00002.safetensors"):
        load_model(llama_dir, torch.float32, CPU)


def test_missing_tensor(llama_dir):
    path = os.path.join(llama_dir, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path)
    with pytest.raises(LoadError, match="layers.1.mlp.gate_up_proj"):
        load_model(llama_dir, torch.float32, CPU)


def test_shape_mismatch(llama_dir):
    _edit_config(llama_dir, intermediate_size=128)
    with pytest.raises(LoadError, match=r"shape mismatch for .model\.layers\.0\.mlp\..*checkpoint \(.*96"):
        load_model(llama_dir, torch.float32, CPU)


def test_unexpected_tensor(llama_dir):
    path = os.path.join(llama_dir, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.7.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, path)
    with pytest.raises(LoadError, match="layers.7"):
        load_model(llama_dir, torch.float32, CPU)


def test_unsupported_architecture(llama_dir):
    _edit_config(llama_dir, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        load_model(llama_dir, torch.float32, CPU)


def test_malformed_config(llama_dir):
    with open(os.path.join(llama_dir, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_model(llama_dir, torch.float32, CPU)


@pytest.mark.parametrize("field,value", [("num_key_value_heads", 3), ("hidden_size", -4), ("num_hidden_layers", "2")])
def test_bad_config_values(llama_dir, field, value):
    _edit_config(llama_dir, **{field: value})
    with pytest.raises(ConfigError, match=field if field != "num_key_value_heads" else "num_key_value_heads=3"):
        load_model(llama_dir, torch.float32, CPU)


def test_rope_keys_old_and_new_formats():
    old = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192}}
    new = dict(old)
    del new["rope_theta"], new["rope_scaling"]
    new["rope_parameters"] = {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192,
                              "rope_theta": 500000.0}
    a, b = ModelConfig.from_dict(old), ModelConfig.from_dict(new)
    assert a.rope_theta == b.rope_theta == 500000.0
    assert a.rope_scaling["factor"] == b.rope_scaling["factor"] == 8.0
    with pytest.raises(ConfigError, match="yarn"):
        ModelConfig.from_dict({**old, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_tokenizer_errors_and_chat_template(model_factory, tmp_path):
    path, _ = model_factory("llama")
    tok = Tokenizer(path)
    text = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok.encode(text)) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(LoadError, match="tokenizer.json"):
        Tokenizer(str(tmp_path))
    with pytest.raises(LoadError, match="skip_tokenizer_init"):
        Tokenizer(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("value,match", [
    ('{"method": "medusa", "num_speculative_tokens": 3}', "medusa"),
    ('{"method": "ngram", "num_speculative_tokens": 0}', "num_speculative_tokens"),
    ('{"method": "draft_model", "num_speculative_tokens": 3}', "model"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "bogus": 1}', "bogus"),
    ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 5, "prompt_lookup_max": 2}', "prompt_lookup"),
    ("{oops", "not valid JSON"),
    ('{"num_speculative_tokens": 3}', "method"),
])
def test_speculative_config_errors(value, match):
    with pytest.raises(ConfigError, match=match):
        SpeculativeConfig.from_any(value)


def test_speculative_config_vllm_shape():
    spec = SpeculativeConfig.from_any({"method": "eagle3", "model": "/x", "num_speculative_tokens": 7,
                                       "parallel_drafting": True})
    assert spec.parallel_drafting and spec.num_speculative_tokens == 7


@pytest.mark.parametrize("kwargs,match", [({"block_size": 12}, "block_size"), ({"max_num_seqs": 0}, "max_num_seqs"),
                                          ({"device": "tpu"}, "device"), ({"gpu_memory_utilization": 1.5}, "gpu_memory")])
def test_engine_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(model="x", **kwargs)
