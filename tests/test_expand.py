"""The timing pair's expansion keeps the reference pair's function: the expanded target's
logits (parspec and HF transformers) and aux features equal the original's, the expanded
drafters give the same speculative outputs and acceptance, and shapes that cannot hold
the function are refused by name."""

from __future__ import annotations

import json
import os

import pytest
import torch

from parspec import LLM, SamplingParams
from parspec.bench.expand import ExpansionError, expand_eagle_head, expand_llama, expand_reference_pair
from parspec.loader import load_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(REPO, "fixtures", "reference")
PROMPTS = ["def fibonacci(n):\n",
           "import os\n\n\ndef list_files(path):\n    \"\"\"Return the files under path.\"\"\"\n"]
ENGINE = dict(dtype="float32", device="cpu", max_model_len=256, max_num_seqs=4)
MAX_TOKENS = 16


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops: with several threads each one waits on a barrier, which on a busy 2-core
    machine made this module 4x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("expanded"))
    out = expand_reference_pair(FIX, root, scale="tiny", dtype="float32", device="cpu", progress=False)
    # spd-4 is skipped: the tiny preset's 7 layers split into 4 stages differently from the 5.
    assert sorted(out) == ["draft", "eagle3", "p-eagle", "spd-2", "target"]
    return root


def _config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def _weight_names(path: str) -> set[str]:
    from safetensors import safe_open

    names = set()
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as s:
                names |= set(s.keys())
    return names


def test_tiny_preset_configs(tiny):
    target = _config(os.path.join(tiny, "target"))
    assert (target["hidden_size"], target["num_hidden_layers"], target["num_attention_heads"],
            target["num_key_value_heads"], target["head_dim"]) == (1024, 7, 8, 2, 128)
    assert target["rms_norm_eps"] == pytest.approx(1e-5 * 512 / 1024)
    meta = target["parspec_expanded_from"]
    assert meta["layer_map"] == [0, 1, 2, 4, 5]
    assert "vocabulary stays the fixture's (6144)" in meta["note"]
    assert "lm_head.weight" not in _weight_names(os.path.join(tiny, "target"))  # still tied
    assert os.path.isfile(os.path.join(tiny, "target", "tokenizer.json"))
    for head, layers in (("eagle3", 1), ("p-eagle", 3)):
        cfg = _config(os.path.join(tiny, head))
        assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 5]  # [1, 2, 4] mapped
        assert (cfg["hidden_size"], cfg["target_hidden_size"], cfg["num_hidden_layers"]) == (1024, 1024, layers)
    assert _config(os.path.join(tiny, "draft"))["parspec_expanded_from"]["layer_map"] == [0, 1]
    with open(os.path.join(tiny, "README.md")) as f:
        assert "vocabulary stays the fixture's (6144)" in f.read()


def _parspec_forward(path: str, tokens: list[int], aux_layers=()):
    """Logits and aux features over a whole prompt (dense causal attention, no cache)."""
    model, _ = load_model(path, torch.float32, torch.device("cpu"))
    n = len(tokens)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        hidden, aux = model(torch.tensor(tokens), torch.arange(n), mask, aux_layers=tuple(aux_layers))
        return model.compute_logits(hidden), aux


def _hf_logits(path: str, tokens: list[int]) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def _assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    err = (actual - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item(), f"max error {err} vs scale {expected.abs().max().item()}"


@pytest.mark.parametrize("name", ["target", "draft"])
def test_expanded_lm_logits_and_features_equal_original(tiny, name):
    src, dst = os.path.join(FIX, name), os.path.join(tiny, name)
    meta = _config(dst)["parspec_expanded_from"]
    old_hidden, layer_map = meta["source_shape"]["hidden_size"], meta["layer_map"]
    tokens = torch.randint(7, 6144, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    logits, aux = _parspec_forward(src, tokens, range(len(layer_map)))
    new_logits, new_aux = _parspec_forward(dst, tokens, layer_map)
    _assert_close_rel(new_logits, logits)
    assert torch.equal(new_logits.argmax(-1), logits.argmax(-1))
    for old, new in zip(aux, new_aux):  # the input of new layer layer_map[i] is old layer i's input
        _assert_close_rel(new[:, :old_hidden], old)
        assert torch.count_nonzero(new[:, old_hidden:]) == 0
    if name == "target":
        hf_new = _hf_logits(dst, tokens)
        _assert_close_rel(hf_new, _hf_logits(src, tokens))
        _assert_close_rel(hf_new, logits)


def test_expanded_spd_module_drafts_like_the_original(tiny):
    """The expanded SPD module on the expanded target's stage features gives the original's
    logits on the original's features (so the same drafts and acceptance)."""
    from parspec.spd.features import depth_features
    from parspec.spd.module import SPDModule

    with open(os.path.join(tiny, "expansion.json")) as f:
        assert "spd-4" in json.load(f)["skipped"]
    tokens = torch.randint(7, 6144, (1, 29), generator=torch.Generator().manual_seed(2))
    logits = []
    for root in (FIX, tiny):
        target, _ = load_model(os.path.join(root, "target"), torch.float32, torch.device("cpu"))
        module = SPDModule.from_pretrained(os.path.join(root, "spd-2"), target.model.embed_tokens, target.model.norm,
                                           target.lm_head, dtype=torch.float32)
        feats, _ = depth_features(target, tokens, module.config.stage_bounds)
        depths = torch.tensor([[2, 1, 0]] * 27)  # steady-state windows
        pos = torch.arange(27)[:, None] + torch.arange(3)
        window = feats[0, pos, (depths - 1).clamp(min=0)]
        with torch.no_grad():
            logits.append(module(tokens[0, pos], depths, window))
    _assert_close_rel(logits[1], logits[0])
    assert torch.equal(logits[1].argmax(-1), logits[0].argmax(-1))


@pytest.mark.parametrize("family", ["llama", "llama31"])
def test_expansion_keeps_gqa_groups_untied_head_and_shards(model_factory, tmp_path, family):
    """Random models with 2 KV heads (query heads must stay with theirs) or 1 and llama3 rope
    scaling, untied and tied, written in several shards."""
    src, _ = model_factory(family)
    dst = str(tmp_path / "expanded")
    layer_map = expand_llama(src, dst, hidden=192, num_layers=7, num_heads=12, num_kv_heads=3, intermediate=160,
                             dtype="float32", seed=1, device="cpu", max_shard_bytes=200_000, progress=False)
    assert layer_map == [0, 2, 4]
    assert os.path.isfile(os.path.join(dst, "model.safetensors.index.json"))
    tokens = torch.randint(0, 384, (19,), generator=torch.Generator().manual_seed(1)).tolist()
    logits, _ = _parspec_forward(src, tokens)
    _assert_close_rel(_parspec_forward(dst, tokens)[0], logits)
    _assert_close_rel(_hf_logits(dst, tokens), logits)


SPECS = {
    "p-eagle": lambda root: {"method": "eagle3", "model": os.path.join(root, "p-eagle"), "num_speculative_tokens": 3,
                             "parallel_drafting": True},
    "eagle3": lambda root: {"method": "eagle3", "model": os.path.join(root, "eagle3"), "num_speculative_tokens": 3},
    "draft_model": lambda root: {"method": "draft_model", "model": os.path.join(root, "draft"),
                                 "num_speculative_tokens": 3},
}


def _generate(root: str, spec) -> list[tuple[list[int], dict]]:
    llm = LLM(os.path.join(root, "target"), speculative_config=spec, **ENGINE)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.spec_stats) for o in outs]


@pytest.fixture(scope="module")
def no_spec_ids() -> list[list[int]]:
    """Greedy continuations of the original target, recomputed from scratch at every token
    (no engine, no cache): the reference every speculative run must reproduce."""
    from parspec.tokenizer import Tokenizer

    path = os.path.join(FIX, "target")
    tokenizer = Tokenizer(path)
    model, cfg = load_model(path, torch.float32, torch.device("cpu"))
    out = []
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        new = []
        with torch.no_grad():
            for _ in range(MAX_TOKENS):
                n = len(ids) + len(new)
                hidden, _ = model(torch.tensor(ids + new), torch.arange(n), torch.ones(n, n, dtype=torch.bool).tril())
                new.append(int(model.compute_logits(hidden[-1:]).argmax()))
                if new[-1] in cfg.eos_token_id:
                    break
        out.append(new)
    return out


@pytest.mark.parametrize("method", list(SPECS))
def test_expanded_drafters_speculate_like_the_originals(tiny, no_spec_ids, method):
    original = _generate(FIX, SPECS[method](FIX))
    expanded = _generate(tiny, SPECS[method](tiny))
    assert [ids for ids, _ in original] == no_spec_ids
    assert [ids for ids, _ in expanded] == no_spec_ids
    assert [stats for _, stats in expanded] == [stats for _, stats in original]  # same acceptance, draft by draft
    assert sum(s["num_accepted_tokens"] for _, s in original) > 0


TARGET_OK = dict(hidden=1024, num_layers=7, num_heads=8, num_kv_heads=2, intermediate=1024)


@pytest.mark.parametrize("change,message", [
    (dict(hidden=256, num_heads=2, num_kv_heads=1), "hidden_size=256 is smaller than the source's 512"),
    (dict(num_layers=3), "num_layers=3 is smaller"),
    (dict(intermediate=512), "intermediate_size=512 is smaller"),
    (dict(head_dim=64), "head_dim=64 but the source's head_dim is 128"),
    (dict(hidden=1000), "head_dim=125"),
    (dict(num_heads=10, num_kv_heads=4, hidden=1280), "num_heads=10 is not a multiple of num_kv_heads=4"),
    (dict(num_heads=8, num_kv_heads=4), "groups of 2 query heads, fewer than the source's 4"),
])
def test_refuses_shapes_that_cannot_hold_the_function(tmp_path, change, message):
    dst = tmp_path / "out"
    with pytest.raises(ExpansionError, match=message):
        expand_llama(os.path.join(FIX, "target"), str(dst), **{**TARGET_OK, **change}, dtype="float32",
                     device="cpu", progress=False)
    assert not dst.exists()  # refused before anything is written


def test_refuses_head_that_cannot_share_the_target_embedding(tmp_path):
    with pytest.raises(ExpansionError, match="hidden=768 must equal that"):
        expand_eagle_head(os.path.join(FIX, "eagle3"), str(tmp_path / "h"), 1024, 512, [0, 1, 3, 4, 6], hidden=768,
                          num_heads=6, num_kv_heads=1, intermediate=768, device="cpu", progress=False)
    with pytest.raises(ExpansionError, match="target_hidden_old=256"):
        expand_eagle_head(os.path.join(FIX, "eagle3"), str(tmp_path / "h"), 1024, 256, [0, 1, 3, 4, 6], hidden=1024,
                          num_heads=8, num_kv_heads=2, intermediate=768, device="cpu", progress=False)
    with pytest.raises(ExpansionError, match=r"aux layer ids \[1, 2, 4\] include \[4\]"):
        expand_eagle_head(os.path.join(FIX, "eagle3"), str(tmp_path / "h"), 1024, 512, [0, 1, 3, 4], hidden=1024,
                          num_heads=8, num_kv_heads=2, intermediate=768, device="cpu", progress=False)


def test_refuses_other_architectures(model_factory, tmp_path):
    src, _ = model_factory("qwen2")
    with pytest.raises(ExpansionError, match="Qwen2ForCausalLM"):
        expand_llama(src, str(tmp_path / "q"), 128, 4, 8, 4, 128, device="cpu", progress=False)
