"""EAGLE-3 / P-EAGLE head directories in the three layouts in use, read and written.

* ``vllm``: vLLM's LlamaForCausalLMEagle3 config.json, weights ``layers.N.*`` (what
  ``save_eagle3`` writes). The aux layer ids go both top-level and in ``eagle_config``
  (vLLM versions read one or the other), the P-EAGLE mask token as ``mask_token_id``
  and ``ptd_token_id`` (older vLLM reads only the latter; ``pard_token`` is read too).
* ``speculators``: the speculators library's config.json (``speculators_model_type``
  eagle3 / peagle, ``transformer_layer_config``, ``speculators_config``), vLLM's tensor
  names, ``mask_hidden`` as ``[1, 1, n_aux * H_target]``.
* ``eagle``: SafeAILab's EAGLE-3: a Llama config.json and ``midlayer.*`` for its single
  layer. Its loader drops unknown tensors silently (``strict=False``), so ``layers.0.*``
  would load as nothing: exporting renames them, and refuses heads it cannot express.

Weights are read from safetensors only; a pickled checkpoint is never unpickled."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch
from safetensors.torch import save_file

from parspec.config import ConfigError, read_json
from parspec.loader import LoadError, check_model_dir, iter_safetensors, safetensors_files
from parspec.models.drafter import MASK_TOKEN_KEYS, Eagle3Config, Eagle3Drafter, default_aux_layers
from parspec.models.layers import PACKED_MODULES

FORMATS = ("vllm", "speculators", "eagle")
SPECULATORS_TYPES = ("eagle3", "peagle")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


# --- reading -------------------------------------------------------------------------------

def speculators_to_vllm(cfg: dict) -> dict:
    """A speculators config.json -> the vLLM-shaped dict Eagle3Config.from_dict reads
    (vLLM's own conversion: the layer config, then the algorithm's top-level fields)."""
    kind = cfg["speculators_model_type"]
    if kind not in SPECULATORS_TYPES:
        raise ConfigError(f"drafter config: speculators_model_type={kind!r} is not an EAGLE-3 head "
                          f"({', '.join(SPECULATORS_TYPES)})")
    layer = cfg.get("transformer_layer_config")
    if not isinstance(layer, dict):
        raise ConfigError(f"drafter config: a speculators config needs a transformer_layer_config object, "
                          f"got {layer!r}")
    if layer.get("model_type", "llama") != "llama":
        raise ConfigError(f"drafter config: transformer_layer_config.model_type={layer['model_type']!r}; "
                          "parspec's EAGLE-3 drafter is a Llama layer")
    flat = {**layer, "architectures": ["LlamaForCausalLMEagle3"]}
    for key in ("draft_vocab_size", "target_hidden_size", "eagle_aux_hidden_state_layer_ids",
                "norm_before_fc", "fc_norm", "norm_output", *MASK_TOKEN_KEYS):
        if cfg.get(key) is not None:
            flat[key] = cfg[key]
    flat["norm_before_residual"] = cfg.get("norm_before_residual", True)  # vLLM's default for speculators
    if kind == "peagle" and not any(cfg.get(k) is not None for k in MASK_TOKEN_KEYS):
        raise ConfigError("drafter config: a speculators peagle head needs mask_token_id")
    return flat


def read_head_config(path: str) -> Eagle3Config:
    if not os.path.isdir(path):
        raise LoadError(f"drafter directory not found: {path}")
    cfg = read_json(os.path.join(path, "config.json"), "drafter config.json")
    return Eagle3Config.from_dict(speculators_to_vllm(cfg) if "speculators_model_type" in cfg else cfg)


def weight_files(path: str) -> list[str]:
    """The head's safetensors; pickled weights get a conversion command, never a load."""
    check_model_dir(path)
    names = os.listdir(path)
    if not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        if pickles:
            src = os.path.join(path, pickles[0])
            raise LoadError(
                f"drafter {path} has only pickled weights ({', '.join(pickles)}); parspec loads safetensors "
                f"only and never unpickles a checkpoint. Convert it once, with code you trust, e.g.:\n"
                f"  python -c \"import torch; from safetensors.torch import save_file; "
                f"sd = torch.load('{src}', map_location='cpu', weights_only=True); "
                f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{os.path.join(path, 'model.safetensors')}')\"")
    return safetensors_files(path)


def canonical_name(name: str) -> str:
    """vLLM's names: no ``model.`` prefix, SafeAILab's ``midlayer.`` as ``layers.0.``."""
    if name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("midlayer."):
        name = "layers.0." + name[len("midlayer."):]
    return name


def expected_names(cfg: Eagle3Config) -> set[str]:
    """The tensor names (vLLM's, q/k/v and gate/up split) of a head with this config."""
    with torch.device("meta"):
        model = Eagle3Drafter(cfg)
    names = {"d2t", "t2d"}
    for name in model.state_dict():
        parts = name.rsplit(".", 2)
        if len(parts) == 3 and parts[1] in ("qkv_proj", "gate_up_proj"):
            names |= {f"{parts[0]}.{hf}.{parts[2]}" for hf, (fused, _) in PACKED_MODULES.items() if fused == parts[1]}
        else:
            names.add(name)
    return names


def _check_names(cfg: Eagle3Config, tensors: dict, path: str) -> None:
    allowed = expected_names(cfg)
    for name in tensors:
        if name in allowed or name.endswith("rotary_emb.inv_freq"):
            continue
        if name.endswith(".bias"):
            raise LoadError(f"drafter {path}: checkpoint has {name!r} but config.json does not enable that bias "
                            "(vLLM's keys: attention_bias for q/k/v/o_proj, bias for o_proj, mlp_bias for the MLP)")
        if name.startswith("fc_norm."):
            raise LoadError(f"drafter {path}: checkpoint has {name!r} but config.json does not set fc_norm")
        raise LoadError(f"drafter {path}: tensor {name!r} is not part of an EAGLE-3 / P-EAGLE head as vLLM "
                        "loads one (layers.N.*, fc, norm, lm_head, d2t, t2d, embed_tokens, mask_hidden, "
                        "input_norm, fc_norm.N)")


def read_head(path: str) -> tuple[Eagle3Config, dict[str, torch.Tensor]]:
    """Config and tensors (vLLM's names, mask_hidden as [1, n_aux * H_target]) of a head in
    any layout. P-EAGLE is what the files say: a mask token and mask_hidden; a mask token
    without mask_hidden leaves a head that drafts sequentially only."""
    cfg = read_head_config(path)
    tensors = {canonical_name(n): t for n, t in iter_safetensors(weight_files(path))}
    if not cfg.norm_before_fc:
        tensors.pop("input_norm.weight", None)  # vLLM skips it too when norm_before_fc is off
    mask = tensors.pop("mask_hidden", None)
    width = cfg.num_aux * cfg.target_hidden_size
    if mask is not None:
        if mask.dim() not in (2, 3) or mask.shape[-1] != width or mask.numel() != width:
            raise LoadError(f"drafter {path}: mask_hidden has shape {tuple(mask.shape)}, expected [1, {width}] "
                            f"or [1, 1, {width}] ({cfg.num_aux} aux layers x target_hidden_size "
                            f"{cfg.target_hidden_size})")
        if cfg.parallel_drafting:  # without a mask token it has no use (vLLM skips it as well)
            tensors["mask_hidden"] = mask.reshape(1, width)
    elif cfg.parallel_drafting:
        cfg = replace(cfg, parallel_drafting=False)
    _check_names(cfg, tensors, path)
    return cfg, tensors


# --- writing -------------------------------------------------------------------------------

def speculators_config(cfg: Eagle3Config, verifier: str | None, num_speculative_tokens: int) -> dict:
    kind = "peagle" if cfg.parallel_drafting else "eagle3"
    layer = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "num_hidden_layers": cfg.num_hidden_layers, "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings, "hidden_act": "silu",
        "attention_bias": cfg.attention_bias, "mlp_bias": cfg.mlp_bias, "tie_word_embeddings": False,
    }
    if cfg.o_proj_bias and not cfg.attention_bias:
        layer["bias"] = True
    out = {
        "architectures": ["Eagle3Speculator"], "speculators_model_type": kind,
        "transformer_layer_config": layer, "draft_vocab_size": cfg.draft_vocab_size,
        "target_hidden_size": cfg.target_hidden_size, "norm_before_residual": cfg.norm_before_residual,
        "speculators_config": {
            "algorithm": kind, "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": num_speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": verifier, "architectures": ["LlamaForCausalLM"]},
        },
    }
    for flag in ("norm_before_fc", "fc_norm", "norm_output"):
        if getattr(cfg, flag):
            out[flag] = True
    if cfg.aux_layer_ids is not None:
        out["eagle_aux_hidden_state_layer_ids"] = list(cfg.aux_layer_ids)
    if cfg.parallel_drafting:
        out["mask_token_id"] = cfg.mask_token_id
    return out


def check_eagle_exportable(cfg: Eagle3Config) -> None:
    """What SafeAILab's EAGLE-3 cannot express; its strict=False load would hide it."""
    problems = []
    if cfg.num_hidden_layers != 1:
        problems.append(f"num_hidden_layers={cfg.num_hidden_layers} (it has one layer, midlayer)")
    for flag in ("attention_bias", "o_proj_bias", "mlp_bias", "norm_before_fc", "fc_norm", "norm_output",
                 "norm_before_residual"):
        if getattr(cfg, flag):
            problems.append(f"{flag}=True")
    aux = cfg.aux_layer_ids
    if aux is not None and tuple(aux) != default_aux_layers(aux[-1] + 3):
        problems.append(f"aux layers {list(aux)} (it always reads layers 2, L//2, L-3)")
    if problems:
        raise ConfigError("this head cannot be exported for SafeAILab's EAGLE-3: " + "; ".join(problems))


def write_head(cfg: Eagle3Config, tensors: dict[str, torch.Tensor], path: str, fmt: str = "vllm",
               verifier: str | None = None, num_speculative_tokens: int = 3) -> None:
    """config.json + model.safetensors in layout ``fmt``; ``tensors`` under vLLM's names."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown head format {fmt!r} (one of {', '.join(FORMATS)})")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if fmt == "vllm":
        config = cfg.to_dict()
    elif fmt == "speculators":
        config = speculators_config(cfg, verifier, num_speculative_tokens)
        if "mask_hidden" in tensors:
            tensors["mask_hidden"] = tensors["mask_hidden"].reshape(1, 1, -1)
    else:
        check_eagle_exportable(cfg)
        config = {**cfg.to_dict(), "architectures": ["LlamaForCausalLM"], "bias": False}
        tensors = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v
                   for k, v in tensors.items()}
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def export_head(src: str, out: str, fmt: str, verifier: str | None = None, num_speculative_tokens: int = 3) -> None:
    """Re-write the head at ``src`` (any layout) in layout ``fmt``."""
    if os.path.abspath(src) == os.path.abspath(out):
        raise ConfigError(f"export-head: --out must differ from --head ({src})")
    cfg, tensors = read_head(src)
    write_head(cfg, tensors, out, fmt, verifier, num_speculative_tokens)
