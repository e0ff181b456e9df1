"""EAGLE-3 / P-EAGLE drafting through the engine (CPU, float32): greedy output is the
target's own, token for token; a head built to agree with the target gets most drafts
accepted in both modes; P-EAGLE's one paged pass equals a dense masked reference, and so
does each refinement pass, its slots fed the previous pass's drafts; checkpoints load in
parspec's and EAGLE's naming; bad heads fail with clear errors."""

from __future__ import annotations

import itertools
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from parspec import LLM, SamplingParams
from parspec.config import ConfigError, SpeculativeConfig
from parspec.loader import LoadError
from parspec.models.drafter import Eagle3Config, Eagle3Drafter, load_eagle3, save_eagle3
from parspec.sampling import probs_from_logits
from tests.conftest import make_hf_model

MAX_TOKENS = 20
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=MAX_TOKENS)


def _prompts(batch: int, vocab: int, seed: int = 0, avoid: int | None = None) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(batch):
        ids = torch.randint(0, vocab, (4 + (5 * i) % 9,), generator=g).tolist()
        if avoid is not None:
            ids = [(t + 1) % vocab if t == avoid else t for t in ids]
        out.append({"prompt_token_ids": ids})
    return out


# --- heads ---------------------------------------------------------------------------------

def random_head(hf, seed: int, *, aux=None, parallel: bool = False, hidden: int | None = None,
                draft_vocab: int = 128, layers: int = 1, target_hidden: int | None = None,
                vocab: int | None = None, std: float = 0.2) -> Eagle3Drafter:
    """A random head for the target ``hf``: draft vocabulary a random injective subset of the
    target's (d2t/t2d), embedding = the target's (replaced when saved with its own)."""
    tcfg = hf.config
    vocab = vocab or tcfg.vocab_size
    cfg = Eagle3Config(
        hidden_size=hidden or tcfg.hidden_size, intermediate_size=96, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=vocab, draft_vocab_size=draft_vocab,
        target_hidden_size=target_hidden or tcfg.hidden_size, num_hidden_layers=layers, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=512, aux_layer_ids=aux, parallel_drafting=parallel,
        mask_token_id=vocab - 1 if parallel else None)
    model = Eagle3Drafter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:  # norm weights
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        if model.embed_tokens.weight.shape == hf.model.embed_tokens.weight.shape:
            model.embed_tokens.weight.copy_(hf.model.embed_tokens.weight)
        chosen = torch.randperm(vocab, generator=g)[:draft_vocab]  # draft id i -> target id chosen[i]
        model.d2t.copy_(chosen - torch.arange(draft_vocab))
        model.t2d.zero_()
        model.t2d[chosen] = True
    return model.eval()


def bigram_head(g: list[int], target_hidden: int, mask_id: int, num_heads: int = 7) -> Eagle3Drafter:
    """A P-EAGLE head that drafts exactly what a target whose next token depends on the current
    token only (next = g[current]) emits, sequentially and in parallel.

    Hidden features are ignored (hidden_norm = 0 with norm_before_residual). The head's own
    embedding is [one-hot token | real marker | mask marker]. Every head's query and key are
    constants read from the markers; with rope_theta=0.1 the 32 rotary frequencies are spread
    mod 2*pi, so a constant query attends (exponentially sharply) to the key at relative
    distance 0 -- or, for head h of a mask slot, whose query is pre-rotated by h positions, to
    the entry h positions back. Head 0 carries one-hot(g[token]) (weight 1): a real entry
    predicts g of its token. Head h carries 0.1 * one-hot(g^(h+1)[token]): mask slot j reads
    head j from the last real entry, g^(j+1) of its token, which is draft j+1. Mask slots'
    values are zero."""
    vocab = len(g)
    hidden = vocab + 8
    image = sorted(set(g))
    cfg = Eagle3Config(
        hidden_size=hidden, intermediate_size=16, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        head_dim=vocab, vocab_size=vocab, draft_vocab_size=len(image), target_hidden_size=target_hidden,
        num_hidden_layers=1, rms_norm_eps=1e-6, rope_theta=0.1, max_position_embeddings=512,
        norm_before_residual=True, aux_layer_ids=(0, 1), parallel_drafting=True, mask_token_id=mask_id)
    model = Eagle3Drafter(cfg)
    real_dim, mask_dim = vocab, vocab + 1
    layer = model.layers[0]
    powers = [list(range(vocab))]
    for _ in range(num_heads):
        powers.append([g[t] for t in powers[-1]])  # powers[n][t] = g^n(t)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.norm):
            norm.weight.fill_(1.0)
        emb = model.embed_tokens.weight
        for t in range(vocab):
            if t != mask_id:
                emb[t, t] = emb[t, real_dim] = 1.0
        emb[mask_id, mask_dim] = 1.0
        normed = layer.input_layernorm(emb)
        s_real = normed[0 if mask_id else 1, real_dim].item()
        s_mask = normed[mask_id, mask_dim].item()
        cos, sin = layer.self_attn.rope.cos, layer.self_attn.rope.sin
        half, q_size, amp = vocab // 2, num_heads * vocab, 4.0
        w = layer.self_attn.qkv_proj.weight  # [3 * q_size, 2 * hidden]
        for h in range(num_heads):
            q, k, v = h * vocab, q_size + h * vocab, 2 * q_size + h * vocab
            w[q:q + half, real_dim] = amp / s_real
            w[q:q + half, mask_dim] = amp * cos[h] / s_mask
            w[q + half:q + vocab, mask_dim] = -amp * sin[h] / s_mask
            w[k:k + half, real_dim] = amp / s_real
            w[k:k + half, mask_dim] = amp / s_mask
            beta = 1.0 if h == 0 else 0.1 * (1 - 0.01 * h)
            for t in range(vocab):
                if t != mask_id:
                    w[v + powers[h + 1][t], t] = beta / s_real
            layer.self_attn.o_proj.weight[:vocab, h * vocab:(h + 1) * vocab] = torch.eye(vocab)
        ids = torch.tensor(image)
        model.lm_head.weight[torch.arange(len(image)), ids] = 1.0
        model.d2t.copy_(ids - torch.arange(len(image)))
        model.t2d.zero_()
        model.t2d[ids] = True
        model.mask_hidden.normal_(0, 0.2)
    return model.eval()


def eagle_spec(path: str, k: int, parallel: bool, refine: int = 0) -> dict:
    return {"method": "eagle3", "model": path, "num_speculative_tokens": k, "parallel_drafting": parallel,
            "draft_refine_passes": refine}


def _outputs(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def setup(model_factory, tmp_path_factory):
    target, hf = model_factory("llama", seed=0, num_hidden_layers=5)
    heads = {}
    # Sequential head: default aux layers (2, 2, 2), the target's embedding, 128-token draft vocabulary.
    heads["seq"] = str(tmp_path_factory.mktemp("head-seq"))
    save_eagle3(random_head(hf, seed=1), heads["seq"])
    # P-EAGLE head: explicit aux layers, its own embedding and width, two layers.
    heads["par"] = str(tmp_path_factory.mktemp("head-par"))
    save_eagle3(random_head(hf, seed=2, aux=(0, 2, 4), parallel=True, hidden=48, draft_vocab=96, layers=2),
                heads["par"], include_embedding=True)
    prompts = _prompts(8, hf.config.vocab_size)
    reference = LLM(target, dtype="float32", block_size=4).generate(prompts, GREEDY, use_tqdm=False)
    return {"target": target, "hf": hf, "heads": heads, "prompts": prompts, "expected": _outputs(reference)}


@pytest.fixture(scope="module")
def bigram(tmp_path_factory):
    """A target whose attention is off (o_proj = 0): its next token is g[current token]; and a
    head that knows g."""
    vocab = 64
    hf = make_hf_model("llama", str(tmp_path_factory.mktemp("bigram-src")), seed=5, tokenizer=False,
                       vocab_size=vocab, num_hidden_layers=2)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.o_proj.weight.zero_()
        g = hf(torch.arange(vocab)[:, None]).logits[:, -1].argmax(-1).tolist()
    target = str(tmp_path_factory.mktemp("bigram-target"))
    hf.save_pretrained(target, safe_serialization=True)
    unused = sorted(set(range(vocab)) - set(g))
    assert unused, "g is a permutation; pick another seed"
    mask_id = unused[0]
    heads = {}
    # "exact" knows g: every draft is accepted (the bonus path every step). "noisy" believes a
    # wrong g for every 7th token: accepts and rejects at every draft position. "blind" has one
    # attention head: a real entry drafts g of its token, but a mask slot sees only itself, so
    # P-EAGLE's drafts 2..K are junk unless refinement feeds the slots real tokens.
    noisy = [g[g[t]] if t % 7 == 1 else g[t] for t in range(vocab)]
    for name, table, num_heads in (("exact", g, 7), ("noisy", noisy, 7), ("blind", g, 1)):
        heads[name] = str(tmp_path_factory.mktemp(f"bigram-{name}"))
        save_eagle3(bigram_head(table, hf.config.hidden_size, mask_id, num_heads), heads[name], include_embedding=True)
    prompts = _prompts(8, vocab, seed=3, avoid=mask_id)
    reference = LLM(target, dtype="float32", block_size=4, skip_tokenizer_init=True).generate(
        prompts, GREEDY, use_tqdm=False)
    return {"target": target, "heads": heads, "prompts": prompts, "expected": _outputs(reference)}


def _check_engine(llm, outs, k: int) -> None:
    stats = llm.engine.stats
    assert stats.num_steps > 0 and 0 <= stats.num_accepted <= stats.num_drafted
    assert stats.num_drafted == k * stats.num_steps
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    assert all(o.spec_stats["num_drafts"] > 0 for o in outs)


# --- greedy losslessness ---------------------------------------------------------------------

@pytest.mark.parametrize("mode,batch,k", list(itertools.product(("seq", "par"), (1, 3, 8), (1, 3, 7))))
def test_greedy_eagle3_is_lossless(setup, mode, batch, k):
    llm = LLM(setup["target"], dtype="float32", block_size=4,
              speculative_config=eagle_spec(setup["heads"][mode], k, mode == "par"))
    assert llm.engine.proposer.aux_layers == ((2, 2, 2) if mode == "seq" else (0, 2, 4))
    outs = llm.generate(setup["prompts"][:batch], GREEDY, use_tqdm=False)
    assert _outputs(outs) == setup["expected"][:batch]
    _check_engine(llm, outs, k)


def test_parallel_head_drafts_sequentially_without_the_flag(setup):
    llm = LLM(setup["target"], dtype="float32", block_size=4,
              speculative_config=eagle_spec(setup["heads"]["par"], 3, parallel=False))
    outs = llm.generate(setup["prompts"][:3], GREEDY, use_tqdm=False)
    assert _outputs(outs) == setup["expected"][:3]
    _check_engine(llm, outs, 3)


@pytest.mark.parametrize("head,parallel,k", list(itertools.product(("noisy", "exact"), (False, True), (3, 7))))
def test_agreeing_head_is_lossless_and_accepted(bigram, head, parallel, k):
    llm = LLM(bigram["target"], dtype="float32", block_size=4, skip_tokenizer_init=True,
              speculative_config=eagle_spec(bigram["heads"][head], k, parallel))
    outs = llm.generate(bigram["prompts"], GREEDY, use_tqdm=False)
    assert _outputs(outs) == bigram["expected"]
    _check_engine(llm, outs, k)
    stats = llm.engine.stats
    rate = stats.num_accepted / stats.num_drafted
    if head == "exact":
        assert rate > 0.95
    else:
        assert 0.3 < rate < 0.95
    # Later drafts (P-EAGLE's mask slots, sequential passes 2..K) are accepted too, not only draft 1.
    assert stats.acceptance_rate_per_position[k - 1] > 0.2


# --- sampling ---------------------------------------------------------------------------------

def test_sampled_parallel_run_is_reproducible(setup):
    llm = LLM(setup["target"], dtype="float32", block_size=4,
              speculative_config=eagle_spec(setup["heads"]["par"], 3, True))
    proposals = []
    propose = llm.engine.proposer.propose

    def spy(seqs):
        proposal = propose(seqs)
        proposals.append(proposal)
        return proposal

    llm.engine.proposer.propose = spy
    prompts = setup["prompts"][:4]
    params = [SamplingParams(temperature=0.8, seed=10 + i, ignore_eos=True, max_tokens=MAX_TOKENS) for i in range(3)]
    params.append(GREEDY)  # a greedy row in a sampled batch stays the target's greedy output
    first = _outputs(llm.generate(prompts, params, use_tqdm=False))
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    assert not llm.engine.proposer._ready  # finished sequences' drafts (and their q) are not kept
    second = _outputs(llm.generate(prompts, params, use_tqdm=False))
    assert first == second
    assert all(len(o) == MAX_TOKENS for o in first)
    assert first[3] == setup["expected"][3]
    p = proposals[0]
    assert p.draft_probs is not None and p.draft_probs.shape == (4, 3, setup["hf"].config.vocab_size)
    torch.testing.assert_close(p.draft_probs.sum(-1), torch.ones(4, 3))
    assert (p.draft_probs.gather(-1, p.draft_tokens[..., None]) > 0).all()
    head = llm.engine.proposer.model
    assert not p.draft_probs[..., ~head.t2d].any()  # q lives on the draft vocabulary only
    assert p.drafter_passes == 1


def test_sampled_agreeing_head_accepts(bigram):
    llm = LLM(bigram["target"], dtype="float32", block_size=4, skip_tokenizer_init=True,
              speculative_config=eagle_spec(bigram["heads"]["noisy"], 3, True))
    params = SamplingParams(temperature=0.8, seed=1, ignore_eos=True, max_tokens=MAX_TOKENS)
    outs = llm.generate(bigram["prompts"][:4], params, use_tqdm=False)
    _check_engine(llm, outs, 3)
    assert llm.engine.stats.num_accepted > 0


# --- preemption -------------------------------------------------------------------------------

def test_parallel_under_preemption_is_lossless(setup):
    llm = LLM(setup["target"], dtype="float32", block_size=4, num_kv_blocks=24, max_model_len=48,
              speculative_config=eagle_spec(setup["heads"]["par"], 4, True))
    outs = llm.generate(setup["prompts"], GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert _outputs(outs) == setup["expected"]
    assert not llm.engine.proposer._ready
    assert llm.engine.blocks.num_free_blocks == 24


def test_agreeing_head_under_preemption(bigram):
    llm = LLM(bigram["target"], dtype="float32", block_size=4, num_kv_blocks=24, max_model_len=48,
              skip_tokenizer_init=True, speculative_config=eagle_spec(bigram["heads"]["noisy"], 3, True))
    outs = llm.generate(bigram["prompts"], GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert _outputs(outs) == bigram["expected"]
    assert llm.engine.stats.num_accepted / llm.engine.stats.num_drafted > 0.3


# --- P-EAGLE's single pass vs a dense reference ----------------------------------------------

def _record_history(prop) -> dict[int, dict[int, tuple[int, torch.Tensor]]]:
    """Every entry the drafter should have after each target step, worked out from the step's
    result independently of the proposer: sequence -> position -> (token, target feature)."""
    history: dict[int, dict[int, tuple[int, torch.Tensor]]] = {}
    after_verify = prop.after_verify

    def spy(seqs, step, prefill):
        history["seqs"] = seqs  # the batch the drafter is about to run (CPU: no padding rows)
        out, acc = step.output_tokens.tolist(), step.num_accepted.tolist()
        offset = 0
        for b, s in enumerate(seqs):
            if prefill:  # positions num_cached .. n-1, tokens t[c+1 ..] and the emitted one
                start, fed = s.num_cached, len(s) - s.num_cached
                tokens = s.token_ids[start + 1:] + [out[b][0]]
            else:  # positions n-1 .. n-1+a, the emitted tokens
                start, fed = len(s) - 1, len(out[b])
                tokens = out[b][:acc[b] + 1]
            for i, tok in enumerate(tokens):
                history.setdefault(s.seq_id, {})[start + i] = (tok, step.aux_hidden[offset + i].clone())
            offset += fed
        after_verify(seqs, step, prefill)

    prop.after_verify = spy
    return history


def _last_real(p, b: int, history: dict) -> int:
    """Position of the entry drafting starts from in a drafter pass: must be sequence b's
    newest accepted entry."""
    pos = int(p.positions[p.sample_rows[b, 0]])
    assert pos == max(history), (pos, max(history))
    return pos


def _dense(head, tokens: list[int], hidden: torch.Tensor):
    n = len(tokens)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    normed, prenorm = head(torch.tensor(tokens), torch.arange(n), hidden, mask)
    return head.compute_logits(normed[-1]), prenorm[-1]


needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="the Triton input kernel on CPU needs TRITON_INTERPRET=1")
INPUT_BUILDERS = ["reference", pytest.param("triton", marks=needs_interpreter)]


def _recording_engine(setup, monkeypatch, builder: str, k: int, parallel: bool, refine: int = 0):
    """An engine whose drafter's step inputs come from the torch reference (CPU default) or
    the Triton kernel (what CUDA runs), so the dense checks below cover both; returns it,
    its proposer, the head and the entry history."""
    if builder == "triton":
        import parspec.speculative.eagle as eagle3_module
        from parspec.speculative.draft_inputs import draft_inputs_triton
        monkeypatch.setattr(eagle3_module, "draft_inputs", draft_inputs_triton)
    llm = LLM(setup["target"], dtype="float32", block_size=4,
              speculative_config=eagle_spec(setup["heads"]["par" if parallel else "seq"], k, parallel, refine))
    prop = llm.engine.proposer
    return llm, prop, prop.model, _record_history(prop)


@pytest.mark.parametrize("builder", INPUT_BUILDERS)
def test_sequential_passes_match_dense_reference(setup, monkeypatch, builder):
    """Pass j's logits equal a dense causal run over the real entries followed by the earlier
    drafts, each with the previous pass's pre-norm output as its hidden state."""
    k = 3
    llm, prop, head, history = _recording_engine(setup, monkeypatch, builder, k, parallel=False)
    sequential, choose = prop._sequential, prop._choose
    checked = []

    def sequential_spy(p, rows, sampling, generators):
        logits = []
        seqs = history["seqs"]
        assert rows == len(seqs)

        def choose_spy(lg, sampling, generators):
            logits.append(lg[:, 0].clone())
            return choose(lg, sampling, generators)

        prop._choose = choose_spy
        drafts, probs = sequential(p, rows, sampling, generators)
        prop._choose = choose
        for b, s in enumerate(seqs):
            entries = [history[s.seq_id][pos] for pos in range(_last_real(p, b, history[s.seq_id]) + 1)]
            tokens = [t for t, _ in entries]
            hidden = head.project(torch.stack([f for _, f in entries]))
            for j in range(k):
                ref, prenorm = _dense(head, tokens, hidden)
                torch.testing.assert_close(logits[j][b], ref, atol=1e-5, rtol=0)
                tokens = tokens + [drafts[b, j].item()]
                hidden = torch.cat([hidden, prenorm[None]])
        checked.append(len(seqs))
        return drafts, probs

    prop._sequential = sequential_spy
    outs = llm.generate(setup["prompts"][:3], GREEDY, use_tqdm=False)
    assert _outputs(outs) == setup["expected"][:3]
    assert len(checked) >= 5 and max(checked) == 3


@pytest.mark.parametrize("builder", INPUT_BUILDERS)
def test_parallel_pass_matches_dense_reference(setup, monkeypatch, builder):
    k = 4
    llm, prop, head, history = _recording_engine(setup, monkeypatch, builder, k, parallel=True)
    parallel_logits = prop._parallel_logits
    checked = []

    def reference(seq_id: int, last_real: int, num_masks: int) -> torch.Tensor:
        """Just this draft's visible context: the real entries, then ``num_masks`` mask slots."""
        entries = [history[seq_id][p] for p in range(last_real + 1)]
        tokens = [t for t, _ in entries] + [head.config.mask_token_id] * num_masks
        feats = torch.stack([f for _, f in entries] + [head.mask_hidden[0]] * num_masks)
        return _dense(head, tokens, head.project(feats))[0]

    def logits_spy(p, rows):
        seqs = history["seqs"]
        assert rows == len(seqs)
        out = parallel_logits(p, rows)
        for b, s in enumerate(seqs):
            last_real = _last_real(p, b, history[s.seq_id])
            for j in range(k):  # draft j+1 sees the real entries and j mask slots
                torch.testing.assert_close(out[b, j], reference(s.seq_id, last_real, j), atol=1e-5, rtol=0)
        checked.append(len(seqs))
        return out

    prop._parallel_logits = logits_spy
    outs = llm.generate(setup["prompts"][:3], GREEDY, use_tqdm=False)
    assert _outputs(outs) == setup["expected"][:3]
    assert len(checked) >= 5 and max(checked) == 3  # several steps, the drafter cache carried between them


# --- refinement passes (draft_refine_passes) -------------------------------------------------

@pytest.mark.parametrize("refine,batch,k", list(itertools.product((1, 2), (1, 8), (3, 7))))
def test_refined_parallel_is_lossless(setup, refine, batch, k):
    llm = LLM(setup["target"], dtype="float32", block_size=4,
              speculative_config=eagle_spec(setup["heads"]["par"], k, True, refine))
    outs = llm.generate(setup["prompts"][:batch], GREEDY, use_tqdm=False)
    assert _outputs(outs) == setup["expected"][:batch]
    _check_engine(llm, outs, k)
    assert llm.engine.drafter_passes_per_step == 1 + refine


def test_refined_parallel_with_partial_chunks_is_lossless(setup):
    """Chunks that complete their context draft beside chunks that do not, in one pass layout."""
    k = 3
    llm = LLM(setup["target"], dtype="float32", block_size=4, max_num_seqs=2, max_num_batched_tokens=2 * (k + 1) + 4,
              speculative_config=eagle_spec(setup["heads"]["par"], k, True, refine=2))
    prop = llm.engine.proposer
    prefill_drafts, chunks = prop.prefill_drafts, []

    def spy(seqs, step, sampling, generators):
        chunks.append((step.num_seqs, len(seqs)))
        return prefill_drafts(seqs, step, sampling, generators)

    prop.prefill_drafts = spy
    outs = llm.generate(setup["prompts"], GREEDY, use_tqdm=False)
    assert _outputs(outs) == setup["expected"]
    assert any(0 < done < n for done, n in chunks)  # a drafting chunk beside a partial one
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks


def test_refined_parallel_under_preemption_is_lossless(setup):
    llm = LLM(setup["target"], dtype="float32", block_size=4, num_kv_blocks=24, max_model_len=48,
              speculative_config=eagle_spec(setup["heads"]["par"], 4, True, refine=1))
    outs = llm.generate(setup["prompts"], GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert _outputs(outs) == setup["expected"]
    assert not llm.engine.proposer._ready
    assert llm.engine.blocks.num_free_blocks == 24


@pytest.mark.parametrize("refine,k", list(itertools.product((1, 2), (3, 7))))
def test_refined_agreeing_head_is_fully_accepted(bigram, refine, k):
    llm = LLM(bigram["target"], dtype="float32", block_size=4, skip_tokenizer_init=True,
              speculative_config=eagle_spec(bigram["heads"]["exact"], k, True, refine))
    outs = llm.generate(bigram["prompts"], GREEDY, use_tqdm=False)
    assert _outputs(outs) == bigram["expected"]
    _check_engine(llm, outs, k)
    assert llm.engine.stats.acceptance_rate_per_position == [1.0] * k


@pytest.mark.parametrize("refine,k", list(itertools.product((0, 1, 2), (3, 7))))
def test_each_refinement_pass_fixes_one_more_draft(bigram, refine, k):
    """The blind head drafts g of a slot's token but junk from the mask token. Each pass feeds the
    slots the previous pass's drafts, so the right prefix grows by one a pass: drafts 1 .. refine+1
    are always accepted, the next mostly not."""
    llm = LLM(bigram["target"], dtype="float32", block_size=4, skip_tokenizer_init=True,
              speculative_config=eagle_spec(bigram["heads"]["blind"], k, True, refine))
    outs = llm.generate(bigram["prompts"], GREEDY, use_tqdm=False)
    assert _outputs(outs) == bigram["expected"]
    rates = llm.engine.stats.acceptance_rate_per_position
    assert rates[:refine + 1] == [1.0] * (refine + 1)
    if refine + 1 < k:
        assert rates[refine + 1] < 0.25, rates


@pytest.mark.parametrize("builder", INPUT_BUILDERS)
def test_refinement_passes_match_dense_reference(setup, monkeypatch, builder):
    """Every pass reuses the first pass's layout with each slot's token the previous pass's draft
    before it; its logits equal a dense causal run over the real entries and those slots (hidden
    fc(mask_hidden)); the drafts returned are the last pass's argmaxes."""
    k, refine = 4, 2
    llm, prop, head, history = _recording_engine(setup, monkeypatch, builder, k, parallel=True, refine=refine)
    parallel, parallel_logits = prop._parallel, prop._parallel_logits
    passes, checked = [], []

    def reference(seq_id: int, last_real: int, slot_tokens: list[int]) -> torch.Tensor:
        """Draft j+1 sees the real entries and the first j slots."""
        entries = [history[seq_id][p] for p in range(last_real + 1)]
        out = []
        for j in range(k):
            tokens = [t for t, _ in entries] + slot_tokens[:j]
            feats = torch.stack([f for _, f in entries] + [head.mask_hidden[0]] * j)
            out.append(_dense(head, tokens, head.project(feats))[0])
        return torch.stack(out)

    def logits_spy(p, rows):
        out = parallel_logits(p, rows)
        passes.append((p, out))
        return out

    def parallel_spy(p, rows, sampling, generators):
        passes.clear()
        drafts, probs = parallel(p, rows, sampling, generators)
        assert len(passes) == 1 + refine
        seqs = history["seqs"]
        slots = p.sample_rows[:, 1:]
        others = torch.ones_like(p.tokens, dtype=torch.bool)
        others[slots.flatten()] = False
        fed = torch.full_like(slots, head.config.mask_token_id)
        for q, logits in passes:
            assert q.positions is p.positions and q.hidden is p.hidden and q.meta is p.meta
            assert torch.equal(q.tokens[slots], fed) and torch.equal(q.tokens[others], p.tokens[others])
            for b, s in enumerate(seqs):
                ref = reference(s.seq_id, _last_real(p, b, history[s.seq_id]), fed[b].tolist())
                torch.testing.assert_close(logits[b], ref, atol=1e-5, rtol=0)
            fed = head.draft_to_target(logits.argmax(-1))[:, :-1]  # what the next pass's slots get
        assert torch.equal(drafts, head.draft_to_target(passes[-1][1].argmax(-1)))
        checked.append(len(seqs))
        return drafts, probs

    prop._parallel, prop._parallel_logits = parallel_spy, logits_spy
    outs = llm.generate(setup["prompts"][:3], GREEDY, use_tqdm=False)
    assert _outputs(outs) == setup["expected"][:3]
    assert len(checked) >= 5 and max(checked) == 3


def test_sampled_refined_run_is_reproducible(setup):
    """Sampled, each pass draws its drafts and the next pass's slots get those draws; the drafts
    and q returned are the last pass's (q: its distribution, over the target vocabulary)."""
    refine = 2
    llm = LLM(setup["target"], dtype="float32", block_size=4,
              speculative_config=eagle_spec(setup["heads"]["par"], 3, True, refine))
    prop = llm.engine.proposer
    head = prop.model
    propose, parallel, parallel_logits = prop.propose, prop._parallel, prop._parallel_logits
    proposals, passes, refined, drawn = [], [], [], []

    def propose_spy(seqs):
        proposals.append(propose(seqs))
        return proposals[-1]

    def logits_spy(p, rows):
        passes.append((p.tokens, parallel_logits(p, rows)))
        return passes[-1][1]

    def parallel_spy(p, rows, sampling, generators):
        passes.clear()
        drafts, q = parallel(p, rows, sampling, generators)
        if q is not None:
            qs = [head.scatter_to_target(probs_from_logits(logits, sampling)) for _, logits in passes]
            for (tokens, _), (_, prev), q_prev in zip(passes[1:], passes, qs):
                fed = tokens[p.sample_rows[:, 1:]]  # slot j: a draw of the previous pass's draft j
                assert (q_prev[:, :-1].gather(-1, fed[..., None]) > 0).all()
                drawn.append(not torch.equal(fed, head.draft_to_target(prev.argmax(-1))[:, :-1]))
            torch.testing.assert_close(q, qs[-1], atol=0, rtol=0)
            refined.append(not torch.equal(qs[0], qs[-1]))
        return drafts, q

    prop.propose, prop._parallel, prop._parallel_logits = propose_spy, parallel_spy, logits_spy
    prompts = setup["prompts"][:4]
    params = [SamplingParams(temperature=0.8, seed=10 + i, ignore_eos=True, max_tokens=MAX_TOKENS) for i in range(3)]
    params.append(GREEDY)
    first = _outputs(llm.generate(prompts, params, use_tqdm=False))
    second = _outputs(llm.generate(prompts, params, use_tqdm=False))
    assert first == second
    assert first[3] == setup["expected"][3]
    assert llm.engine.blocks.num_free_blocks == llm.engine.blocks.num_blocks
    assert len(refined) >= 5 and any(refined) and any(drawn)  # slots fed draws, not argmaxes, changed q
    sampled = [p for p in proposals if p.draft_probs is not None]  # the greedy row may end alone
    assert proposals[0].draft_probs is not None and len(sampled) >= 5
    for p in sampled:
        b = p.draft_tokens.shape[0]
        assert p.draft_probs.shape == (b, 3, setup["hf"].config.vocab_size)
        torch.testing.assert_close(p.draft_probs.sum(-1), torch.ones(b, 3))
        assert (p.draft_probs.gather(-1, p.draft_tokens[..., None]) > 0).all()
        assert not p.draft_probs[..., ~head.t2d].any()
        assert p.drafter_passes == 1 + refine


def test_refine_passes_config_errors_name_the_value():
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match=f"draft_refine_passes must be an integer >= 0, got {bad!r}"):
            SpeculativeConfig.from_any(eagle_spec("/head", 3, True, bad))
    with pytest.raises(ConfigError, match="draft_refine_passes=1 .* parallel_drafting=False"):
        SpeculativeConfig.from_any(eagle_spec("/head", 3, False, 1))
    assert SpeculativeConfig.from_any(eagle_spec("/head", 3, True, 2)).draft_refine_passes == 2


# --- checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize("include_embedding", [False, True])
def test_save_load_round_trip(setup, tmp_path, include_embedding):
    hf = setup["hf"]
    head = random_head(hf, seed=7, aux=(1, 3), parallel=True, layers=2)
    save_eagle3(head, str(tmp_path), include_embedding=include_embedding)
    loaded = load_eagle3(str(tmp_path), torch.float32, torch.device("cpu"),
                         target_embedding=hf.model.embed_tokens if not include_embedding else None)
    assert loaded.config == head.config
    tokens = torch.tensor([5, 17, 300, 2, 99, 383])
    feats = torch.randn(6, 2 * hf.config.hidden_size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    with torch.no_grad():
        a = head(tokens, torch.arange(6), head.project(feats), mask)
        b = loaded(tokens, torch.arange(6), loaded.project(feats), mask)
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(head.compute_logits(a[0]), loaded.compute_logits(b[0]), atol=0, rtol=0)
    assert torch.equal(loaded.d2t, head.d2t) and torch.equal(loaded.t2d, head.t2d)
    assert torch.equal(loaded.mask_hidden, head.mask_hidden)


def _draft_log(llm) -> list:
    log = []
    propose = llm.engine.proposer.propose

    def spy(seqs):
        proposal = propose(seqs)
        log.append(proposal.draft_tokens.tolist())
        return proposal

    llm.engine.proposer.propose = spy
    return log


def test_eagle_midlayer_naming_loads_and_drafts_the_same(bigram, tmp_path):
    src = bigram["heads"]["noisy"]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    renamed = {("midlayer." + n[len("layers.0."):] if n.startswith("layers.0.") else n): t for n, t in tensors.items()}
    assert any(n.startswith("midlayer.") for n in renamed) and not any(n.startswith("layers.") for n in renamed)
    save_file(renamed, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    logs, outputs = [], []
    for path in (src, str(tmp_path)):
        llm = LLM(bigram["target"], dtype="float32", block_size=4, skip_tokenizer_init=True,
                  speculative_config=eagle_spec(path, 3, True))
        logs.append(_draft_log(llm))
        outputs.append(_outputs(llm.generate(bigram["prompts"][:4], GREEDY, use_tqdm=False)))
    assert logs[0] == logs[1] and len(logs[0]) > 0
    assert outputs[0] == outputs[1] == bigram["expected"][:4]


# --- bad input --------------------------------------------------------------------------------

def _save(head, path, include_embedding=False) -> str:
    save_eagle3(head, str(path), include_embedding=include_embedding)
    return str(path)


def test_errors_name_the_bad_value(setup, model_factory, tmp_path):
    target, hf = setup["target"], setup["hf"]
    shallow, shallow_hf = model_factory("llama", seed=0)  # 3 layers

    def build(path, parallel=False, target_dir=target):
        return LLM(target_dir, dtype="float32", block_size=4, speculative_config=eagle_spec(path, 2, parallel))

    # default aux layers on a target too shallow for them
    path = _save(random_head(shallow_hf, seed=1), tmp_path / "shallow")
    with pytest.raises(ConfigError, match="num_hidden_layers=3"):
        build(path, target_dir=shallow)
    # aux layer outside the target
    path = _save(random_head(hf, seed=1, aux=(0, 2, 5)), tmp_path / "aux")
    with pytest.raises(ConfigError, match=r"\[0, 5\)"):
        build(path)
    # trained for a target of another width
    path = _save(random_head(hf, seed=1, target_hidden=32), tmp_path / "width")
    with pytest.raises(ConfigError, match="target_hidden_size=32"):
        build(path)
    # another vocabulary
    path = _save(random_head(hf, seed=1, vocab=512), tmp_path / "vocab", include_embedding=True)
    with pytest.raises(ConfigError, match="vocab_size=512"):
        build(path)
    # a narrower head that relies on the target's (wider) embedding
    path = _save(random_head(hf, seed=1, hidden=48), tmp_path / "emb")
    with pytest.raises(ConfigError, match="width 64"):
        build(path)
    # smaller draft vocabulary without d2t
    path = _save(random_head(hf, seed=1), tmp_path / "nod2t")
    weights = load_file(os.path.join(path, "model.safetensors"))
    del weights["d2t"]
    save_file(weights, os.path.join(path, "model.safetensors"))
    with pytest.raises(LoadError, match="d2t"):
        build(path)
    # parallel drafting with a head that has no mask_hidden / mask_token_id
    with pytest.raises(ConfigError, match="mask_hidden"):
        build(setup["heads"]["seq"], parallel=True)
    # a P-EAGLE config whose checkpoint lost mask_hidden
    path = _save(random_head(hf, seed=1, parallel=True), tmp_path / "nomask")
    weights = load_file(os.path.join(path, "model.safetensors"))
    del weights["mask_hidden"]
    save_file(weights, os.path.join(path, "model.safetensors"))
    with pytest.raises(LoadError, match="mask_hidden"):
        build(path, parallel=True)
    # no such directory
    with pytest.raises(LoadError, match="not found"):
        build(str(tmp_path / "missing"))
    with open(os.path.join(setup["heads"]["seq"], "config.json")) as f:
        assert "eagle_config" not in json.load(f)  # the sequential head really uses the default layers
