"""HF directory -> model and tokenizer.

Weights come from safetensors only (``model.safetensors`` or a sharded index), memory
mapped, checked name by name and shape by shape; every problem is a LoadError that
names the file and the tensor."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from parspec.config import ConfigError, ModelConfig, read_json
from parspec.models.layers import PACKED_MODULES


class LoadError(ValueError):
    """A checkpoint directory or file is missing, corrupt or does not fit the model."""


def check_model_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise LoadError(f"model directory not found: {path}")


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's safetensors files, after checking an index names only files that exist."""
    check_model_dir(model_dir)
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            weight_map = read_json(index, "safetensors index")["weight_map"]
        except (ConfigError, KeyError) as e:
            raise LoadError(f"bad safetensors index {index}: {e}") from e
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.isfile(os.path.join(model_dir, f))]
        if missing:
            raise LoadError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return [os.path.join(model_dir, f) for f in files]
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(model_dir, f) for f in found]
    pickles = sorted(f for f in os.listdir(model_dir) if f.endswith((".bin", ".pt", ".pth")))
    hint = ""
    if pickles:
        # Unpickling runs arbitrary code, so such files are named, never opened.
        hint = (f" (found {', '.join(pickles)}: pickled weights are not loaded; convert them once to safetensors "
                f"where they came from, e.g. `python -c \"from transformers import AutoModelForCausalLM; "
                f"AutoModelForCausalLM.from_pretrained('{model_dir}').save_pretrained('{model_dir}', "
                f"safe_serialization=True)\"`, or save_file(torch.load(path, weights_only=True), "
                f"'model.safetensors') from safetensors.torch)")
    raise LoadError(f"no safetensors weights in {model_dir}{hint}")


class SafetensorsReader:
    """(name, tensor) pairs from safetensors files, memory mapped; ``path`` is the file the
    last pair came from, so errors about a tensor can name its file."""

    def __init__(self, files: list[str], device: str = "cpu"):
        self.files, self.device, self.path = files, device, None

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for path in self.files:
            self.path = path
            try:
                with safe_open(path, framework="pt", device=self.device) as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise LoadError(f"cannot read safetensors file {path}: {e}") from e


def iter_safetensors(files: list[str], device: str = "cpu") -> SafetensorsReader:
    return SafetensorsReader(files, device)


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]],
                 rename=lambda name: name, skip_params: tuple[str, ...] = ()) -> None:
    """Copy checkpoint tensors into ``model``, splitting HF's q/k/v and gate/up into our
    fused projections. Every parameter must be filled, every shape must match.
    ``rename`` maps a checkpoint name to ours, or to None to skip the tensor;
    parameters under the ``skip_params`` prefixes are filled elsewhere. A floating-point
    parameter takes floating-point tensors only: an integer one would be cast to garbage."""
    params = dict(model.named_parameters(remove_duplicate=False))
    filled: dict[int, set[int]] = {}  # id(param) -> shards filled (-1: the whole tensor)
    for ckpt_name, tensor in weights:
        name = rename(ckpt_name)
        if name is None or name.endswith("rotary_emb.inv_freq"):
            continue
        shard = None
        for hf, (fused, idx) in PACKED_MODULES.items():
            if f".{hf}." in name:
                name, shard = name.replace(f".{hf}.", f".{fused}."), idx
                break
        if name not in params:
            raise LoadError(f"checkpoint tensor {ckpt_name!r} has no place in {type(model).__name__}")
        param = params[name]
        target = param if shard is None else _shard_of(model, name, param, shard)
        if tuple(tensor.shape) != tuple(target.shape):
            raise LoadError(f"shape mismatch for {ckpt_name!r}: checkpoint {tuple(tensor.shape)}, "
                            f"model expects {tuple(target.shape)}")
        if target.is_floating_point() and not tensor.is_floating_point():
            where = weights.path if isinstance(weights, SafetensorsReader) else "the checkpoint"
            raise LoadError(f"checkpoint tensor {ckpt_name!r} in {where} has dtype {tensor.dtype}, but {name} is a "
                            f"floating-point parameter ({target.dtype}): the file is corrupt or not a weight file")
        with torch.no_grad():
            target.copy_(tensor)
        filled.setdefault(id(param), set()).add(-1 if shard is None else shard)
    missing = [name for name, p in params.items()
               if not name.startswith(skip_params) and not _complete(name, filled.get(id(p), set()))]
    if missing:
        raise LoadError(f"checkpoint lacks {len(missing)} tensor(s) of {type(model).__name__}, "
                        f"e.g. {', '.join(missing[:4])}")


def _complete(name: str, shards: set[int]) -> bool:
    for fused in {f for f, _ in PACKED_MODULES.values()}:
        if f".{fused}." in name:
            need = {i for f, i in PACKED_MODULES.values() if f == fused}
            return -1 in shards or need <= shards
    return bool(shards)


def _shard_of(model: nn.Module, name: str, param: torch.Tensor, shard: int) -> torch.Tensor:
    """Rows of a fused q/k/v or gate/up parameter that one HF tensor fills."""
    module = model.get_submodule(name.rsplit(".", 2)[0])
    if "qkv_proj" in name:
        sizes = [module.q_size, module.kv_size, module.kv_size]
    else:
        sizes = [param.shape[0] // 2] * 2
    start = sum(sizes[:shard])
    return param.narrow(0, start, sizes[shard])


def build_on_device(model_cls, cfg, dtype: torch.dtype, device: torch.device, **kwargs) -> nn.Module:
    """Build on the meta device (no random init of billions of weights), then allocate on
    ``device``: parameters in ``dtype``, buffers (rope tables) recomputed in float32."""
    with torch.device("meta"):
        model = model_cls(cfg, **kwargs)
    model = model.to_empty(device=device).to(dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return model


def build_and_load(model_cls, cfg, files: list[str], dtype: torch.dtype, device: torch.device,
                   rename=lambda name: name, **kwargs) -> nn.Module:
    model = build_on_device(model_cls, cfg, dtype, device, **kwargs)
    load_weights(model, iter_safetensors(files, device="cpu"), rename=rename)
    return model.eval()


def load_model(model_dir: str, dtype: torch.dtype, device: torch.device,
               max_positions: int | None = None, cfg: ModelConfig | None = None):
    """``cfg``: the directory's config when the caller has already parsed it."""
    from parspec.models import model_class

    check_model_dir(model_dir)
    cfg = cfg or ModelConfig.from_pretrained(model_dir)
    files = safetensors_files(model_dir)
    model = build_and_load(model_class(cfg.architecture), cfg, files, dtype, device,
                           max_positions=max_positions)
    return model, cfg
