"""Drafter training (parspec/train): layout and mask, sequence-partition exactness,
learning, checkpoints, draft vocabulary, bad input and the CLI end to end. CPU, float32,
tiny random models."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from parspec.config import ConfigError
from parspec.loader import LoadError, load_model
from parspec.models.drafter import Eagle3Drafter, load_eagle3
from parspec.train.data import DrafterData, build_draft_vocab, capture, pick_mask_token
from parspec.train.trainer import TrainConfig, Trainer, drafter_config, head_bytes
from parspec.train.layout import (PAD, Entries, attention_mask, deep_entries, depth_keep_fractions, make_plan,
                                  real_entries)
from parspec.train.objective import peagle_forward, ttt_forward

LENGTHS = (21, 17, 12)  # unequal, so padding and per-sequence anchor ranges are exercised


@pytest.fixture(scope="module")
def tiny(model_factory):
    path, _ = model_factory("llama", num_hidden_layers=5)
    target, cfg = load_model(path, torch.float32, torch.device("cpu"))
    target.requires_grad_(False)
    return path, target.eval(), cfg


def synthetic_data(vocab: int, lengths=LENGTHS, copies: int = 2, seed: int = 0) -> DrafterData:
    g = torch.Generator().manual_seed(seed)
    seqs, prompt_lens, greedy = [], [], []
    for c in range(copies):
        for i, n in enumerate(lengths):
            seqs.append(torch.randint(1, vocab, (n,), generator=g))
            prompt_lens.append(4 + i)
            greedy.append((i + c) % 2 == 0)
    return DrafterData(seqs, prompt_lens, greedy, {"corpus": "synthetic"})


def make_trainer(tiny, method: str, tmp_path, data: DrafterData | None = None, **overrides) -> Trainer:
    path, target, cfg = tiny
    kw = dict(method=method, num_speculative_tokens=4, draft_vocab_size=200, device="cpu",
              batch_size=len(LENGTHS), heldout=0, segment_len=0, mask_token_id=1, save_dtype="float32",
              steps=10, eval_every=0, checkpoint_every=0, lr=3e-3)
    kw.update(overrides)
    data = data or synthetic_data(cfg.vocab_size, copies=1)
    return Trainer(target, cfg, data, TrainConfig(**kw), str(tmp_path), eos_ids=(0,), target_dir=path)


def grads_for(trainer: Trainer, bounds, step=0) -> tuple[float, dict]:
    trainer.optimizer.zero_grad(set_to_none=True)
    idx = list(range(len(LENGTHS)))
    loss, _, _ = trainer.batch_loss(idx, step, bounds=bounds)
    return loss, {n: p.grad.clone() for n, p in trainer.drafter.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["p-eagle", "eagle3", "p-eagle-greedy-only", "p-eagle-chain", "p-eagle-refine"])
def test_sequence_partition_gives_whole_sequence_gradients(tiny, tmp_path, method):
    greedy_only = method == "p-eagle-greedy-only"
    chain_weight = 0.7 if method == "p-eagle-chain" else 0.0
    refine_share = 0.5 if method == "p-eagle-refine" else 0.0
    method = method.removesuffix("-greedy-only").removesuffix("-chain").removesuffix("-refine")
    trainer = make_trainer(tiny, method, tmp_path, deep_greedy_only=greedy_only, chain_weight=chain_weight,
                           refine_share=refine_share)
    A = max(LENGTHS) - 1
    loss_full, full = grads_for(trainer, [(0, A)])
    loss_seg, seg = grads_for(trainer, [(0, 3), (3, 11), (11, A)])  # unequal segments
    assert loss_full > 0
    assert loss_seg == pytest.approx(loss_full, rel=1e-5)
    assert full.keys() == seg.keys() and "fc.weight" in full
    if method == "p-eagle":
        assert "mask_hidden" in full
    for name in full:
        torch.testing.assert_close(seg[name], full[name], rtol=1e-5, atol=1e-5, msg=name)


def _plan(trainer: Trainer, step: int | None):
    idx = list(range(len(LENGTHS)))
    batch, cap = trainer._capture(idx)
    keep, gen = (trainer.keep, torch.Generator().manual_seed(step)) if step is not None else (None, None)
    return batch, cap, make_plan(batch, cap, trainer.tc.num_speculative_tokens, 0.8, keep, gen)


def test_peagle_mask_matches_brute_force(tiny, tmp_path):
    trainer = make_trainer(tiny, "p-eagle", tmp_path, num_speculative_tokens=5)
    batch, cap, plan = _plan(trainer, step=3)
    K = 5
    fractions = depth_keep_fractions(K, 0.7, 0.2)
    assert fractions == pytest.approx([1, 0.7, 0.49, 0.343, 0.2401])
    a, e = 4, 13
    ent = Entries.cat([real_entries(batch, plan, a, e), deep_entries(plan, a, e, token_id=1)])
    mask = ent.mask()
    for b, n in enumerate(LENGTHS):
        # The entries the plan asks for, built independently of the layout code.
        wanted = {(p, 0) for p in range(e)}
        wanted |= {(p, d) for d in range(1, K) for p in range(a, e)
                   if p + 1 + d <= n - 1 and bool(plan.present[b, d, p])}
        rows = [(int(ent.anchor[b, i]), int(ent.depth[b, i])) for i in range(len(ent))]
        real_rows = [r for r in rows if r[1] != PAD]
        assert len(real_rows) == len(set(real_rows)) and set(real_rows) == wanted
        for i, (p, d) in enumerate(rows):
            for j, (q, c) in enumerate(rows):
                if d == PAD or c == PAD:
                    expected = i == j and d == PAD
                else:
                    visible = (c == 0 and q <= p) or (q == p and 1 <= c <= d)
                    expected = visible
                assert bool(mask[b, i, j]) == expected, (b, (p, d), (q, c))
            if d != PAD:
                assert int(ent.pos[b, i]) == p + d and int(ent.label[b, i]) == p + 1 + d
    # The rectangular form TTT uses (queries = the last keys) is the square mask's last rows.
    last = slice(len(ent) - 7, None)
    assert torch.equal(attention_mask(ent.anchor[:, last], ent.depth[:, last], ent.anchor, ent.depth),
                       mask[:, last])
    # Nested subsets: an anchor kept at depth d is kept at every shallower depth.
    pres = plan.present
    assert bool((pres[:, 2:] <= pres[:, 1:-1]).all())


def _causal(n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def _inference_view_logits(drafter, batch, cap, b: int, p: int, slot_tokens: torch.Tensor) -> torch.Tensor:
    """Inference's view of anchor p's deepest slot: real entries 0..p, then slots 1..d holding
    ``slot_tokens`` with fc(mask_hidden), plain causal attention; its logits."""
    d = len(slot_tokens)
    tokens = torch.cat([batch.tokens[b, 1:p + 2], slot_tokens])
    hidden = torch.cat([drafter.project(cap.features[b, :p + 1]), drafter.project(drafter.mask_hidden).expand(d, -1)])
    out, _ = drafter(tokens[None], torch.arange(p + 1 + d)[None], hidden[None], _causal(p + 1 + d)[None])
    return drafter.compute_logits(out[0, -1])


@torch.no_grad()
def test_peagle_dense_logits_equal_entry_by_entry(tiny, tmp_path):
    trainer = make_trainer(tiny, "p-eagle", tmp_path)
    drafter = trainer.drafter.eval()
    torch.nn.init.normal_(drafter.mask_hidden, std=1.0)
    batch, cap, plan = _plan(trainer, step=1)
    a, e = 2, 15
    normed, ent = peagle_forward(drafter, batch, cap, plan, a, e, mask_token_id=1)
    dense = drafter.compute_logits(normed)
    checked = set()
    for b, i in ent.scored.nonzero().tolist():
        p, d = int(ent.anchor[b, i]), int(ent.depth[b, i])
        torch.testing.assert_close(_inference_view_logits(drafter, batch, cap, b, p, torch.full((d,), 1)),
                                   dense[b, i], rtol=1e-4, atol=1e-4)
        checked.add(d)
    assert checked == set(range(trainer.tc.num_speculative_tokens))


@torch.no_grad()
@pytest.mark.parametrize("slots", ["teacher-forced", "drafts"])
def test_refined_slots_read_their_tokens_as_inference_does(tiny, tmp_path, slots):
    """--refine-share: a refined anchor's depth-d entry reads a token in place of the mask:
    x[p+1+d] in training, or (evaluation of a refinement pass) the previous pass's draft of
    depth d-1. Its logits equal the inference view: real entries 0..p, then slots 1..d holding
    those tokens with fc(mask_hidden), plain causal attention. Unrefined anchors keep the mask."""
    trainer = make_trainer(tiny, "p-eagle", tmp_path, refine_share=0.5)
    drafter = trainer.drafter.eval()
    torch.nn.init.normal_(drafter.mask_hidden, std=1.0)
    batch, cap = trainer._capture(list(range(len(LENGTHS))))
    K, A = trainer.tc.num_speculative_tokens, max(LENGTHS) - 1
    slot_tokens = None
    if slots == "drafts":  # what evaluate() feeds a refinement pass: the mask pass's drafts, one depth down
        _, stats, _ = trainer.batch_loss(list(range(len(LENGTHS))), None, backward=False, chain=True,
                                         captured=(batch, cap))
        slot_tokens = torch.cat([torch.zeros_like(stats.draft[:, :1]), stats.draft[:, :-1]], dim=1)
    plan = make_plan(batch, cap, K, 0.8, trainer.keep, torch.Generator().manual_seed(5), refine_share=0.5,
                     slot_tokens=slot_tokens)
    assert 0 < int(plan.refine.sum()) < plan.refine.numel()  # both kinds of anchor are exercised
    a, e = 2, A
    normed, ent = peagle_forward(drafter, batch, cap, plan, a, e, mask_token_id=1)
    dense = drafter.compute_logits(normed)
    seen = set()
    for b, i in ent.scored.nonzero().tolist():
        p, d = int(ent.anchor[b, i]), int(ent.depth[b, i])
        if d == 0:
            continue
        refined = bool(plan.refine[b, p])
        if not refined:
            fed = torch.full((d,), 1)
        elif slots == "drafts":
            fed = stats.draft[b, :d, p]
        else:
            fed = batch.tokens[b, p + 2:p + 2 + d]
        assert torch.equal(ent.token[b, i], fed[-1])
        torch.testing.assert_close(_inference_view_logits(drafter, batch, cap, b, p, fed), dense[b, i],
                                   rtol=1e-4, atol=1e-4)
        seen.add(refined)
    assert seen == {True, False}


def test_refine_share_trains_and_is_evaluated_after_each_pass(tiny, tmp_path):
    """Evaluation of a head trained with --refine-share scores the mask pass, 1 and 2
    refinement passes and teacher forcing on the same anchors; the option is a P-EAGLE one in [0, 1]."""
    data = synthetic_data(384, copies=4)
    trainer = make_trainer(tiny, "p-eagle", tmp_path, data, heldout=3, eval_batch_size=2, refine_share=0.5)
    first = trainer.train_step()["loss"]
    for _ in range(8):
        last = trainer.train_step()["loss"]
    assert last < first
    ev = trainer.evaluate()
    K = trainer.tc.num_speculative_tokens
    assert list(ev["refine"]) == ["refine 1", "refine 2", "teacher-forced"]
    for r in ev["refine"].values():
        assert len(r["acc"]) == K and r["count"] == ev["count"]
        # Depth 0 reads no slot token: the same in every mode.
        assert r["acc"][0] == pytest.approx(ev["acc"][0])
        assert r["acceptance_length"] is None or 1 <= r["acceptance_length"] <= K + 1
    plain = make_trainer(tiny, "p-eagle", tmp_path / "plain", data, heldout=3, eval_batch_size=2)
    assert "refine" not in plain.evaluate()
    with pytest.raises(ConfigError, match="refine_share trains P-EAGLE's refinement passes"):
        TrainConfig(method="eagle3", refine_share=0.5)
    with pytest.raises(ConfigError, match="refine_share must be in \\[0, 1\\], got -0.1"):
        TrainConfig(method="p-eagle", refine_share=-0.1)


@torch.no_grad()
def test_ttt_steps_equal_sequential_drafting(tiny, tmp_path):
    trainer = make_trainer(tiny, "eagle3", tmp_path)
    drafter = trainer.drafter.eval()
    batch, cap, plan = _plan(trainer, step=None)
    a, e = 3, 12
    steps = list(ttt_forward(drafter, batch, cap, plan, a, e))
    assert len(steps) == trainer.tc.num_speculative_tokens
    for b in range(len(LENGTHS)):
        for p in range(a, min(e, LENGTHS[b] - 1)):
            # Sequential EAGLE-3 drafting with the true tokens as the drafts.
            tokens = batch.tokens[b, 1:p + 2].tolist()
            hidden = [h for h in drafter.project(cap.features[b, :p + 1])]
            for i, (normed, ent) in enumerate(steps):
                if p + 1 + i > LENGTHS[b] - 1:
                    break
                n = len(tokens)
                # real entries at positions 0..p, step j at p + j: positions are just 0..n-1
                out, pre = drafter(torch.tensor(tokens)[None], torch.arange(n)[None], torch.stack(hidden)[None],
                                   _causal(n)[None])
                slot = p if i == 0 else p - a
                assert bool(ent.scored[b, slot]) and int(ent.anchor[b, slot]) == p
                torch.testing.assert_close(drafter.compute_logits(out[0, -1]),
                                           drafter.compute_logits(normed[b, slot]), rtol=1e-4, atol=1e-4)
                tokens.append(int(batch.tokens[b, p + 2 + i]) if p + 2 + i < LENGTHS[b] else 0)
                hidden.append(pre[0, -1])


def test_training_reduces_loss_and_head_reloads(tiny, tmp_path):
    trainer = make_trainer(tiny, "p-eagle", tmp_path, steps=25, lr=5e-3)
    idx = list(range(len(LENGTHS)))
    before, _, _ = trainer.batch_loss(idx, None, backward=False)
    for _ in range(25):
        trainer.train_step()
    after, _, _ = trainer.batch_loss(idx, None, backward=False)
    assert after < 0.7 * before, (before, after)

    out = trainer.save_head(str(tmp_path / "head"))
    _, target, _ = tiny
    loaded = load_eagle3(out, torch.float32, "cpu", target_embedding=target.model.embed_tokens,
                         max_positions=trainer.drafter.layers[0].self_attn.rope.cos.shape[0])
    assert loaded.config.parallel_drafting and loaded.config.mask_token_id == 1
    assert torch.equal(loaded.d2t, trainer.drafter.d2t) and torch.equal(loaded.t2d, trainer.drafter.t2d)
    trainer.drafter.eval()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 384, (2, 9), generator=g)
    feats = torch.randn(2, 9, loaded.fc.in_features, generator=g)
    mask = _causal(9)[None].expand(2, 9, 9)
    with torch.no_grad():
        ref = trainer.drafter(tokens, torch.arange(9).expand(2, 9), trainer.drafter.project(feats), mask)
        got = loaded(tokens, torch.arange(9).expand(2, 9), loaded.project(feats), mask)
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])
        assert torch.equal(loaded.mask_hidden, trainer.drafter.mask_hidden)


@pytest.mark.parametrize("method", ["p-eagle", "eagle3"])
def test_resume_continues_exactly(tiny, tmp_path, method):
    data = synthetic_data(384, copies=3)
    kw = dict(batch_size=2, steps=6, heldout=1)
    straight = make_trainer(tiny, method, tmp_path / "a", data, **kw)
    for _ in range(6):
        straight.train_step()

    first = make_trainer(tiny, method, tmp_path / "b", data, **kw)
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    resumed = make_trainer(tiny, method, tmp_path / "b", data, **kw, seed=0)
    assert resumed.load_checkpoint() and resumed.step == 3
    for _ in range(3):
        resumed.train_step()
    for (name, p), (_, q) in zip(straight.drafter.named_parameters(), resumed.drafter.named_parameters()):
        assert torch.equal(p, q), name
    assert [r["loss"] for r in resumed.metrics["train"]] == [r["loss"] for r in straight.metrics["train"]]

    other = make_trainer(tiny, method, tmp_path / "b", data, **{**kw, "lr": 1e-2})
    with pytest.raises(ConfigError, match="lr"):
        other.load_checkpoint()
    other = make_trainer(tiny, method, tmp_path / "b", synthetic_data(384, copies=3, seed=1), **kw)
    with pytest.raises(ConfigError, match="digest"):
        other.load_checkpoint()


def test_evaluate_reports_depths_and_acceptance(tiny, tmp_path):
    data = synthetic_data(384, copies=4)
    trainer = make_trainer(tiny, "p-eagle", tmp_path, data, heldout=3, eval_batch_size=2)
    ev = trainer.evaluate()
    K = trainer.tc.num_speculative_tokens
    assert len(ev["acc"]) == K and len(ev["kl"]) == K and all(0 <= a <= 1 for a in ev["acc"])
    assert ev["acceptance_length"] is None or 1 <= ev["acceptance_length"] <= K + 1


def test_draft_vocabulary():
    counts = torch.zeros(50, dtype=torch.int64)
    counts[[7, 3, 40, 12, 5]] = torch.tensor([100, 90, 80, 80, 1])
    v = build_draft_vocab(counts, 5, always=(0,))
    assert v.ids.tolist() == [0, 3, 7, 12, 40]  # eos forced; 40 and 12 tie, both in; ascending
    assert torch.equal(v.ids, torch.arange(5) + v.d2t)
    assert int(v.t2d.sum()) == 5 and bool(v.t2d[v.ids].all())
    cfg_dict = dict(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=8, vocab_size=50, draft_vocab_size=5, target_hidden_size=16, aux_layer_ids=(0, 1, 2))
    from parspec.models.drafter import Eagle3Config

    drafter = Eagle3Drafter(Eagle3Config(**cfg_dict))
    drafter.d2t.copy_(v.d2t)
    drafter.t2d.copy_(v.t2d)
    assert bool(drafter.t2d[drafter.draft_to_target(torch.arange(5))].all())
    # Fewer seen tokens than the size: unseen ids fill in by id.
    assert build_draft_vocab(counts, 8).ids.tolist() == [0, 1, 2, 3, 5, 7, 12, 40]
    with pytest.raises(ConfigError, match="draft vocabulary size"):
        build_draft_vocab(counts, 51)


def test_capture_and_mask_token(tiny):
    path, target, cfg = tiny
    data = synthetic_data(cfg.vocab_size, copies=1)
    counts = data.token_counts(cfg.vocab_size)
    vocab = build_draft_vocab(counts, 100, always=(0,))
    batch = data.batch([0, 1, 2], "cpu")
    cap = capture(target, batch, (1, 2, 4), vocab)
    assert cap.features.shape == (3, 21, 3 * cfg.hidden_size)
    # Right padding changes nothing: sequence 2 alone gives the same features and labels.
    alone = capture(target, data.batch([2], "cpu"), (1, 2, 4), vocab)
    torch.testing.assert_close(cap.features[2, :12], alone.features[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cap.probs[2, :12], alone.probs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cap.probs.sum(-1), torch.ones(3, 21))
    assert not cap.label_ok[2, 12:].any()
    # The tiny tokenizer's specials: <|endoftext|> (eos) 0, <|im_start|> 1, <|im_end|> 2.
    assert pick_mask_token(path, counts, exclude=(0,)) == 1


def test_data_cache_roundtrip(tmp_path):
    data = synthetic_data(384)
    data.save(str(tmp_path / "d.safetensors"))
    back = DrafterData.load(str(tmp_path / "d.safetensors"))
    assert len(back) == len(data) and all(torch.equal(a, b) for a, b in zip(back.sequences, data.sequences))
    assert back.prompt_lens == data.prompt_lens and back.greedy == data.greedy and back.meta == data.meta


def test_head_size_default_fits_reference_budget():
    from parspec.config import ModelConfig

    ref = ModelConfig(architecture="LlamaForCausalLM", vocab_size=6144, hidden_size=512, intermediate_size=768,
                      num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=1, head_dim=128,
                      max_position_embeddings=2048)
    for method in ("eagle3", "p-eagle"):
        cfg = drafter_config(ref, TrainConfig(method=method), mask_token_id=6)
        assert cfg.aux_layer_ids == (1, 2, 4) and cfg.intermediate_size == 768
        size = head_bytes(cfg)
        # fc 1536x512 + qkv 1024x768 + o 512x512 + MLP 3x512x768 + lm_head 2048x512 (bf16) + d2t + t2d
        expected = 2 * (1536 * 512 + 1024 * 768 + 512 * 512 + 3 * 512 * 768 + 2048 * 512 + 4 * 512) \
            + 2048 * 8 + 6144 + (2 * 1536 if method == "p-eagle" else 0)
        assert size == expected and size <= 8 << 20


# --- bad input and the CLI -----------------------------------------------------------------------

def _cli(args, capsys):
    from parspec.cli import main

    rc = main(["train-drafter", *args])
    return rc, capsys.readouterr()


def test_bad_input_gives_clear_errors(tiny, tmp_path, capsys):
    path, _, _ = tiny
    base = ["--out", str(tmp_path / "o"), "--device", "cpu", "--corpus", str(tmp_path)]
    rc, out = _cli(["--target", str(tmp_path / "missing"), *base], capsys)
    assert rc == 2 and "model directory not found" in out.err
    rc, out = _cli(["--target", path, "-k", "0", *base], capsys)
    assert rc == 2 and "num_speculative_tokens must be an integer >= 1" in out.err
    rc, out = _cli(["--target", path, "--draft-vocab-size", "100000", *base], capsys)
    assert rc == 2 and "exceeds the target's vocabulary" in out.err
    rc, out = _cli(["--target", path, "--draft-vocab-size", "300", "--max-bytes", "1000", *base], capsys)
    assert rc == 2 and "over the" in out.err and "budget" in out.err
    bench = tmp_path / "humaneval.jsonl"
    bench.write_text('{"prompt": "def f():"}\n')
    rc, out = _cli(["--target", path, "--draft-vocab-size", "300", *base[:-1], str(bench)], capsys)
    assert rc == 2 and "acceptance benchmark" in out.err
    with pytest.raises(ConfigError, match="method"):
        TrainConfig(method="medusa")
    with pytest.raises(LoadError):
        from parspec.train.trainer import load_target
        load_target(str(tmp_path / "missing"), TrainConfig(device="cpu"))


def test_cli_resume_picks_up_the_checkpoint(tiny, tmp_path, capsys):
    path, _, _ = tiny
    data_path = str(tmp_path / "data.safetensors")
    synthetic_data(384, copies=3).save(data_path)
    out = str(tmp_path / "head")
    args = ["--target", path, "--out", out, "-k", "3", "--draft-vocab-size", "160", "--data", data_path,
            "--steps", "4", "--batch-size", "3", "--heldout", "1", "--eval-every", "0", "--checkpoint-every", "2",
            "--device", "cpu", "--save-dtype", "float32", "--keep-checkpoint"]
    rc, text = _cli(args, capsys)
    assert rc == 0, text.err
    first = open(os.path.join(out, "model.safetensors"), "rb").read()
    state = json.load(open(os.path.join(out, "checkpoint", "trainer_state.json")))
    assert state["step"] == 4
    rc, text = _cli(args + ["--resume"], capsys)
    assert rc == 0, text.err
    assert "resumed from" in text.out and "at step 4" in text.out
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == first
    rc, text = _cli([a if a != "4" else "5" for a in args] + ["--resume"], capsys)
    assert rc == 2 and "cannot resume" in text.err and "steps" in text.err


SOURCE = '''import os


def walk(root):
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            yield os.path.join(dirpath, name)


class Counter:
    def __init__(self):
        self.count = 0

    def add(self, n=1):
        self.count += n
        return self.count
'''


def test_train_drafter_cli_end_to_end(tiny, tmp_path, capsys):
    path, _, _ = tiny
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"m{i}.py").write_text(SOURCE * (i + 1))
    data_path = str(tmp_path / "cache" / "data.safetensors")
    common = ["--target", path, "-k", "3", "--draft-vocab-size", "160", "--num-prompts", "10",
              "--min-prompt-tokens", "8", "--max-prompt-tokens", "20", "--max-new-tokens", "12",
              "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--heldout", "2",
              "--segment-len", "8", "--device", "cpu", "--save-dtype", "float32", "--data", data_path,
              "--corpus", str(corpus), "--gen-max-num-seqs", "10"]
    heads = {}
    for method in ("p-eagle", "eagle3"):
        out = str(tmp_path / method)
        rc, text = _cli([*common, "--method", method, "--out", out], capsys)
        assert rc == 0, text.err
        for name in ("config.json", "model.safetensors", "metrics.json", "README.md"):
            assert os.path.isfile(os.path.join(out, name)), name
        assert not os.path.exists(os.path.join(out, "checkpoint"))
        metrics = json.load(open(os.path.join(out, "metrics.json")))
        assert metrics["steps_done"] == 4 and len(metrics["final_eval"]["acc"]) == 3
        card = open(os.path.join(out, "README.md")).read()
        assert "parspec train-drafter" in card and "--segment-len 8" in card
        assert "--module-hidden-size" not in card and "--num-stages" not in card  # SPD's options only
        heads[method] = out
    assert "from " + data_path in text.out  # the second run read the first one's data
    cfg = json.load(open(os.path.join(heads["p-eagle"], "config.json")))
    assert cfg["parallel_drafting"] is True and cfg["mask_token_id"] == 1
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 4]
    # A further round warm-starts from the head (here with a chain weight); its card says both.
    onward = str(tmp_path / "p-eagle-2")
    rc, text = _cli([*common, "--method", "p-eagle", "--init-from", heads["p-eagle"], "--chain-weight", "0.25",
                     "--out", onward], capsys)
    assert rc == 0, text.err
    card = open(os.path.join(onward, "README.md")).read()
    assert f"Warm-started from `{heads['p-eagle']}`" in card and "kept from the warm start" in card
    assert "loss is scaled by 0.75 + 0.25 x the head's own probability" in card
    first_card = open(os.path.join(heads["p-eagle"], "README.md")).read()
    assert "Warm-started" not in first_card and "(`--chain-weight`)" not in first_card
    assert "parallel_drafting" not in json.load(open(os.path.join(heads["eagle3"], "config.json")))

    if importlib.util.find_spec("parspec.speculative.eagle") is None:
        pytest.skip("parspec/speculative/eagle.py (the inference proposer) is not there yet")
    from parspec import LLM, SamplingParams

    for method, parallel in (("p-eagle", True), ("eagle3", False)):
        llm = LLM(path, dtype="float32", device="cpu", max_model_len=128,
                  speculative_config={"method": "eagle3", "model": heads[method], "num_speculative_tokens": 3,
                                      "parallel_drafting": parallel})
        ref = LLM(path, dtype="float32", device="cpu", max_model_len=128)
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
        prompt = {"prompt_token_ids": [5, 9, 17, 33]}
        got = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        want = ref.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
        assert got == want


def test_head_shape_options_and_warm_start(tiny, tmp_path):
    """The head's layers may be narrower than the target's; a run can warm-start from a saved
    head of the same shape (identical weights before its first step), and refuses another shape."""
    shape = dict(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=16)
    first = make_trainer(tiny, "p-eagle", tmp_path / "a", steps=3, **shape)
    attn = first.drafter.layers[1].self_attn
    assert (first.cfg.num_attention_heads, first.cfg.num_key_value_heads, first.cfg.head_dim) == (2, 1, 8)
    assert attn.o_proj.weight.shape == (first.cfg.hidden_size, 16)
    for _ in range(3):
        first.train_step()
    saved = first.save_head(str(tmp_path / "head"))
    warm = make_trainer(tiny, "p-eagle", tmp_path / "b", init_from=saved, seed=5, **shape)
    for name, p in first.drafter.named_parameters():
        if not name.startswith("embed_tokens."):
            assert torch.equal(p, dict(warm.drafter.named_parameters())[name]), name
    # New data picks another draft vocabulary and mask token; the warm start keeps the head's.
    path, target, cfg = tiny
    other = synthetic_data(cfg.vocab_size, copies=1, seed=9)
    assert not torch.equal(build_draft_vocab(other.token_counts(cfg.vocab_size), 200, always=(0,)).ids,
                           first.vocab.ids)
    onward = make_trainer(tiny, "p-eagle", tmp_path / "d", data=other, init_from=saved, mask_token_id=None, **shape)
    assert torch.equal(onward.vocab.ids, first.vocab.ids) and torch.equal(onward.drafter.d2t, first.drafter.d2t)
    assert onward.cfg.mask_token_id == 1
    assert torch.equal(onward.drafter.fc.weight, first.drafter.fc.weight)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        make_trainer(tiny, "p-eagle", tmp_path / "c", init_from=saved, **{**shape, "num_layers": 1})
    with pytest.raises(ConfigError, match="multiple of num_kv_heads"):
        TrainConfig(num_heads=3, num_kv_heads=2)


def test_peagle_warm_starts_from_an_eagle3_head_of_its_shape(tiny, tmp_path):
    """Issue 17's warm start: a P-EAGLE head of the EAGLE-3 head's shape begins with every one
    of its weights but the mask slot's hidden state, and trains on from there."""
    shape = dict(num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=16)
    seq = make_trainer(tiny, "eagle3", tmp_path / "a", steps=3, mask_token_id=None, **shape)
    for _ in range(3):
        seq.train_step()
    saved = seq.save_head(str(tmp_path / "eagle3"))
    par = make_trainer(tiny, "p-eagle", tmp_path / "b", init_from=saved, seed=5, **shape)
    assert par.cfg.parallel_drafting and par.cfg.mask_token_id == 1
    theirs = dict(seq.drafter.named_parameters())
    shared = [n for n, _ in par.drafter.named_parameters() if n in theirs and not n.startswith("embed_tokens.")]
    assert "fc.weight" in shared and any(n.startswith("layers.0.") for n in shared)
    for name in shared:
        assert torch.equal(dict(par.drafter.named_parameters())[name], theirs[name]), name
    assert "mask_hidden" not in theirs and par.drafter.mask_hidden.abs().sum() > 0
    assert math.isfinite(par.train_step()["loss"])
    with pytest.raises(ConfigError, match="num_attention_heads"):  # other differences still refused
        make_trainer(tiny, "p-eagle", tmp_path / "c", init_from=saved, **{**shape, "num_heads": 4})


def test_deep_greedy_only_trains_mask_slots_only_over_greedy_output(tiny, tmp_path):
    """--deep-greedy-only: depth 0 everywhere; depth d >= 1 of anchor p only in a greedy
    response with p >= prompt length - 2 (the skipped tokens x[p+2..] are the target's greedy
    output); elsewhere the plan is the plain one. Evaluation (step None) keeps every entry."""
    K = 4
    trainer = make_trainer(tiny, "p-eagle", tmp_path, num_speculative_tokens=K, deep_greedy_only=True)
    batch, cap = trainer._capture(list(range(len(LENGTHS))))
    plain = make_plan(batch, cap, K, 0.8)
    clean = make_plan(batch, cap, K, 0.8, greedy_only=True)
    assert torch.equal(clean.present[:, 0], plain.present[:, 0])
    for b, n in enumerate(LENGTHS):
        greedy, prompt = bool(batch.greedy[b]), int(batch.prompt_lens[b])
        for d in range(1, K):
            for p in range(n - 1):
                want = bool(plain.present[b, d, p]) and greedy and p >= prompt - 2
                assert bool(clean.present[b, d, p]) == want, (b, d, p)
    assert bool(batch.greedy.any()) and not bool(batch.greedy.all())  # both kinds are exercised
    assert clean.present[:, 1:].sum() < plain.present[:, 1:].sum()
    # Depth weights are renormalised over the entries kept: each depth's weights sum to decay^d.
    for d in range(K):
        assert float(clean.weight[:, d].sum()) == pytest.approx(0.8 ** d, rel=1e-5)
    with pytest.raises(ConfigError, match="deep_greedy_only is a P-EAGLE option"):
        TrainConfig(method="eagle3", deep_greedy_only=True)


def test_chain_multiplier_is_the_probability_of_the_shallower_slots_being_right():
    """Entry (anchor p, depth d) is scaled by 1 - w + w * prod_{j<d} q_j, q_j the drafter's
    probability of the target's top token at depth j of the same anchor; a depth that is not
    scored (or whose top token is outside the draft vocabulary) counts as wrong."""
    from parspec.train.data import Captured
    from parspec.train.objective import chain_multiplier

    V, T = 5, 6
    probs = torch.zeros(1, T, V)
    top = torch.tensor([0, 1, 2, 3, 4, 0])  # target's top token at each label position
    probs[0, torch.arange(T), top] = 1.0
    label_ok = torch.tensor([[True, True, True, True, False, True]])
    cap = Captured(features=torch.zeros(1, T, 1), probs=probs, entropy=torch.zeros(1, T), label_ok=label_ok,
                   top1=top[None])
    # Anchor 0: depths 0, 1, 2 (labels 1, 2, 3). Anchor 2: depths 0, 2 (labels 3, 5), depth 1
    # (label 4, outside the draft vocabulary) left out. Anchor 3: depths 0, 1 (labels 4, 5).
    anchor = torch.tensor([0, 0, 0, 2, 2, 3, 3])
    depth = torch.tensor([0, 1, 2, 0, 2, 0, 1])
    label = anchor + 1 + depth
    b = torch.zeros_like(anchor)
    logits = torch.randn(len(anchor), V, generator=torch.Generator().manual_seed(0))
    q = logits.softmax(-1)[torch.arange(len(anchor)), top[label]] * label_ok[0, label]
    for w in (0.0, 0.6, 1.0):
        m = chain_multiplier(logits, cap, b, label, anchor, depth, (1, 3, T), w)
        prefix = torch.stack([torch.tensor(1.0), q[0], q[0] * q[1], torch.tensor(1.0), torch.tensor(0.0),
                              torch.tensor(1.0), q[5]])
        torch.testing.assert_close(m, 1 - w + w * prefix)
    assert float(q[5]) == 0.0  # anchor 3's depth 0 predicts label 4: outside the draft vocabulary


def test_chain_weight_trains_and_is_a_peagle_option(tiny, tmp_path):
    """With --chain-weight the loss of the deep slots shrinks by the chain probability (the
    evaluation loss, step None, is the plain one), training still learns, and the option is
    refused for EAGLE-3 or outside [0, 1]."""
    plain = make_trainer(tiny, "p-eagle", tmp_path / "a")
    chained = make_trainer(tiny, "p-eagle", tmp_path / "b", chain_weight=1.0)
    idx = list(range(len(LENGTHS)))
    with torch.no_grad():
        loss_plain, _, _ = plain.batch_loss(idx, 0, backward=False)
        loss_chain, _, _ = chained.batch_loss(idx, 0, backward=False)
        loss_eval, _, _ = chained.batch_loss(idx, None, backward=False)
        loss_eval_plain, _, _ = plain.batch_loss(idx, None, backward=False)
    assert 0 < loss_chain < loss_plain
    assert loss_eval == pytest.approx(loss_eval_plain, rel=1e-6)
    first = chained.train_step()["loss"]
    for _ in range(8):
        last = chained.train_step()["loss"]
    assert last < first
    with pytest.raises(ConfigError, match="chain_weight is a P-EAGLE option"):
        TrainConfig(method="eagle3", chain_weight=0.5)
    with pytest.raises(ConfigError, match="chain_weight must be in \\[0, 1\\], got 1.5"):
        TrainConfig(method="p-eagle", chain_weight=1.5)


def _saved_head(tiny, tmp_path, **shape) -> tuple[Trainer, str]:
    """A P-EAGLE head of ``shape`` trained two steps and saved: a warm start's source."""
    first = make_trainer(tiny, "p-eagle", tmp_path / "a", **shape)
    for _ in range(2):
        first.train_step()
    return first, first.save_head(str(tmp_path / "head"))


def _assert_drafts_as_saved(tiny, tmp_path, saved: str, grown: Trainer, **shape) -> None:
    """The grown head's logits equal those of the saved head (loaded at its own shape)."""
    before = make_trainer(tiny, "p-eagle", tmp_path / "c", init_from=saved, **shape)
    with torch.no_grad():
        batch, cap, plan = _plan(before, step=1)
        outs = [d.compute_logits(peagle_forward(d, batch, cap, plan, 0, max(LENGTHS) - 1, mask_token_id=1)[0])
                for d in (before.drafter.eval(), grown.drafter.eval())]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    grown.drafter.train()
    grown.train_step()


def test_peagle_head_grows_deeper_and_drafts_as_before(tiny, tmp_path):
    """A warm start may add layers on top of a saved head: their output projections start at
    zero, so the grown head's logits equal the saved head's until training moves them."""
    shape = dict(num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=16)
    _, saved = _saved_head(tiny, tmp_path, num_layers=2, **shape)
    grown = make_trainer(tiny, "p-eagle", tmp_path / "b", num_layers=4, init_from=saved, seed=5, **shape)
    assert grown.cfg.num_hidden_layers == 4
    for layer in grown.drafter.layers[2:]:
        assert not layer.self_attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
        assert layer.self_attn.qkv_proj.weight.any()  # the rest of a new layer starts random
    _assert_drafts_as_saved(tiny, tmp_path, saved, grown, num_layers=2, **shape)
    assert grown.drafter.layers[3].self_attn.o_proj.weight.any()  # training moved the new layer
    with pytest.raises(ConfigError, match="may grow deeper, not shallower"):
        make_trainer(tiny, "p-eagle", tmp_path / "d", num_layers=1, init_from=saved, **shape)


def test_peagle_head_grows_wider_mlps_and_drafts_as_before(tiny, tmp_path):
    """A warm start may widen the MLPs of a saved head: its units are kept, the new units'
    down_proj columns start at zero, so the logits equal the saved head's until training."""
    shape = dict(num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
    first, saved = _saved_head(tiny, tmp_path, intermediate_size=16, **shape)
    wide = make_trainer(tiny, "p-eagle", tmp_path / "b", intermediate_size=24, init_from=saved, seed=5, **shape)
    for old, new in zip(first.drafter.layers, wide.drafter.layers):
        assert new.mlp.down_proj.weight.shape[1] == 24
        torch.testing.assert_close(new.mlp.down_proj.weight[:, :16], old.mlp.down_proj.weight)
        assert not new.mlp.down_proj.weight[:, 16:].any()
        torch.testing.assert_close(new.mlp.gate_up_proj.weight[:16], old.mlp.gate_up_proj.weight[:16])  # gate
        torch.testing.assert_close(new.mlp.gate_up_proj.weight[24:40], old.mlp.gate_up_proj.weight[16:])  # up
        assert new.mlp.gate_up_proj.weight[16:24].any()  # the new gate units start random
    _assert_drafts_as_saved(tiny, tmp_path, saved, wide, intermediate_size=16, **shape)
    assert wide.drafter.layers[1].mlp.down_proj.weight[:, 16:].any()  # training moved the new units
    with pytest.raises(ConfigError, match="may grow wider, not narrower"):
        make_trainer(tiny, "p-eagle", tmp_path / "d", intermediate_size=8, init_from=saved, **shape)


def test_vocabulary_from_responses_and_rebuilt_on_a_warm_start(tiny, tmp_path):
    """--draft-vocab-from responses counts only the target's responses (the tokens decoding asks
    the drafter for). --rebuild-vocab re-picks a warm start's vocabulary, size included: a token
    the head had keeps its output row exactly; a new token's row is the target's row mapped by the
    least-squares map from the target's rows to the head's, so a head whose rows are exactly a
    linear map of the target's gets that map's rows for its new tokens too. Nothing else moves."""
    path, target, cfg = tiny
    data = synthetic_data(cfg.vocab_size, copies=1)
    responses = sum(torch.bincount(s[n:], minlength=cfg.vocab_size) for s, n in zip(data.sequences, data.prompt_lens))
    assert torch.equal(data.token_counts(cfg.vocab_size, responses_only=True), responses)
    assert not torch.equal(responses, data.token_counts(cfg.vocab_size))
    fresh = make_trainer(tiny, "p-eagle", tmp_path / "r", data=data, draft_vocab_size=40, vocab_from="responses")
    assert torch.equal(fresh.vocab.ids, build_draft_vocab(responses, 40, always=(0,)).ids)

    first, saved = _saved_head(tiny, tmp_path, draft_vocab_size=120)
    mapping = torch.randn(target.lm_head.weight.shape[1], first.cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    head = load_eagle3(saved, torch.float32, "cpu", target_embedding=target.model.embed_tokens)
    with torch.no_grad():
        head.lm_head.weight.copy_(target.lm_head.weight[first.vocab.ids] @ mapping)
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(saved, "model.safetensors"))
    tensors["lm_head.weight"] = head.lm_head.weight.detach().clone()
    save_file(tensors, os.path.join(saved, "model.safetensors"))

    other = synthetic_data(cfg.vocab_size, copies=1, seed=9)
    re = make_trainer(tiny, "p-eagle", tmp_path / "b", data=other, init_from=saved, draft_vocab_size=160,
                      rebuild_vocab=True, vocab_from="responses")
    want = build_draft_vocab(other.token_counts(cfg.vocab_size, responses_only=True), 160, always=(0,))
    assert torch.equal(re.vocab.ids, want.ids) and torch.equal(re.drafter.d2t, want.d2t)
    assert re.cfg.draft_vocab_size == 160 and re.drafter.lm_head.weight.shape[0] == 160
    old = first.vocab.ids.tolist()
    kept = [i for i, t in enumerate(want.ids.tolist()) if t in old]
    new = [i for i, t in enumerate(want.ids.tolist()) if t not in old]
    assert kept and new
    rows = re.drafter.lm_head.weight.detach()
    assert torch.equal(rows[kept], head.lm_head.weight[[old.index(int(want.ids[i])) for i in kept]])
    torch.testing.assert_close(rows[new], target.lm_head.weight[want.ids[new]] @ mapping, rtol=0.05, atol=0.05)
    assert torch.equal(re.drafter.fc.weight, first.drafter.fc.weight)
    assert torch.equal(re.drafter.mask_hidden, first.drafter.mask_hidden)
    re.train_step()
    back = load_eagle3(re.save_head(str(tmp_path / "rebuilt")), torch.float32, "cpu",
                       target_embedding=target.model.embed_tokens)
    assert back.config.draft_vocab_size == 160 and torch.equal(back.d2t, want.d2t)
    # Without --rebuild-vocab another size is refused; --rebuild-vocab needs a warm start.
    with pytest.raises(ConfigError, match="draft_vocab_size"):
        make_trainer(tiny, "p-eagle", tmp_path / "c", data=other, init_from=saved, draft_vocab_size=160)
    with pytest.raises(ConfigError, match="rebuild_vocab re-picks a warm start"):
        TrainConfig(rebuild_vocab=True)
    with pytest.raises(ConfigError, match="vocab_from must be one of sequences, responses, got 'prompts'"):
        TrainConfig(vocab_from="prompts")


FUNCTION_SOURCE = '''import os
from typing import List


def undocumented(x):
    return x + 1


class Box:
    def scaled(self, factor: float) -> "Box":
        """Return a copy scaled by factor."""
        return Box()


@staticmethod
def mean(numbers: List[float]) -> float:
    """Mean of numbers.

    >>> mean([1.0, 3.0])
    2.0
    """
    return sum(numbers) / len(numbers)


def only_doc():
    """Nothing to write after this."""
'''


def test_function_prompts_are_headers_of_documented_functions(tmp_path):
    """--function-prompts: a documented function's header (the file's imports, its def line(s)
    and docstring, dedented) whose body is left for the target to write; none from a file without
    one (or that does not parse); a share of the files, the rest windows as before."""
    import random

    from parspec.tokenizer import Tokenizer
    from parspec.train.data import corpus_prompts, function_prompt

    imports = "import os\nfrom typing import List\n\n\n"
    want = {imports + 'def scaled(self, factor: float) -> "Box":\n    """Return a copy scaled by factor."""\n',
            imports + 'def mean(numbers: List[float]) -> float:\n    """Mean of numbers.\n\n    >>> mean([1.0, 3.0])\n'
                      '    2.0\n    """\n'}
    seen = {function_prompt(FUNCTION_SOURCE, random.Random(seed)) for seed in range(20)}
    assert seen == want  # never the undocumented one, nor one whose docstring is its whole body
    assert function_prompt("def f(:\n", random.Random(0)) is None
    assert function_prompt("def f(x):\n    return x\n", random.Random(0)) is None

    root = tmp_path / "src"
    root.mkdir()
    for i in range(6):
        (root / f"m{i}.py").write_text(FUNCTION_SOURCE.replace("mean", f"mean{i}"))
        (root / f"plain{i}.py").write_text("".join(f"value_{i}_{j} = {j} * {i}\n" for j in range(60)))
    tok = Tokenizer(os.path.join(os.path.dirname(__file__), "..", "fixtures", "reference", "target"))
    texts = [tok.decode(p) for p in corpus_prompts(str(root), tok, 12, 8, 200, seed=3, function_share=1.0)]
    headers = [t for t in texts if t.startswith(imports)]
    assert len(headers) == 6  # one from each m*.py file, the 12 files taken once each
    assert all(t.rstrip().endswith('"""') and "return" not in t for t in headers)
    assert all(t.startswith("value_") for t in texts if t not in headers)  # plain files: windows
    sources = [f.read_text() for f in sorted(root.iterdir())]
    windows = [tok.decode(p) for p in corpus_prompts(str(root), tok, 12, 8, 200, seed=3)]
    assert windows == [tok.decode(p) for p in corpus_prompts(str(root), tok, 12, 8, 200, seed=3, function_share=0.0)]
    assert all(any(w in src for src in sources) for w in windows)  # slices of the files, as before
    assert not any(h in src for h in headers for src in sources)  # headers are not: imports + def joined
    with pytest.raises(ConfigError, match="function prompt share must be in \\[0, 1\\], got 1.5"):
        corpus_prompts(str(root), tok, 4, 8, 200, seed=3, function_share=1.5)
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "def f():"}\n')
    with pytest.raises(ConfigError, match="function prompts come from .py files"):
        corpus_prompts(str(jsonl), tok, 4, 1, 200, seed=3, function_share=0.5)


def test_function_prompt_reads_lines_as_the_parser_counts_them():
    """The header and imports are cut from lines split where the parser splits them (a form
    feed ends a line for str.splitlines, not for the parser), and each import is the text
    ast.get_source_segment gives, multi-byte characters and ';' included."""
    import ast
    import random

    from parspec.train.data import _SOURCE_LINE, _segment, function_prompt

    source = ("import os; import sys\nfrom é_pkg import (a,\n    b)\n\x0c\n"
              "def f(x):\r\n    \"\"\"Doc, é.\"\"\"\r\n    return x\rdef g():\n    pass\n")
    lines = _SOURCE_LINE.findall(source)
    assert "".join(lines) == source
    nodes = [n for n in ast.walk(ast.parse(source)) if getattr(n, "end_lineno", None) is not None]
    assert len(nodes) > 10
    assert [_segment(lines, n) for n in nodes] == [ast.get_source_segment(source, n) for n in nodes]
    assert function_prompt(source, random.Random(0)) == (
        "import os\nimport sys\nfrom é_pkg import (a,\n    b)\n\n\ndef f(x):\r\n    \"\"\"Doc, é.\"\"\"\r\n")
