"""Model families against HF transformers, the correctness oracle: logits within 1e-4
(fp32) for a batch of prompts of different lengths, in prefill and in step-by-step
decode over the paged cache."""

from __future__ import annotations

import pytest
import torch

from parspec.metadata import build_attention_metadata
from parspec.kv_cache import BlockManager, allocate_kv_cache, bind_kv_cache
from parspec.loader import load_model
from tests.conftest import FAMILIES

BLOCK = 4


class PagedRunner:
    """Minimal driver of a parspec model over a paged cache (shuffled block ids)."""

    def __init__(self, model, num_blocks=256):
        cfg = model.config
        self.model = model
        self.blocks = BlockManager(num_blocks, BLOCK)
        # Hand out blocks in a scrambled order so contiguity is never assumed.
        self.blocks._free = type(self.blocks._free)(torch.randperm(num_blocks, generator=torch.Generator().manual_seed(1)).tolist())
        self.cache = allocate_kv_cache(cfg.num_hidden_layers, num_blocks, BLOCK, cfg.num_key_value_heads,
                                       cfg.head_dim, torch.float32, "cpu")
        bind_kv_cache(model.attention_layers, self.cache)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def feed(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed new tokens per sequence id; returns logits [q_len, V] per sequence."""
        ids = list(chunks)
        for i in ids:
            table = self.tables.setdefault(i, [])
            self.blocks.grow(i, table, self.lens.get(i, 0) + len(chunks[i]))
        starts = [self.lens.get(i, 0) for i in ids]
        q_lens = [len(chunks[i]) for i in ids]
        positions, meta = build_attention_metadata([self.tables[i] for i in ids], starts, q_lens, BLOCK, "cpu")
        input_ids = torch.tensor([t for i in ids for t in chunks[i]])
        with torch.no_grad():
            hidden, _ = self.model(input_ids, positions, meta)
            logits = self.model.compute_logits(hidden)
        out, o = {}, 0
        for i, q in zip(ids, q_lens):
            out[i] = logits[o:o + q]
            o += q
            self.lens[i] = self.lens.get(i, 0) + q
        return out


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_hf_prefill_and_decode(model_factory, family):
    path, hf = model_factory(family)
    model, cfg = load_model(path, torch.float32, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 11, 1, 23)]
    continuation = [torch.randint(0, cfg.vocab_size, (6,), generator=g).tolist() for _ in prompts]
    runner = PagedRunner(model)
    # Prefill all prompts in one batch.
    out = runner.feed(dict(enumerate(prompts)))
    for i, p in enumerate(prompts):
        torch.testing.assert_close(out[i], hf_logits(hf, p), atol=1e-4, rtol=0)
    # Decode one token per step per sequence, batched, and a 3-token chunk at the end.
    full = [list(p) for p in prompts]
    for step in range(5):
        out = runner.feed({i: [continuation[i][step]] for i in range(len(prompts))})
        for i in range(len(prompts)):
            full[i].append(continuation[i][step])
            torch.testing.assert_close(out[i][0], hf_logits(hf, full[i])[-1], atol=1e-4, rtol=0)
    chunks = {0: [3, 4, 5], 2: [7, 8, 9]}
    out = runner.feed(chunks)
    for i, chunk in chunks.items():
        full[i] += chunk
        torch.testing.assert_close(out[i], hf_logits(hf, full[i])[-3:], atol=1e-4, rtol=0)


def test_aux_hidden_states_are_layer_inputs(model_factory):
    """EAGLE-3 reads the residual stream at the input of chosen layers: HF's hidden_states[i]."""
    path, hf = model_factory("llama")
    model, cfg = load_model(path, torch.float32, torch.device("cpu"))
    tokens = list(range(3, 12))
    PagedRunner(model)  # binds a cache
    positions, meta = build_attention_metadata([[5, 1, 2]], [0], [len(tokens)], BLOCK, "cpu")
    with torch.no_grad():
        _, aux = model(torch.tensor(tokens), positions, meta, aux_layers=(2, 0, 2))
        ref = hf(torch.tensor([tokens]), output_hidden_states=True).hidden_states
    assert len(aux) == 3
    torch.testing.assert_close(aux[0], ref[2][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(aux[1], ref[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(aux[2], ref[2][0], atol=1e-5, rtol=0)


def test_bf16_load_keeps_rope_tables_fp32(model_factory):
    path, _ = model_factory("llama")
    model, _ = load_model(path, torch.bfloat16, torch.device("cpu"))
    assert model.lm_head.weight.dtype == torch.bfloat16
    rope = model.model.layers[0].self_attn.rope
    assert rope.cos.dtype == torch.float32
    # position 1 rotates the first pair by exactly 1 radian (inv_freq[0] == 1)
    assert rope.cos[1, 0].item() == pytest.approx(torch.cos(torch.tensor(1.0)).item(), abs=1e-7)
