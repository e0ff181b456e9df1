"""The reference pair at Llama-3.1-8B shape, by exact function-preserving expansion.

At the fixture's size every engine is overhead-bound, so timings need a model that moves an
8B model's bytes. Expansion gives one that also keeps the pair's real, trained behaviour:
the expanded target's logits equal the original's (exactly in real arithmetic), and the
expanded drafters propose what the originals propose, so acceptance is unchanged.

The maths. The residual stream x in R^H0 becomes [x; 0] in R^H and stays so:
- every tensor that WRITES the stream (embedding columns, o_proj and down_proj rows, the
  drafter's fc rows, P-EAGLE's mask_hidden) is zero outside the original block, so the
  padded units stay exactly 0 through every layer;
- tensors that only READ it (q/k/v, gate/up, an untied lm_head, fc's columns) meet zeros in
  the padded units, so their padded columns may be anything: seeded random, so every
  matrix is dense like a real model's;
- extra query / KV heads and MLP units compute something, but their o_proj / down_proj
  columns are zero, so none of it reaches the stream. Original query head h of KV group
  c = h // g0 goes to slot h % g0 of new group c (new group size g >= g0), so GQA still
  pairs it with the original KV head c;
- RMSNorm: mean over H of [x; 0]^2 = (H0/H) * (mean over H0 of x^2). With eps' = eps H0/H,
  mean' + eps' = (H0/H)(mean + eps), so [x; 0] / sqrt(mean' + eps') = sqrt(H/H0) [x; 0] /
  sqrt(mean + eps), and weights w' = w sqrt(H0/H) give back the original output on the
  original units (and 0 on the padded ones, whatever their weight);
- an extra layer with zero o_proj and down_proj adds 0 to the stream: an identity layer.
  Original layers are spread evenly among them. Everything before new layer layer_map[i]
  is old layers < i or identities, so its input is old layer i's input: EAGLE-3's aux
  features (inputs of layers) map through layer_map.
In floating point only the summation order changes, plus, in bfloat16, the rounding of the
rescaled norm weights (exact when H/H0 is a power of 4, e.g. the draft LM's 128 -> 2048).

The vocabulary stays the fixture's (6144): embedding and lm_head are far smaller than
Llama-3.1-8B's (128256 x 4096, untied), so a target step reads ~14.0 GB instead of ~15 GB;
every other tensor has the 8B shape."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from parspec.config import ModelConfig, parse_dtype, read_json
from parspec.loader import iter_safetensors, safetensors_files
from parspec.models.drafter import Eagle3Config, default_aux_layers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_SRC = os.path.join(REPO, "fixtures", "reference")
MAX_SHARD_BYTES = 5 * 10**9
INIT_STD = 0.02  # the scale of the random (function-neutral) weights, as a fresh Llama's
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
                   "generation_config.json")


class ExpansionError(ValueError):
    """The requested shape cannot hold the source's function (or the source is not a Llama)."""


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    head_dim: int  # expansion never changes it; stated so a source that differs is refused


@dataclass(frozen=True)
class HeadShape:
    hidden: int
    num_heads: int
    num_kv_heads: int
    intermediate: int
    head_dim: int


@dataclass(frozen=True)
class Preset:
    target: LlamaShape
    head: HeadShape  # EAGLE-3 and P-EAGLE heads; each keeps its own number of layers
    draft: LlamaShape


PRESETS = {
    # Llama-3.1-8B; a published Llama-3.1-8B EAGLE-3 head (per layer); Llama-3.2-1B.
    "8b": Preset(target=LlamaShape(4096, 32, 32, 8, 14336, 128),
                 head=HeadShape(4096, 32, 8, 14336, 128),
                 draft=LlamaShape(2048, 16, 32, 8, 8192, 64)),
    # For tests: the same kinds of growth (hidden, heads, KV heads, layers, MLP) at CPU size.
    "tiny": Preset(target=LlamaShape(1024, 7, 8, 2, 1024, 128),
                   head=HeadShape(1024, 8, 2, 1024, 128),
                   draft=LlamaShape(256, 3, 4, 2, 512, 64)),
}


def vocab_note(vocab_size: int) -> str:
    return (f"vocabulary stays the fixture's ({vocab_size}): embedding and lm_head keep {vocab_size} rows "
            "(Llama-3.1-8B has 128256), every other tensor has the stated shape")


# --- shapes: what can grow into what -----------------------------------------------------------

def _check_grows(what: str, name: str, old: int, new: int) -> None:
    if not isinstance(new, int) or isinstance(new, bool) or new < old:
        raise ExpansionError(f"{what}: {name}={new!r} is smaller than the source's {old}; expansion only grows "
                             "a model (a smaller one cannot hold its function)")


def head_layout(what: str, old_heads: int, old_kv: int, head_dim: int, old_hidden: int,
                new_heads: int, new_kv: int, new_hidden: int, new_head_dim: int | None) -> tuple[list[int], list[int]]:
    """New positions of the original query heads and KV heads, keeping every query head in
    the group of its own KV head."""
    if new_head_dim is not None and new_head_dim != head_dim:
        raise ExpansionError(f"{what}: head_dim={new_head_dim} but the source's head_dim is {head_dim}; "
                             "expansion keeps head_dim (rope and the attention scale depend on it)")
    if not isinstance(new_kv, int) or new_kv < 1 or not isinstance(new_heads, int) or new_heads % new_kv:
        raise ExpansionError(f"{what}: num_heads={new_heads} is not a multiple of num_kv_heads={new_kv}")
    if old_hidden == old_heads * head_dim and new_hidden != new_heads * head_dim:
        raise ExpansionError(f"{what}: hidden={new_hidden} with num_heads={new_heads} means head_dim="
                             f"{new_hidden / new_heads:g}, but the source's head_dim is {head_dim} "
                             f"(hidden = heads x head_dim in the source); it cannot change")
    _check_grows(what, "num_kv_heads", old_kv, new_kv)
    old_group, new_group = old_heads // old_kv, new_heads // new_kv
    if new_group < old_group:
        raise ExpansionError(f"{what}: num_heads/num_kv_heads = {new_heads}/{new_kv} gives groups of {new_group} "
                             f"query heads, fewer than the source's {old_group}; its heads would leave their KV head")
    q_map = [(h // old_group) * new_group + h % old_group for h in range(old_heads)]
    return q_map, list(range(old_kv))


def spread_layers(old: int, new: int) -> list[int]:
    """New index of each original layer, spread evenly, first one first."""
    return [i * new // old for i in range(old)]


# --- building tensors ---------------------------------------------------------------------------

Index = slice | torch.Tensor  # new positions of the source's rows (or columns)


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    build: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _place(out: torch.Tensor, src: torch.Tensor, rows: Index, cols: Index | None = None) -> torch.Tensor:
    """out[rows, cols] = src, each index a slice or the new positions of src's rows / columns."""
    src = src.to(device=out.device, dtype=out.dtype)
    if out.dim() == 1:
        if isinstance(rows, slice):
            out[rows] = src
        else:
            out.index_copy_(0, rows, src)
    elif isinstance(rows, slice) and isinstance(cols, slice):
        out[rows, cols] = src
    elif isinstance(rows, slice):
        out[rows].index_copy_(1, cols, src)
    elif isinstance(cols, slice):
        out[:, cols].index_copy_(0, rows, src)
    else:
        out.index_put_((rows[:, None], cols[None, :]), src)
    return out


class TensorBuilder:
    """Makes the expanded tensors on ``device``; the seed decides only function-neutral values."""

    def __init__(self, seed: int, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def reads(self, src: torch.Tensor | None, shape, rows: Index, cols: Index) -> torch.Tensor:
        """A tensor that reads the stream: random, with the source in its place."""
        out = torch.empty(shape, device=self.device, dtype=self.dtype).normal_(0.0, INIT_STD, generator=self.generator)
        return out if src is None else _place(out, src, rows, cols)

    def writes(self, src: torch.Tensor | None, shape, rows: Index, cols: Index | None = None) -> torch.Tensor:
        """A tensor that writes the stream (or an extra unit's output): zero outside the source."""
        out = torch.zeros(shape, device=self.device, dtype=self.dtype)
        return out if src is None else _place(out, src, rows, cols)

    def projection(self, src: torch.Tensor, shape, live_rows: int, cols: Index) -> torch.Tensor:
        """fc: writes the drafter's stream (rows past ``live_rows`` zero), reads the features."""
        out = self.reads(None, shape, None, None)
        out[live_rows:] = 0
        return _place(out, src, slice(0, src.shape[0]), cols)

    def norm(self, src: torch.Tensor | None, size: int, scale: float) -> torch.Tensor:
        out = torch.full((size,), scale, device=self.device, dtype=self.dtype)
        return out if src is None else _place(out, src.float() * scale, slice(0, src.shape[0]))

    def copy(self, src: torch.Tensor) -> torch.Tensor:
        return src.clone()

    def units(self, head_map: list[int], head_dim: int) -> torch.Tensor:
        """Row positions of whole heads."""
        heads = torch.tensor(head_map, dtype=torch.int64, device=self.device)
        return (heads[:, None] * head_dim + torch.arange(head_dim, device=self.device)).reshape(-1)


@dataclass
class LayerGeometry:
    """Where a decoder layer's source rows and columns go."""

    hidden: int
    q_size: int
    kv_size: int
    intermediate: int
    q_rows: torch.Tensor
    kv_rows: torch.Tensor
    in_width: int  # what q/k/v read: hidden, or 2 x hidden for EAGLE-3's first layer
    in_cols: Index
    old_hidden: int
    old_intermediate: int
    norm_scale: float
    norms: tuple[str, ...] = ("input_layernorm.weight", "post_attention_layernorm.weight")


def _layer_plan(prefix: str, src: dict[str, torch.Tensor] | None, geo: LayerGeometry,
                b: TensorBuilder) -> list[PlannedTensor]:
    """One decoder layer; ``src`` None makes an identity layer."""
    hid, inter = slice(0, geo.old_hidden), slice(0, geo.old_intermediate)
    H, I, Q, KV, C = geo.hidden, geo.intermediate, geo.q_size, geo.kv_size, geo.in_width
    # name -> (shape, kind, new positions of the source's rows, of its columns)
    specs = {norm: ((H,), "norm", None, None) for norm in geo.norms}
    specs.update({
        "self_attn.q_proj.weight": ((Q, C), "reads", geo.q_rows, geo.in_cols),
        "self_attn.k_proj.weight": ((KV, C), "reads", geo.kv_rows, geo.in_cols),
        "self_attn.v_proj.weight": ((KV, C), "reads", geo.kv_rows, geo.in_cols),
        "self_attn.o_proj.weight": ((H, Q), "writes", hid, geo.q_rows),
        "mlp.gate_proj.weight": ((I, H), "reads", inter, hid),
        "mlp.up_proj.weight": ((I, H), "reads", inter, hid),
        "mlp.down_proj.weight": ((H, I), "writes", hid, inter),
    })

    def build(key: str) -> torch.Tensor:
        shape, kind, rows, cols = specs[key]
        old = None if src is None else src[key]
        if kind == "norm":
            return b.norm(old, H, geo.norm_scale)
        return (b.reads if kind == "reads" else b.writes)(old, shape, rows, cols)

    return [PlannedTensor(prefix + key, shape, b.dtype, lambda key=key: build(key))
            for key, (shape, *_) in specs.items()]


def _check_tensors(what: str, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """The source holds exactly the expected tensors at the expected shapes."""
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise ExpansionError(f"{what}: tensor(s) {', '.join(unknown[:4])} have no place in a Llama expansion "
                             "(biases, qk-norms and other architectures are not supported)")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ExpansionError(f"{what}: source lacks tensor(s) {', '.join(missing[:4])}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise ExpansionError(f"{what}: {name} has shape {tuple(tensors[name].shape)}, its config says {shape}")


def _layer_shapes(prefix: str, hidden: int, q_size: int, kv_size: int, inter: int, in_width: int,
                  norms=("input_layernorm.weight", "post_attention_layernorm.weight")) -> dict[str, tuple[int, ...]]:
    shapes = {"self_attn.q_proj.weight": (q_size, in_width), "self_attn.k_proj.weight": (kv_size, in_width),
              "self_attn.v_proj.weight": (kv_size, in_width), "self_attn.o_proj.weight": (hidden, q_size),
              "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
              "mlp.down_proj.weight": (hidden, inter), **{n: (hidden,) for n in norms}}
    return {prefix + k: v for k, v in shapes.items()}


# --- writing ---------------------------------------------------------------------------------

def write_safetensors(plan: list[PlannedTensor], dst_dir: str, max_shard_bytes: int = MAX_SHARD_BYTES,
                      progress: bool = True) -> int:
    """Builds and writes the planned tensors: model.safetensors, or shards of at most
    ``max_shard_bytes`` (a bigger single tensor gets a shard of its own) with an index.
    Returns the bytes written."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    n = len(shards)
    files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for f in os.listdir(dst_dir):  # a previous expansion's weights would confuse the loader
        if f.endswith(".safetensors") or f == "model.safetensors.index.json":
            os.remove(os.path.join(dst_dir, f))
    total = sum(t.nbytes for t in plan)
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(os.path.normpath(dst_dir)),
              disable=not progress, file=sys.stderr) as bar:
        for file, shard in zip(files, shards):
            out = {}
            for t in shard:
                tensor = t.build()
                if tuple(tensor.shape) != t.shape or tensor.dtype != t.dtype:
                    raise AssertionError(f"built {t.name} as {tuple(tensor.shape)} {tensor.dtype}, "
                                         f"planned {t.shape} {t.dtype}")
                out[t.name] = tensor.to("cpu").contiguous()
                weight_map[t.name] = file
                bar.update(t.nbytes)
            save_file(out, os.path.join(dst_dir, file), metadata={"format": "pt"})
            os.chmod(os.path.join(dst_dir, file), 0o644)  # safetensors writes 0600
            del out
    if n > 1:
        with open(os.path.join(dst_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def _prepare_dst(src_dir: str, dst_dir: str) -> None:
    if os.path.realpath(src_dir) == os.path.realpath(dst_dir):
        raise ExpansionError(f"destination {dst_dir} is the source directory")
    os.makedirs(dst_dir, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _write_readme(dst_dir: str, title: str, lines: list[str]) -> None:
    with open(os.path.join(dst_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(f"# {title}\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")


def _load_tensors(src_dir: str) -> dict[str, torch.Tensor]:
    return dict(iter_safetensors(safetensors_files(src_dir)))


def _default_device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- a Llama LM ------------------------------------------------------------------------------

def expand_llama(src_dir: str, dst_dir: str, hidden: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 intermediate: int, dtype="bfloat16", seed: int = 0, *, head_dim: int | None = None,
                 device=None, max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = True) -> list[int]:
    """Writes an HF Llama directory at the given shape computing the source's logits.
    Returns (and records in config.json) the new index of each source layer."""
    what = f"expanding {src_dir}"
    raw = read_json(os.path.join(src_dir, "config.json"), "config.json")
    cfg = ModelConfig.from_dict(raw)
    if cfg.architecture != "LlamaForCausalLM" or cfg.attention_bias or raw.get("mlp_bias"):
        raise ExpansionError(f"{what}: only bias-free LlamaForCausalLM models are expanded, got {cfg.architecture} "
                             f"(attention_bias={cfg.attention_bias}, mlp_bias={raw.get('mlp_bias')})")
    H0, D = cfg.hidden_size, cfg.head_dim
    _check_grows(what, "hidden_size", H0, hidden)
    _check_grows(what, "num_layers", cfg.num_hidden_layers, num_layers)
    _check_grows(what, "intermediate_size", cfg.intermediate_size, intermediate)
    q_map, kv_map = head_layout(what, cfg.num_attention_heads, cfg.num_key_value_heads, D, H0,
                                num_heads, num_kv_heads, hidden, head_dim)
    dtype = parse_dtype(dtype)
    layer_map = spread_layers(cfg.num_hidden_layers, num_layers)

    tensors = {k: v for k, v in _load_tensors(src_dir).items() if not k.endswith("rotary_emb.inv_freq")}
    tied = cfg.tie_word_embeddings
    if tied:
        tensors.pop("lm_head.weight", None)  # ignored by every loader when tied
    expected = {"model.embed_tokens.weight": (cfg.vocab_size, H0), "model.norm.weight": (H0,)}
    if not tied:
        expected["lm_head.weight"] = (cfg.vocab_size, H0)
    for i in range(cfg.num_hidden_layers):
        expected.update(_layer_shapes(f"model.layers.{i}.", H0, cfg.num_attention_heads * D,
                                      cfg.num_key_value_heads * D, cfg.intermediate_size, H0))
    _check_tensors(what, tensors, expected)

    device = _default_device(device)
    b = TensorBuilder(seed, device, dtype)
    scale = math.sqrt(H0 / hidden)
    geo = LayerGeometry(hidden=hidden, q_size=num_heads * D, kv_size=num_kv_heads * D, intermediate=intermediate,
                        q_rows=b.units(q_map, D), kv_rows=b.units(kv_map, D), in_width=hidden,
                        in_cols=slice(0, H0), old_hidden=H0, old_intermediate=cfg.intermediate_size,
                        norm_scale=scale)
    hid = slice(0, H0)
    V = cfg.vocab_size
    plan = [PlannedTensor("model.embed_tokens.weight", (V, hidden), dtype,
                          lambda: b.writes(tensors["model.embed_tokens.weight"], (V, hidden), slice(None), hid))]
    old_of = {new: old for old, new in enumerate(layer_map)}
    for j in range(num_layers):
        src = None
        if j in old_of:
            prefix = f"model.layers.{old_of[j]}."
            src = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        plan += _layer_plan(f"model.layers.{j}.", src, geo, b)
    plan.append(PlannedTensor("model.norm.weight", (hidden,), dtype,
                              lambda: b.norm(tensors["model.norm.weight"], hidden, scale)))
    if not tied:
        plan.append(PlannedTensor("lm_head.weight", (V, hidden), dtype,
                                  lambda: b.reads(tensors["lm_head.weight"], (V, hidden), slice(None), hid)))

    _prepare_dst(src_dir, dst_dir)
    nbytes = write_safetensors(plan, dst_dir, max_shard_bytes, progress)
    num_params = sum(math.prod(t.shape) for t in plan)
    source = {"hidden_size": H0, "num_hidden_layers": cfg.num_hidden_layers,
              "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
              "head_dim": D, "intermediate_size": cfg.intermediate_size, "rms_norm_eps": cfg.rms_norm_eps}
    new_cfg = {**raw, "hidden_size": hidden, "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
               "num_key_value_heads": num_kv_heads, "head_dim": D, "intermediate_size": intermediate,
               "rms_norm_eps": cfg.rms_norm_eps * H0 / hidden, "torch_dtype": _dtype_name(dtype)}
    if "dtype" in raw:
        new_cfg["dtype"] = _dtype_name(dtype)
    new_cfg["parspec_expanded_from"] = {
        "source": os.path.normpath(src_dir), "source_shape": source, "layer_map": layer_map,
        "query_head_map": q_map, "kv_head_map": kv_map, "seed": seed,
        "num_parameters": num_params, "note": vocab_note(V),
    }
    _write_json(os.path.join(dst_dir, "config.json"), new_cfg)
    _write_readme(dst_dir, "Function-preserving expansion (parspec.bench.expand)", [
        f"source: `{os.path.normpath(src_dir)}` ({_shape_text(source)})",
        f"this model: {_shape_text(new_cfg)}, {num_params / 1e9:.3f} B parameters, "
        f"{nbytes / 1e9:.2f} GB in {_dtype_name(dtype)}",
        f"same logits as the source (exactly in real arithmetic); source layer i is layer layer_map[i] here, "
        f"layer_map = {layer_map}; the other layers are identities (zero o_proj and down_proj)",
        vocab_note(V),
        "for timings only: its quality is the source's, not an 8B model's",
    ])
    return layer_map


def _shape_text(c: dict) -> str:
    return (f"hidden {c['hidden_size']}, {c['num_hidden_layers']} layers, {c['num_attention_heads']}/"
            f"{c['num_key_value_heads']} heads of {c['head_dim']}, intermediate {c['intermediate_size']}")


# --- an EAGLE-3 / P-EAGLE head ------------------------------------------------------------------

FIRST_LAYER_NORMS = ("input_layernorm.weight", "hidden_norm.weight", "post_attention_layernorm.weight")


def _head_name(name: str) -> str:
    """EAGLE's `midlayer.*` and vLLM's `layers.N.*`, with or without `model.`, as `layers.N.*`."""
    name = name.removeprefix("model.")
    return "layers.0." + name[len("midlayer."):] if name.startswith("midlayer.") else name


def expand_eagle_head(src_dir: str, dst_dir: str, target_hidden_new: int, target_hidden_old: int,
                      layer_map: list[int], hidden: int, num_heads: int, num_kv_heads: int, intermediate: int,
                      dtype="bfloat16", seed: int = 0, *, head_dim: int | None = None, device=None,
                      max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = True) -> list[int]:
    """Writes an EAGLE-3 / P-EAGLE head for the target expanded with ``layer_map``, drafting
    what the source head drafts for the source target. Keeps the number of drafter layers.
    Returns (and records in config.json) the new aux layer ids."""
    what = f"expanding {src_dir}"
    raw = read_json(os.path.join(src_dir, "config.json"), "drafter config.json")
    cfg = Eagle3Config.from_dict(raw)
    Hd0, D, L = cfg.hidden_size, cfg.head_dim, cfg.num_hidden_layers
    if cfg.target_hidden_size != target_hidden_old:
        raise ExpansionError(f"{what}: target_hidden_old={target_hidden_old} but the head reads features of "
                             f"target_hidden_size={cfg.target_hidden_size}")
    _check_grows(what, "target_hidden_new", target_hidden_old, target_hidden_new)
    _check_grows(what, "hidden_size", Hd0, hidden)
    _check_grows(what, "intermediate_size", cfg.intermediate_size, intermediate)
    q_map, kv_map = head_layout(what, cfg.num_attention_heads, cfg.num_key_value_heads, D, Hd0,
                                num_heads, num_kv_heads, hidden, head_dim)
    old_aux = list(cfg.aux_layer_ids) if cfg.aux_layer_ids is not None else list(default_aux_layers(len(layer_map)))
    bad = [i for i in old_aux if not 0 <= i < len(layer_map)]
    if bad:
        raise ExpansionError(f"{what}: aux layer ids {old_aux} include {bad}, outside the {len(layer_map)} "
                             "layers of layer_map")
    new_aux = [layer_map[i] for i in old_aux]
    n_aux = len(old_aux)
    dtype = parse_dtype(dtype)

    tensors = {_head_name(k): v for k, v in _load_tensors(src_dir).items()}
    own_embedding = "embed_tokens.weight" in tensors
    if not own_embedding and hidden != target_hidden_new:
        raise ExpansionError(f"{what}: the head has no embed_tokens, so it uses the target's embedding of width "
                             f"target_hidden_new={target_hidden_new}; its hidden={hidden} must equal that")
    Ht0, Ht, Vd = target_hidden_old, target_hidden_new, cfg.draft_vocab_size
    q0, kv0 = cfg.num_attention_heads * D, cfg.num_key_value_heads * D
    expected = {"fc.weight": (Hd0, n_aux * Ht0), "norm.weight": (Hd0,), "lm_head.weight": (Vd, Hd0)}
    expected.update(_layer_shapes("layers.0.", Hd0, q0, kv0, cfg.intermediate_size, 2 * Hd0, norms=FIRST_LAYER_NORMS))
    for i in range(1, L):
        expected.update(_layer_shapes(f"layers.{i}.", Hd0, q0, kv0, cfg.intermediate_size, Hd0))
    extras = {"d2t": (Vd,), "t2d": (cfg.vocab_size,), "mask_hidden": (1, n_aux * Ht0),
              "embed_tokens.weight": (cfg.vocab_size, Hd0)}
    expected.update({k: v for k, v in extras.items() if k in tensors})
    _check_tensors(what, tensors, expected)

    device = _default_device(device)
    b = TensorBuilder(seed, device, dtype)
    scale = math.sqrt(Hd0 / hidden)
    hid = slice(0, Hd0)
    feature_cols = torch.cat([i * Ht + torch.arange(Ht0, device=device) for i in range(n_aux)])
    first_in = torch.cat([torch.arange(Hd0, device=device), hidden + torch.arange(Hd0, device=device)])
    geo = dict(hidden=hidden, q_size=num_heads * D, kv_size=num_kv_heads * D, intermediate=intermediate,
               q_rows=b.units(q_map, D), kv_rows=b.units(kv_map, D), old_hidden=Hd0,
               old_intermediate=cfg.intermediate_size, norm_scale=scale)
    layer_geos = [LayerGeometry(**geo, in_width=2 * hidden, in_cols=first_in, norms=FIRST_LAYER_NORMS)]
    layer_geos += [LayerGeometry(**geo, in_width=hidden, in_cols=hid) for _ in range(1, L)]
    fc_shape = (hidden, n_aux * Ht)
    plan = []
    if own_embedding:
        plan.append(PlannedTensor("embed_tokens.weight", (cfg.vocab_size, hidden), dtype, lambda: b.writes(
            tensors["embed_tokens.weight"], (cfg.vocab_size, hidden), slice(None), hid)))
    plan.append(PlannedTensor("fc.weight", fc_shape, dtype,
                              lambda: b.projection(tensors["fc.weight"], fc_shape, Hd0, feature_cols)))
    for i, g in enumerate(layer_geos):
        prefix = f"layers.{i}."
        plan += _layer_plan(prefix, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, g, b)
    plan.append(PlannedTensor("norm.weight", (hidden,), dtype, lambda: b.norm(tensors["norm.weight"], hidden, scale)))
    plan.append(PlannedTensor("lm_head.weight", (Vd, hidden), dtype,
                              lambda: b.reads(tensors["lm_head.weight"], (Vd, hidden), slice(None), hid)))
    if "mask_hidden" in tensors:  # a feature: zero in the padded units, like the target's
        plan.append(PlannedTensor("mask_hidden", (1, n_aux * Ht), dtype, lambda: b.writes(
            tensors["mask_hidden"], (1, n_aux * Ht), slice(None), feature_cols)))
    for name in ("d2t", "t2d"):
        if name in tensors:
            plan.append(PlannedTensor(name, tuple(tensors[name].shape), tensors[name].dtype,
                                      lambda name=name: b.copy(tensors[name])))

    _prepare_dst(src_dir, dst_dir)
    nbytes = write_safetensors(plan, dst_dir, max_shard_bytes, progress)
    num_params = sum(math.prod(t.shape) for t in plan if t.dtype.is_floating_point)
    source = {"hidden_size": Hd0, "num_hidden_layers": L, "num_attention_heads": cfg.num_attention_heads,
              "num_key_value_heads": cfg.num_key_value_heads, "head_dim": D,
              "intermediate_size": cfg.intermediate_size, "target_hidden_size": Ht0,
              "rms_norm_eps": cfg.rms_norm_eps, "aux_layer_ids": old_aux}
    new_cfg = {**raw, "hidden_size": hidden, "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads,
               "head_dim": D, "intermediate_size": intermediate, "target_hidden_size": Ht,
               "rms_norm_eps": cfg.rms_norm_eps * Hd0 / hidden, "torch_dtype": _dtype_name(dtype)}
    # Both places vLLM versions read the aux layers from (parspec's writer does the same).
    new_cfg["eagle_aux_hidden_state_layer_ids"] = new_aux
    new_cfg["eagle_config"] = {**(raw.get("eagle_config") or {}), "eagle_aux_hidden_state_layer_ids": new_aux}
    new_cfg["parspec_expanded_from"] = {
        "source": os.path.normpath(src_dir), "source_shape": source, "target_layer_map": layer_map,
        "query_head_map": q_map, "kv_head_map": kv_map, "seed": seed, "num_parameters": num_params,
        "note": vocab_note(cfg.vocab_size),
    }
    _write_json(os.path.join(dst_dir, "config.json"), new_cfg)
    _write_readme(dst_dir, "Function-preserving expansion of an EAGLE-3 head (parspec.bench.expand)", [
        f"source: `{os.path.normpath(src_dir)}` (hidden {Hd0}, {L} layer(s), {cfg.num_attention_heads}/"
        f"{cfg.num_key_value_heads} heads of {D}, intermediate {cfg.intermediate_size}, target hidden {Ht0})",
        f"this head: hidden {hidden}, {L} layer(s), {num_heads}/{num_kv_heads} heads of {D}, intermediate "
        f"{intermediate}, target hidden {Ht}; {num_params / 1e9:.3f} B parameters, {nbytes / 1e9:.2f} GB",
        f"reads the inputs of target layers {new_aux} (the source's {old_aux} through the target's layer map)",
        "drafts what the source drafts for the unexpanded target (exactly in real arithmetic)",
        vocab_note(cfg.vocab_size) + f"; draft vocabulary {Vd}, d2t/t2d unchanged",
    ])
    return new_aux


# --- an SPD speculation module -------------------------------------------------------------

def spd_partition_preserved(old_bounds: list[int], layer_map: list[int], new_bounds: list[int]) -> bool:
    """The expanded target's stage s starts where source layer old_bounds[s]'s input is: every
    source layer before old_bounds[s] maps before new_bounds[s], every later one at or after it
    (the layers in between are identities), so a feature at depth s is [x; 0] of the source's."""
    return all((layer_map[i] < new_bounds[s]) == (i < old_bounds[s])
               for s in range(1, len(old_bounds) - 1) for i in range(len(layer_map)))


def expand_spd_module(src_dir: str, dst_dir: str, target_hidden_new: int, layer_map: list[int] | None = None,
                      num_layers_new: int | None = None, dtype="bfloat16", seed: int = 0, *, device=None,
                      progress: bool = True) -> list[int]:
    """Writes an SPD module for the expanded target that drafts what the source drafts. Its
    inputs, the target's features and embeddings, become [x; 0]: the per-depth norms get the
    same rescaling as the target's (weights x sqrt(H0/H), eps x H0/H) and the projections' new
    input columns meet zeros (seeded random); its output back to the target's width gets zero
    rows, so the shared final norm and lm_head see [y; 0]. The module's own width is kept.
    With ``layer_map`` / ``num_layers_new``, the expanded target's even split into the same
    number of stages must hold the same source layers in each stage (else ExpansionError).
    Returns the new stage bounds."""
    from parspec.spd.module import SPDModule, SPDModuleConfig, check_weights, read_weights
    from parspec.spd.partition import stage_bounds

    what = f"expanding {src_dir}"
    cfg = SPDModuleConfig.from_pretrained(src_dir)
    H0, n = cfg.target_hidden_size, cfg.num_stages
    _check_grows(what, "target_hidden_new", H0, target_hidden_new)
    new_bounds = cfg.stage_bounds
    if layer_map is not None:
        if len(layer_map) != cfg.target_num_layers:
            raise ExpansionError(f"{what}: layer_map has {len(layer_map)} layers, the module's target "
                                 f"{cfg.target_num_layers}")
        num_layers_new = num_layers_new or layer_map[-1] + 1
        new_bounds = stage_bounds(num_layers_new, n)
        if not spd_partition_preserved(cfg.stage_bounds, layer_map, new_bounds):
            raise ExpansionError(f"{what}: the expanded target's {n} stages {new_bounds} do not hold the source's "
                                 f"stages {cfg.stage_bounds} (layer_map {layer_map}): its features would differ")
    tensors = read_weights(src_dir)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in SPDModule(cfg).state_dict().items()}
    try:
        check_weights(src_dir, tensors, expected)
    except ValueError as e:
        raise ExpansionError(str(e)) from e
    dtype = parse_dtype(dtype)
    b = TensorBuilder(seed, _default_device(device), dtype)
    Hn, h, scale = target_hidden_new, cfg.hidden_size, math.sqrt(H0 / target_hidden_new)

    def in_proj() -> torch.Tensor:
        out = b.reads(None, (n + 1, h, Hn), None, None)
        out[:, :, :H0] = tensors["in_proj"].to(out.device, dtype)
        return out

    def in_norm() -> torch.Tensor:
        out = torch.zeros(n + 1, Hn, device=b.device, dtype=dtype)
        out[:, :H0] = tensors["in_norm"].to(out.device).float() * scale
        return out

    built = {"in_proj": in_proj, "in_norm": in_norm,
             "out_proj.weight": lambda: b.writes(tensors["out_proj.weight"], (Hn, h), slice(0, H0), slice(None))}
    plan = [PlannedTensor(name, (n + 1, h, Hn) if name == "in_proj" else (n + 1, Hn) if name == "in_norm"
                          else (Hn, h) if name == "out_proj.weight" else tuple(t.shape), dtype,
                          built.get(name, lambda t=t: t.to(b.device, dtype)))
            for name, t in tensors.items()]
    os.makedirs(dst_dir, exist_ok=True)
    write_safetensors(plan, dst_dir, progress=progress)
    new_cfg = SPDModuleConfig(**{**{k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
                                 "stage_bounds": new_bounds, "target_hidden_size": Hn,
                                 "feature_norm_eps": cfg.feature_norm_eps * H0 / Hn,
                                 "extra": {**cfg.extra, "parspec_expanded_from": {
                                     "source": os.path.normpath(src_dir), "target_hidden_size": H0,
                                     "stage_bounds": cfg.stage_bounds, "target_layer_map": layer_map, "seed": seed}}})
    _write_json(os.path.join(dst_dir, "config.json"), {**new_cfg.to_dict(), "torch_dtype": _dtype_name(dtype)})
    _write_readme(dst_dir, "Function-preserving expansion of an SPD module (parspec.bench.expand)", [
        f"source: `{os.path.normpath(src_dir)}` (n = {n}, target hidden {H0}, stages {cfg.stage_bounds})",
        f"this module: target hidden {Hn}, stages {new_bounds}; its own width {h} is unchanged",
        "drafts what the source drafts for the unexpanded target (exactly in real arithmetic)",
    ])
    return new_bounds


# --- the reference pair --------------------------------------------------------------------

def expand_reference_pair(src_root: str = DEFAULT_SRC, dst_root: str | None = None, scale: str = "8b",
                          dtype="bfloat16", *, seed: int = 0, device=None, progress: bool = True,
                          max_shard_bytes: int = MAX_SHARD_BYTES) -> dict[str, str]:
    """Expands target/, draft/, eagle3/, p-eagle/ and the SPD modules spd-N/ of ``src_root``
    (those present; target is required) into ``dst_root`` at a preset's shapes. An spd-N whose
    N stages the preset's layer count does not split the same way is skipped, and recorded
    in expansion.json. Returns name -> written directory."""
    if dst_root is None:
        raise ExpansionError("expand_reference_pair needs dst_root, the directory to write")
    if scale not in PRESETS:
        raise ExpansionError(f"unknown scale {scale!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[scale]
    src_target = os.path.join(src_root, "target")
    if not os.path.isdir(src_target):
        raise ExpansionError(f"no target/ in {src_root}: expected the reference pair's layout "
                             "(target/, draft/, eagle3/, p-eagle/)")
    os.makedirs(dst_root, exist_ok=True)
    opts = dict(dtype=dtype, device=device, progress=progress, max_shard_bytes=max_shard_bytes)
    t = preset.target
    out = {"target": os.path.join(dst_root, "target")}
    layer_map = expand_llama(src_target, out["target"], t.hidden, t.num_layers, t.num_heads, t.num_kv_heads,
                             t.intermediate, seed=seed, head_dim=t.head_dim, **opts)
    old_hidden = ModelConfig.from_pretrained(src_target).hidden_size
    h = preset.head
    for k, name in enumerate(("eagle3", "p-eagle")):
        if os.path.isdir(os.path.join(src_root, name)):
            out[name] = os.path.join(dst_root, name)
            expand_eagle_head(os.path.join(src_root, name), out[name], t.hidden, old_hidden, layer_map, h.hidden,
                              h.num_heads, h.num_kv_heads, h.intermediate, seed=seed + 1 + k, head_dim=h.head_dim,
                              **opts)
    skipped = {}
    for name in sorted(os.listdir(src_root)):  # spd-2, spd-4, ...: the SPD modules
        if name.startswith("spd-") and os.path.isfile(os.path.join(src_root, name, "config.json")):
            try:
                expand_spd_module(os.path.join(src_root, name), os.path.join(dst_root, name), t.hidden, layer_map,
                                  t.num_layers, dtype=dtype, seed=seed + 4, device=device, progress=progress)
                out[name] = os.path.join(dst_root, name)
            except ExpansionError as e:  # this preset's depth does not split like the source's
                skipped[name] = str(e)
                print(f"skipped {name}: {e}", file=sys.stderr)
    if os.path.isdir(os.path.join(src_root, "draft")):
        d = preset.draft
        out["draft"] = os.path.join(dst_root, "draft")
        expand_llama(os.path.join(src_root, "draft"), out["draft"], d.hidden, d.num_layers, d.num_heads,
                     d.num_kv_heads, d.intermediate, seed=seed + 3, head_dim=d.head_dim, **opts)
    vocab = ModelConfig.from_pretrained(src_target).vocab_size
    _write_json(os.path.join(dst_root, "expansion.json"), {
        "source": os.path.normpath(src_root), "scale": scale, "dtype": _dtype_name(parse_dtype(dtype)),
        "seed": seed, "preset": asdict(preset), "target_layer_map": layer_map, "models": sorted(out),
        **({"skipped": skipped} if skipped else {}), "note": vocab_note(vocab)})
    _write_readme(dst_root, f"The reference pair expanded to the {scale!r} preset", [
        f"source: `{os.path.normpath(src_root)}`; written by `python -m parspec.bench.expand --scale {scale}`",
        *(f"{name}/: see {name}/README.md" for name in sorted(out)),
        "logits and drafts equal the source pair's (exactly in real arithmetic), so acceptance is the "
        "trained pair's while the bytes moved are the preset's",
        vocab_note(vocab),
    ])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m parspec.bench.expand", description=__doc__.splitlines()[0])
    p.add_argument("--src", default=DEFAULT_SRC, help="the reference pair (target/, draft/, eagle3/, p-eagle/)")
    p.add_argument("--dst", required=True, help="output directory")
    p.add_argument("--scale", default="8b", choices=sorted(PRESETS))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default=None, help="where tensors are built (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0, help="seeds the function-neutral random weights only")
    args = p.parse_args(argv)
    device = _default_device(args.device)
    print(f"expanding {args.src} -> {args.dst} at scale {args.scale!r} ({args.dtype}, built on {device})")
    start = time.perf_counter()
    out = expand_reference_pair(args.src, args.dst, args.scale, args.dtype, seed=args.seed, device=device)
    for name, path in out.items():
        meta = read_json(os.path.join(path, "config.json"), "config.json")["parspec_expanded_from"]
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                   if f.endswith(".safetensors"))
        print(f"  {name:8s} {path}: {meta['num_parameters'] / 1e9:.3f} B parameters, {size / 1e9:.2f} GB")
    vocab = ModelConfig.from_pretrained(out["target"]).vocab_size
    print(f"done in {time.perf_counter() - start:.1f} s; {vocab_note(vocab)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
