"""Shared fixtures: tiny random HF models of each family, saved with save_pretrained
(never downloaded), and a small byte-level BPE tokenizer trained in the test."""

from __future__ import annotations

import json
import os

import pytest
import torch

FAMILIES = ("llama", "llama31", "mistral", "qwen2", "qwen3")
VOCAB = 384


def _corpus() -> list[str]:
    base = [
        "def add(a, b):\n    return a + b\n",
        "for i in range(10):\n    print(i * i)\n",
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
        "import os\nimport sys\n\nif __name__ == '__main__':\n    main()\n",
        "The quick brown fox jumps over the lazy dog. ",
        "Speculative decoding drafts several tokens and verifies them at once. ",
    ]
    return base * 20


def write_tokenizer(path: str, vocab_size: int = VOCAB) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
                   "eos_token": "<|endoftext|>", "add_bos_token": False,
                   "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                                    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"}, f)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 0, "bos_token_id": 0}, f)


def hf_config(family: str, **overrides):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    if family == "llama":
        cfg = transformers.LlamaConfig(**{**common, "rope_theta": 10000.0, **overrides})
    elif family == "llama31":
        cfg = transformers.LlamaConfig(**{**common, "num_key_value_heads": 1, "tie_word_embeddings": True,
                                          "rope_theta": 500000.0, "max_position_embeddings": 1024,
                                          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                           "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 64}, **overrides})
    elif family == "mistral":
        cfg = transformers.MistralConfig(**{**common, "sliding_window": None, **overrides})
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**{**common, "head_dim": 32, **overrides})
    else:
        raise ValueError(family)
    return cfg


def make_hf_model(family: str, path: str, seed: int = 0, tokenizer: bool = True, **overrides):
    """Random tiny HF model saved to ``path``; returns the HF model (float32, eval)."""
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # random init at std 0.02 makes near-uniform logits; sharpen them
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    model.eval()
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        write_tokenizer(path, cfg.vocab_size)
    return model


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Creates (and caches per arguments) tiny model directories."""
    cache = {}

    def make(family: str = "llama", seed: int = 0, **overrides):
        key = (family, seed, tuple(sorted(overrides.items())))
        if key not in cache:
            path = str(tmp_path_factory.mktemp(f"{family}-{seed}"))
            cache[key] = (path, make_hf_model(family, path, seed, **overrides))
        return cache[key]

    return make
