"""Other engines on the same prompts (token ids), model directories, dtype and device, batch 1:

- HF transformers ``generate()``: greedy; assisted generation with the draft LM
  (``assistant_model=``, a constant K drafts per step); prompt lookup
  (``prompt_lookup_num_tokens=K``).
- gpt-fast (pytorch-labs/gpt-fast, a source checkout given by directory): its Transformer
  built from our target's config.json and HF weights converted in memory, its decode step
  compiled as its own ``main()`` does (``torch.compile(mode="reduce-overhead",
  fullgraph=True)``), plain and with its ``speculative_decode`` and the draft LM.

Each peer is timed over the prompts one after another after a warm-up on the first prompt
(compilation and graph capture stay out). A peer that fails or cannot take the model is
recorded as an error string; it never stops the run."""

from __future__ import annotations

import gc
import importlib.util
import os
import sys
import time
import types
import warnings

import torch

from parspec.bench.report import error_text
from parspec.config import ModelConfig, parse_dtype


class PeerUnsupported(RuntimeError):
    """The peer cannot run this model (a shape or feature it does not have)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _timed(run_one, prompt_ids: list[list[int]], device: torch.device, after_warmup=None) -> dict:
    """Warm-up on the first prompt, then every prompt once, one after another."""
    t0 = time.perf_counter()
    run_one(prompt_ids[0])
    _sync(device)
    warmup = time.perf_counter() - t0
    if after_warmup is not None:
        after_warmup()
    _sync(device)
    start = time.perf_counter()
    outputs = [run_one(ids) for ids in prompt_ids]
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "warmup_s": warmup,
            "num_prompts": len(prompt_ids), "batch_size": 1, "outputs": outputs}


# --- HF transformers ---------------------------------------------------------------------
def hf_generate(target_dir: str, prompt_ids: list[list[int]], max_tokens: int, dtype: str, device,
                assistant_dir: str | None = None, assistant_k: int | None = None,
                prompt_lookup_k: int | None = None) -> dict:
    """HF greedy generate() at batch 1; eos is not a stop (as the engine's ignore_eos)."""
    import transformers

    device = torch.device(device)
    tdtype = parse_dtype(dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(target_dir, dtype=tdtype).to(device).eval()
    kwargs = dict(max_new_tokens=max_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    result = {"k": None}
    if assistant_dir is not None:
        draft = transformers.AutoModelForCausalLM.from_pretrained(assistant_dir, dtype=tdtype).to(device).eval()
        if assistant_k is not None:  # a constant K drafts per step, no confidence cut-off; else HF's defaults
            draft.generation_config.num_assistant_tokens = assistant_k
            draft.generation_config.num_assistant_tokens_schedule = "constant"
            draft.generation_config.assistant_confidence_threshold = 0.0
        kwargs["assistant_model"] = draft
        result["k"] = assistant_k
    if prompt_lookup_k is not None:
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_k
        result["k"] = prompt_lookup_k

    def run_one(ids: list[int]) -> list[int]:
        x = torch.tensor([ids], device=device)
        with torch.inference_mode():
            return model.generate(x, attention_mask=torch.ones_like(x), **kwargs)[0, len(ids):].tolist()

    try:
        result.update(_timed(run_one, prompt_ids, device))
    finally:
        del model, kwargs
        _free(device)
    result["transformers"] = transformers.__version__
    return result


# --- gpt-fast ----------------------------------------------------------------------------
def _exec_module(name: str, path: str, aliases: tuple[str, ...] = ()) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    for n in (name, *aliases):
        sys.modules[n] = module
    spec.loader.exec_module(module)
    return module


def load_gpt_fast(src_dir: str) -> tuple[types.ModuleType, types.ModuleType]:
    """gpt-fast's model.py and generate.py, imported from a checkout under private names
    (``parspec_peer_gpt_fast_*``: torch.compile re-imports a function's module by name, so
    those stay registered). Its files import each other by the bare names ``model`` and
    ``tokenizer``; those are bound only while loading, then restored. Its tokenizer.py needs
    sentencepiece and tiktoken; prompts arrive as token ids, so a stand-in serves without them."""
    paths = {n: os.path.join(src_dir, f"{n}.py") for n in ("model", "generate", "tokenizer")}
    missing = [p for n, p in paths.items() if n != "tokenizer" and not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"not a gpt-fast checkout: {', '.join(missing)} missing")
    prefix = "parspec_peer_gpt_fast_"
    saved_modules = {n: sys.modules.get(n) for n in paths}
    saved_path = list(sys.path)
    try:
        model_mod = _exec_module(prefix + "model", paths["model"], aliases=("model",))
        try:
            _exec_module(prefix + "tokenizer", paths["tokenizer"], aliases=("tokenizer",))
        except (ImportError, FileNotFoundError) as e:
            stand_in = types.ModuleType(prefix + "tokenizer")

            def get_tokenizer(*_args, _why=str(e), **_kw):
                raise PeerUnsupported(f"gpt-fast's tokenizer is unavailable here ({_why}); feed token ids")

            stand_in.get_tokenizer = get_tokenizer
            sys.modules["tokenizer"] = sys.modules[prefix + "tokenizer"] = stand_in
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen_mod = _exec_module(prefix + "generate", paths["generate"])
    finally:
        for n, m in saved_modules.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
        sys.path[:] = saved_path
    return model_mod, gen_mod


def gpt_fast_model_args(model_mod: types.ModuleType, cfg: ModelConfig):
    """gpt-fast's ModelArgs for an HF config, or PeerUnsupported naming what does not fit."""
    problems = []
    if cfg.architecture not in ("LlamaForCausalLM", "MistralForCausalLM"):
        problems.append(f"architecture {cfg.architecture} (gpt-fast's model.py is Llama-shaped)")
    if cfg.attention_bias:
        problems.append("q/k/v biases (its Attention has none)")
    if cfg.qk_norm:
        problems.append("q/k RMSNorm (its Attention has none)")
    if cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size:
        problems.append(f"num_attention_heads x head_dim = {cfg.num_attention_heads} x {cfg.head_dim} != "
                        f"hidden_size {cfg.hidden_size} (it derives head_dim = dim // n_head, wo is dim x dim)")
    if cfg.sliding_window:
        problems.append(f"sliding_window={cfg.sliding_window} (it has full attention only)")
    rope_scaling = None
    if cfg.rope_scaling is not None:
        kind = cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type"))
        if kind == "llama3":
            rope_scaling = {k: cfg.rope_scaling[k] for k in
                            ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        else:
            problems.append(f"rope_scaling type {kind!r} (it knows llama3 only)")
    if problems:
        raise PeerUnsupported("gpt-fast cannot run this model: " + "; ".join(problems))
    return model_mod.ModelArgs(
        block_size=cfg.max_position_embeddings, vocab_size=cfg.vocab_size, n_layer=cfg.num_hidden_layers,
        n_head=cfg.num_attention_heads, dim=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        n_local_heads=cfg.num_key_value_heads, rope_base=cfg.rope_theta, norm_eps=cfg.rms_norm_eps,
        rope_scaling=rope_scaling)


def _rope_pairs_adjacent(w: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """HF rotates the two halves of each head (x_j with x_{j+d/2}); gpt-fast rotates adjacent
    pairs (x_2j with x_2j+1). Reorder each head's output rows so row 2j is old row j and
    row 2j+1 old row j + d/2: the same rotation, in gpt-fast's layout."""
    rows = w.reshape(num_heads, 2, head_dim // 2, w.shape[-1])
    return rows.transpose(1, 2).reshape(num_heads * head_dim, w.shape[-1])


# HF name (inside model.layers.{i}.) -> gpt-fast name (inside layers.{i}.)
_LAYER_NAMES = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def gpt_fast_state_dict(model_dir: str, cfg: ModelConfig, device, dtype: torch.dtype) -> dict:
    """Our HF safetensors in gpt-fast's names and layout: q/k/v fused as wqkv (q and k rows
    reordered for its rotary layout), gate/up/down as w1/w3/w2; a tied lm_head shares the
    embedding."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    hf = {}
    for f in files:
        hf.update(load_file(os.path.join(model_dir, f), device=str(device)))
    hf = {k: v.to(dtype) for k, v in hf.items()}
    out = {"tok_embeddings.weight": hf.pop("model.embed_tokens.weight"), "norm.weight": hf.pop("model.norm.weight")}
    lm_head = hf.pop("lm_head.weight", None)
    out["output.weight"] = out["tok_embeddings.weight"] if lm_head is None or cfg.tie_word_embeddings else lm_head
    hd = cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        q = _rope_pairs_adjacent(hf.pop(src + "self_attn.q_proj.weight"), cfg.num_attention_heads, hd)
        k = _rope_pairs_adjacent(hf.pop(src + "self_attn.k_proj.weight"), cfg.num_key_value_heads, hd)
        v = hf.pop(src + "self_attn.v_proj.weight")
        out[dst + "attention.wqkv.weight"] = torch.cat([q, k, v])
        for name, theirs in _LAYER_NAMES.items():
            out[dst + theirs] = hf.pop(src + name)
    leftover = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise PeerUnsupported(f"weights gpt-fast has no place for: {leftover[:5]}")
    return out


def build_gpt_fast_model(model_mod, model_dir: str, device, dtype: torch.dtype, max_seq_length: int):
    cfg = ModelConfig.from_pretrained(model_dir)
    args = gpt_fast_model_args(model_mod, cfg)
    with torch.device("meta"):
        model = model_mod.Transformer(args)
    model.load_state_dict(gpt_fast_state_dict(model_dir, cfg, device, dtype), assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.eval()
    with torch.device(device):
        model.setup_caches(max_batch_size=1, max_seq_length=max_seq_length)
    return model


def gpt_fast_bench(src_dir: str, target_dir: str, draft_dir: str, prompt_ids: list[list[int]], max_tokens: int,
                   k: int, dtype: str, device, compile: bool = True, on_part=None) -> dict:
    """gpt-fast plain decoding and speculative decoding with the draft LM, batch 1, greedy
    (its temperature floor of 1e-5 makes its sampler an argmax). ``on_part(name, result)`` gets
    the plain result before the speculative run starts (its compile alone takes minutes)."""
    device = torch.device(device)
    tdtype = parse_dtype(dtype)
    model_mod, gen = load_gpt_fast(src_dir)
    max_seq = max(len(x) for x in prompt_ids) + max_tokens + k + 1
    target = build_gpt_fast_model(model_mod, target_dir, device, tdtype, max_seq)
    greedy = {"temperature": 0.0, "top_k": None}
    if compile:  # what gpt-fast's main() does for a speculative run
        gen.decode_one_token = torch.compile(gen.decode_one_token, mode="reduce-overhead", fullgraph=True)
        gen.model_forward = torch.compile(gen.model_forward, mode="reduce-overhead", fullgraph=True)

    def prefill(model, ids):
        x = torch.tensor(ids, device=device, dtype=torch.int).view(1, -1)
        return gen.prefill(model, x, torch.arange(0, len(ids), device=device), **greedy).clone()

    decode_n_tokens = gen.decode_n_tokens

    def decode_n_tokens_1d(*args, **kwargs):
        # Its batch support made each drafted token [1, 1] and each probability row [1, V], while
        # speculative_decode still concatenates and indexes them as [1] and [V] (it raises
        # "Tensors must have same number of dimensions"; meta-pytorch/gpt-fast#209). Views only.
        tokens, probs = decode_n_tokens(*args, **kwargs)
        return [t.view(1) for t in tokens], [p.view(-1) for p in probs]

    def plain(ids: list[int]) -> list[int]:
        with torch.no_grad():
            first = prefill(target, ids)
            pos = torch.tensor([len(ids)], device=device, dtype=torch.int)
            rest, _ = decode_n_tokens(target, first.view(1, -1), pos, max_tokens - 1, **greedy)
            return torch.cat([first.view(-1)] + [t.view(-1) for t in rest]).tolist()

    draft = None
    accept_counts = [0] * (k + 1)

    def reset_counts():
        accept_counts[:] = [0] * (k + 1)

    def speculative(ids: list[int]) -> list[int]:
        with torch.no_grad():
            token = prefill(target, ids)
            prefill(draft, ids)
            out, pos = [int(token)], len(ids)
            while len(out) < max_tokens:
                new = gen.speculative_decode(target, draft, token.view(()), pos, k, **greedy)
                accept_counts[len(new) - 1] += 1
                n = min(max_tokens - len(out), len(new))
                out += new[:n].tolist()
                pos += n
                token = new[n - 1]
            return out

    notes = {"compiled": compile, "mode": "reduce-overhead, fullgraph" if compile else "eager",
             "source": src_dir, "prompt_feed": "token ids from the target's tokenizer"}
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its sdp_kernel context is deprecated
        try:
            results["gpt_fast_compiled" if compile else "gpt_fast_plain"] = {**_timed(plain, prompt_ids, device), **notes}
        except Exception as e:
            results["gpt_fast_compiled" if compile else "gpt_fast_plain"] = {"error": error_text(e)}
        if on_part is not None:
            on_part(*next(iter(results.items())))
        try:
            draft = build_gpt_fast_model(model_mod, draft_dir, device, tdtype, max_seq)
            gen.decode_n_tokens = decode_n_tokens_1d
            r = _timed(speculative, prompt_ids, device, after_warmup=reset_counts)
            steps = sum(accept_counts)  # accept_counts[i]: steps that emitted i + 1 tokens
            r.update(notes, k=k, accept_counts=list(accept_counts),
                     adapter="decode_n_tokens outputs viewed as 1-D for speculative_decode (gpt-fast#209)",
                     acceptance_length=sum((i + 1) * c for i, c in enumerate(accept_counts)) / steps if steps else None)
            results["gpt_fast_speculative"] = r
        except Exception as e:
            results["gpt_fast_speculative"] = {"error": error_text(e)}
    del target, draft
    if compile:
        torch._dynamo.reset()  # drops the graphs and their memory pools
    _free(device)
    return results


# --- all peers ---------------------------------------------------------------------------
def run_peers(names, pair, prompt_ids: list[list[int]], max_tokens: int, k: int, dtype: str, device, *,
              gpt_fast_dir: str | None = None, gpt_fast_compile: bool = True,
              reference: list[list[int]] | None = None, baseline_tps: float | None = None, log=print,
              on_result=None) -> dict:
    """Every requested peer; each entry is its figures or {"error": ...}. ``reference`` (parspec
    without speculation at concurrency 1, the same prompts) gives each a greedy mismatch rate.
    ``on_result(peers)`` is called after each peer, so a run cut short keeps what finished."""
    runs = {}
    if "hf" in names:
        runs["hf_generate"] = lambda: hf_generate(pair.target, prompt_ids, max_tokens, dtype, device)
        runs["hf_assisted"] = lambda: hf_generate(pair.target, prompt_ids, max_tokens, dtype, device,
                                                  assistant_dir=pair.draft, assistant_k=k)
        runs["hf_prompt_lookup"] = lambda: hf_generate(pair.target, prompt_ids, max_tokens, dtype, device,
                                                       prompt_lookup_k=k)
    peers = {}

    def publish():
        for p in peers.values():
            outputs = p.pop("outputs", None)
            if "error" in p or "speedup_vs_no_spec" in p:
                continue
            p["speedup_vs_no_spec"] = p["tokens_per_s"] / baseline_tps if baseline_tps else None
            if reference is not None and outputs is not None:
                differ = [i for i, (a, b) in enumerate(zip(outputs, reference)) if a != b]
                p["mismatch_rate_vs_no_spec"] = len(differ) / len(outputs)
                p["mismatched_prompts"] = differ
        if on_result is not None:
            on_result(peers)

    def gpt_fast_part(name, result):
        peers[name] = result
        publish()

    if "gpt-fast" in names:
        runs["gpt_fast"] = lambda: gpt_fast_bench(gpt_fast_dir, pair.target, pair.draft, prompt_ids, max_tokens,
                                                  k, dtype, device, compile=gpt_fast_compile, on_part=gpt_fast_part)
    for name, run in runs.items():
        log(f"bench: peer {name} ({len(prompt_ids)} prompts, batch 1)")
        try:
            if name == "gpt_fast" and not gpt_fast_dir:
                raise PeerUnsupported("no gpt-fast checkout given (--gpt-fast DIR)")
            result = run()
            peers.update(result if name == "gpt_fast" else {name: result})
        except Exception as e:  # a peer never aborts the run
            peers[name] = {"error": error_text(e)}
            log(f"bench: peer {name} failed: {peers[name]['error']}")
        _free(torch.device(device))
        publish()
    return peers
