"""The SPD speculation module: the next token from a window of in-flight tokens' features.

Row b of a call is the window of one sequence, ``T = C + n + 1`` slots, oldest first: C
context slots, then the in-flight part LEFT-padded to n + 1 slots:

    [x_{j-C}, ..., x_{j-1} at depth n,   x_j at depth n, x_{j+1} at depth d-1, ..., x_{j+d} at depth 0]

(d in 1..n; C = ``context``, 0 by default: the tokens verified before x_j, whose final
features rank 0 keeps anyway; a context slot before the sequence's start is padding). A
context slot's place says how far before x_j it is, whatever d is.

``depths[b, i]`` is -1 for padding (token id and feature ignored), 0 for a token whose only
input is its id, 1..n for a token whose residual stream at that depth is in ``feats``. The
module predicts x_{j+d+1}.

Architecture (all widths but the shared output are the module's own ``hidden_size`` h):
  slot vector  = W_0 norm_0(embed(token))                      every real slot
               + W_s norm_s(feature)      for its depth s >= 1 (a projection per depth)
               + depth_embed[s]
  mixer        "attention": one pre-norm block over the T slots (the newest slot queries the
               real ones, then a gated MLP); "mlp": a gated MLP over the T slot vectors
               concatenated (left padding zeroed), added to the newest slot; the fixtures
               use "mlp", ahead on held-out top-1 in a side-by-side run (fixtures/README.md)
  output       out_proj (h -> H) -> the target's final norm -> the target's lm_head

The embedding, final norm and lm_head are the target's (shared, never stored). Shapes are
fixed by (B, n), and no step reads a value back to the host, so a runtime can capture a
call in a CUDA graph. The per-depth projection of each slot is computed for every depth and
selected (a [B, T, n, h] einsum): at B <= 8 that is cheaper than gathering [B, T, h, H]
weights; training computes each (position, depth) projection once instead
(:meth:`SPDModule.slot_components`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from parspec.config import ConfigError
from parspec.loader import LoadError
from parspec.models.layers import RMSNorm
from parspec.spd.partition import stage_bounds as default_stage_bounds

ARCHITECTURE = "SPDModule"
MIXERS = ("attention", "mlp")
CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def _positive_int(cfg: dict, key: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"SPD module config: {key}={value!r} must be an integer >= 1")
    return value


@dataclass
class SPDModuleConfig:
    num_stages: int  # n: the window holds T = context + n + 1 slots
    stage_bounds: list[int]  # the target's partition the features come from (partition.stage_bounds)
    target_hidden_size: int  # H
    vocab_size: int  # the target's
    hidden_size: int = 256  # h
    intermediate_size: int = 512
    num_heads: int = 4  # attention mixer only
    mixer: str = "attention"
    context: int = 0  # C: verified tokens before x_j in the window, at depth n
    rms_norm_eps: float = 1e-5
    feature_norm_eps: float | None = None  # the norms of the target's features; None: rms_norm_eps
    extra: dict = field(default_factory=dict)  # provenance (training data, target), carried through

    def __post_init__(self):
        n = self.num_stages
        b = self.stage_bounds
        if not (isinstance(b, list) and len(b) == n + 1 and all(isinstance(x, int) for x in b)
                and b[0] == 0 and all(x < y for x, y in zip(b, b[1:]))):
            raise ConfigError(f"SPD module config: stage_bounds={b!r} must be {n + 1} increasing layer "
                              f"indices starting at 0 (num_stages={n})")
        if self.mixer not in MIXERS:
            raise ConfigError(f"SPD module config: mixer={self.mixer!r} must be one of {', '.join(MIXERS)}")
        if self.mixer == "attention" and self.hidden_size % self.num_heads:
            raise ConfigError(f"SPD module config: hidden_size={self.hidden_size} is not a multiple of "
                              f"num_heads={self.num_heads}")
        if not isinstance(self.context, int) or isinstance(self.context, bool) or self.context < 0:
            raise ConfigError(f"SPD module config: context={self.context!r} must be an integer >= 0")
        if self.feature_norm_eps is None:
            self.feature_norm_eps = self.rms_norm_eps
        for name in ("rms_norm_eps", "feature_norm_eps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"SPD module config: {name}={getattr(self, name)!r} must be > 0")

    @property
    def window(self) -> int:
        return self.context + self.num_stages + 1

    @property
    def target_num_layers(self) -> int:
        return self.stage_bounds[-1]

    @classmethod
    def for_target(cls, num_layers: int, num_stages: int, target_hidden_size: int, vocab_size: int,
                   **sizes) -> SPDModuleConfig:
        return cls(num_stages, default_stage_bounds(num_layers, num_stages), target_hidden_size, vocab_size, **sizes)

    @classmethod
    def from_dict(cls, cfg: dict) -> SPDModuleConfig:
        arch = (cfg.get("architectures") or [None])[0]
        if arch != ARCHITECTURE:
            raise ConfigError(f"SPD module config: architectures={cfg.get('architectures')!r}, expected "
                              f"[{ARCHITECTURE!r}]")
        ints = {k: _positive_int(cfg, k) for k in ("num_stages", "target_hidden_size", "vocab_size", "hidden_size",
                                                    "intermediate_size", "num_heads")}
        bounds = cfg.get("stage_bounds")
        eps = {k: cfg.get(k, cfg.get("rms_norm_eps", 1e-5)) for k in ("rms_norm_eps", "feature_norm_eps")}
        for k, v in eps.items():
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise ConfigError(f"SPD module config: {k}={v!r} must be a number")
        return cls(stage_bounds=list(bounds) if isinstance(bounds, (list, tuple)) else bounds,
                   mixer=cfg.get("mixer", "attention"), context=cfg.get("context", 0),
                   rms_norm_eps=float(eps["rms_norm_eps"]),
                   feature_norm_eps=float(eps["feature_norm_eps"]), extra=cfg.get("parspec_spd", {}) or {}, **ints)

    def to_dict(self) -> dict:
        out = {"architectures": [ARCHITECTURE], **asdict(self), "torch_dtype": "bfloat16"}
        out["parspec_spd"] = out.pop("extra")
        return out

    @classmethod
    def from_pretrained(cls, path: str) -> SPDModuleConfig:
        file = os.path.join(path, CONFIG_FILE)
        if not os.path.isfile(file):
            raise LoadError(f"SPD module {path}: no {CONFIG_FILE}")
        try:
            with open(file, encoding="utf-8") as f:
                raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"SPD module {file} is not valid JSON: {e}") from e
        return cls.from_dict(raw)


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class GatedMLP(nn.Module):
    def __init__(self, in_size: int, intermediate: int, out_size: int):
        super().__init__()
        self.gate_up = nn.Linear(in_size, 2 * intermediate, bias=False)
        self.down = nn.Linear(intermediate, out_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class SlotAttention(nn.Module):
    """The newest slot attends over the window's real slots (no rope: depth embeddings say
    which slot is which)."""

    def __init__(self, h: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, h // num_heads
        self.q = nn.Linear(h, h, bias=False)
        self.kv = nn.Linear(h, 2 * h, bias=False)
        self.o = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        B, T, h = x.shape
        q = self.q(x[:, -1:]).view(B, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(B, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # The newest slot always may attend (to itself), so an all-padding row (a runtime's
        # unused batch row) gives finite logits instead of NaN.
        allowed = real.clone()
        allowed[:, -1] = True
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :])
        return self.o(o.transpose(1, 2).reshape(B, h))


class SPDModule(nn.Module):
    def __init__(self, cfg: SPDModuleConfig):
        super().__init__()
        self.config = cfg
        n, H, h = cfg.num_stages, cfg.target_hidden_size, cfg.hidden_size
        # Row 0 normalises / projects the token's embedding, row s the feature at depth s.
        self.in_norm = nn.Parameter(torch.ones(n + 1, H))
        self.in_proj = nn.Parameter(torch.empty(n + 1, h, H).normal_(0, H ** -0.5))
        self.depth_embed = nn.Parameter(torch.zeros(n + 1, h))
        if cfg.mixer == "attention" and cfg.context:  # attention alone does not see the slots' order
            self.slot_embed = nn.Parameter(torch.zeros(cfg.window, h))
        if cfg.mixer == "attention":
            self.attn_norm = RMSNorm(h, cfg.rms_norm_eps)
            self.attn = SlotAttention(h, cfg.num_heads)
            self.mlp_norm = RMSNorm(h, cfg.rms_norm_eps)
            self.mlp = GatedMLP(h, cfg.intermediate_size, h)
        else:
            self.mlp_norm = RMSNorm(h, cfg.rms_norm_eps)
            self.mlp = GatedMLP(cfg.window * h, cfg.intermediate_size, h)
        self.out_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(h, H, bias=False)
        # The target's, shared (set by from_pretrained or attach_target; never saved).
        self.target_parts: tuple[nn.Module, nn.Module, nn.Module] | None = None

    def attach_target(self, embed: nn.Module, norm: nn.Module, lm_head: nn.Module) -> SPDModule:
        self.target_parts = (embed, norm, lm_head)
        return self

    def _target(self):
        if self.target_parts is None:
            raise RuntimeError("SPDModule has no target embedding / norm / lm_head: call attach_target")
        return self.target_parts

    # --- slot vectors ---------------------------------------------------------------------
    def _project(self, x: torch.Tensor, row: int | slice) -> torch.Tensor:
        """in_proj[row] (norm_row(x)); ``row`` a slice gives every depth: [..., k, h]."""
        eps = self.config.feature_norm_eps
        if isinstance(row, int):
            return F.linear(_rms(x, eps) * self.in_norm[row], self.in_proj[row])
        w, g = self.in_proj[row], self.in_norm[row]  # [k, h, H], [k, H]
        return torch.einsum("...kH,khH->...kh", _rms(x, eps)[..., None, :] * g, w)

    def slot_components(self, embeds: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Training's shared half: ``embeds [..., H]`` of tokens and their features at every
        depth ``feats [..., n, H]`` -> ``[..., n + 1, h]``, entry s the slot vector (before the
        depth embedding) of that token at depth s."""
        e = self._project(embeds, 0)
        f = self._per_depth(feats)
        return torch.cat([e[..., None, :], e[..., None, :] + f], dim=-2)

    def _per_depth(self, feats: torch.Tensor) -> torch.Tensor:
        """W_s norm_s(feats[..., s-1, :]) for s = 1..n: [..., n, h]."""
        eps = self.config.feature_norm_eps
        x = _rms(feats, eps) * self.in_norm[1:]
        return torch.einsum("...kH,khH->...kh", x, self.in_proj[1:])

    def slot_vectors(self, token_ids: torch.Tensor, depths: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """[B, T, h] slot vectors of a window, padding zeroed."""
        embed, _, _ = self._target()
        real, has_feat = depths >= 0, depths >= 1
        dtype = self.in_proj.dtype
        e = self._project(embed(torch.where(real, token_ids, 0)).to(dtype), 0)
        feats = torch.where(has_feat[..., None], feats.to(dtype), 0)
        every = self._project(feats, slice(1, None))  # [B, T, n, h]: each slot at every depth
        pick = (depths - 1).clamp(min=0)[..., None, None].expand(*depths.shape, 1, every.shape[-1])
        f = every.gather(-2, pick).squeeze(-2)
        x = e + torch.where(has_feat[..., None], f, 0) + self.depth_embed[depths.clamp(min=0)]
        return torch.where(real[..., None], self.add_slot_embed(x), 0)

    def add_slot_embed(self, x: torch.Tensor) -> torch.Tensor:
        """[..., T, h] + the slot embedding (attention mixer with context only)."""
        return x + self.slot_embed if hasattr(self, "slot_embed") else x

    # --- mixer and output -----------------------------------------------------------------
    def mix(self, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """[B, T, h] slot vectors (padding zero) -> [B, h], the newest slot's output."""
        if self.config.mixer == "attention":
            y = x[:, -1] + self.attn(self.attn_norm(x), real)
            return y + self.mlp(self.mlp_norm(y))
        z = torch.where(real[..., None], self.mlp_norm(x), 0).flatten(1)
        return x[:, -1] + self.mlp(z)

    def head(self, y: torch.Tensor) -> torch.Tensor:
        """[..., h] -> float32 logits over the target's vocabulary, through its norm and lm_head."""
        _, norm, lm_head = self._target()
        out = self.out_proj(self.out_norm(y))
        return lm_head(norm(out.to(norm.weight.dtype))).float()

    def forward(self, token_ids: torch.Tensor, depths: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """``token_ids, depths [B, T]``, ``feats [B, T, H]`` -> float32 logits [B, V] of the
        token after the window's newest one."""
        return self.head(self.mix(self.slot_vectors(token_ids, depths, feats), depths >= 0))

    # --- checkpoint -----------------------------------------------------------------------
    def weights(self) -> dict[str, torch.Tensor]:
        """The module's own tensors (the target's shared parts are not among its parameters)."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}

    def save_pretrained(self, path: str, dtype: torch.dtype = torch.bfloat16) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        save_file({k: v.to(dtype) for k, v in self.weights().items()}, os.path.join(path, WEIGHTS_FILE),
                  metadata={"format": "pt"})
        os.chmod(os.path.join(path, WEIGHTS_FILE), 0o644)  # safetensors writes 0600
        with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump({**self.config.to_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}, f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, path: str, target_embed: nn.Module, target_norm: nn.Module, target_lm_head: nn.Module,
                        device=None, dtype: torch.dtype = torch.float32) -> SPDModule:
        """Loads ``path`` (config.json + model.safetensors) and shares the target's embedding,
        final norm and lm_head, whose widths must match the module's config."""
        cfg = SPDModuleConfig.from_pretrained(path)
        if cfg.extra.get("lookahead", 1) != 1:
            raise ConfigError(f"SPD module {path} was trained to predict lookahead={cfg.extra['lookahead']} tokens "
                              "ahead (an experiment); drafting needs the next token's module")
        vocab, width = target_embed.weight.shape
        if (vocab, width) != (cfg.vocab_size, cfg.target_hidden_size):
            raise ConfigError(f"SPD module {path}: built for a target of vocab_size={cfg.vocab_size}, hidden_size="
                              f"{cfg.target_hidden_size}; this target's embedding is {vocab} x {width}")
        tensors = read_weights(path)
        with torch.device("meta"):
            model = cls(cfg)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        check_weights(path, tensors, expected)
        model = model.to_empty(device=device or "cpu")
        model.load_state_dict({k: t.to(dtype) for k, t in tensors.items()})
        model = model.to(dtype)
        return model.attach_target(target_embed, target_norm, target_lm_head).eval()


def read_weights(path: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    file = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(file):
        raise LoadError(f"SPD module {path}: no {WEIGHTS_FILE}")
    try:
        with safe_open(file, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a bad file
        raise LoadError(f"SPD module {file} cannot be read: {e}") from e


def check_weights(path: str, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Names and shapes exactly as the config implies; floating-point tensors only."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise LoadError(f"SPD module {path}: {WEIGHTS_FILE} lacks {', '.join(missing)}")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise LoadError(f"SPD module {path}: {WEIGHTS_FILE} has unexpected tensor(s) {', '.join(unknown)}")
    for name, shape in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise LoadError(f"SPD module {path}: {name} has shape {tuple(t.shape)}, its config implies {shape}")
        if not t.is_floating_point():
            raise LoadError(f"SPD module {path}: {name} is {t.dtype}, expected a floating-point tensor")


def module_bytes(cfg: SPDModuleConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    with torch.device("meta"):
        model = SPDModule(cfg)
    return sum(t.numel() for t in model.state_dict().values()) * dtype.itemsize
