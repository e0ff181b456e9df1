"""Training the SPD speculation module (``parspec train-drafter --method spd``).

Data: the target's own continuations (``parspec.train.data``, the same generation and
``--data`` cache as the EAGLE heads). Per batch, ONE dense forward of the target over whole
sequences yields the residual stream of every position at every stage boundary
(:func:`parspec.spd.features.depth_features`) and its logits. Examples: for every position j
and every window size d = 1..n, the window

    [x_j at depth n, x_{j+1} at depth d-1, ..., x_{j+d} at depth 0]  ->  the target at j+d

which is exactly what the runtime shows the module in steady state (d = n) and in the n-1
cycles after a rejection or the prefill (d < n). Teacher forcing with the target's own tokens
is exact here: a draft made behind a wrong in-flight token is dropped anyway, so only
windows of correct tokens ever matter, and their features are the full forward's.

Loss: KL(target || module) over the full vocabulary at every window, windows of each size
weighted equally. Greedy acceptance needs the module's argmax to be the target's; the full
distribution is a denser signal than the one-hot argmax (it also says which tokens come
close), and at the argmax it agrees with it, so distillation alone trains it; held-out top-1
accuracy is reported beside it.

Vectorised: the windows of a whole batch are index tensors (:func:`window_layout`), and each
(position, depth) projection is computed once (``SPDModule.slot_components``), then gathered
into windows; no Python loop over positions."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from parspec.config import ConfigError, ModelConfig, parse_dtype, resolve_device
from parspec.spd.features import depth_features
from parspec.spd.module import MIXERS, SPDModule, SPDModuleConfig, module_bytes
from parspec.train.data import DrafterData

MiB = 1 << 20


@dataclass
class SPDTrainConfig:
    num_stages: int = 2
    hidden_size: int = 256
    intermediate_size: int | None = None  # None: 2 x hidden_size
    num_heads: int = 4
    mixer: str = "mlp"
    context: int = 0  # verified tokens before x_j in the window (SPDModuleConfig.context)
    steps: int = 3000
    batch_size: int = 8
    max_windows: int = 0  # windows scored per step, a seeded sample (0: all)
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int | None = None  # None: 5% of the steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    heldout: int = 64
    eval_every: int = 200
    eval_batch_size: int = 8
    eval_windows: int = 1024  # windows per held-out batch, the same seeded sample every evaluation (0: all)
    seed: int = 0
    device: str = "auto"
    target_dtype: str = "auto"
    save_dtype: str = "bfloat16"
    max_bytes: int = 4 * MiB
    max_train_seconds: float | None = None
    lookahead: int = 1  # 2: predict the token after next (the two-positions-per-pass experiment)
    init_from: str | None = None  # warm start: a saved module of the same shape (weights only)

    def __post_init__(self):
        for name in ("lookahead", "num_stages", "hidden_size", "num_heads", "steps", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if self.mixer not in MIXERS:
            raise ConfigError(f"mixer must be one of {', '.join(MIXERS)}, got {self.mixer!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        for name in ("max_windows", "eval_windows"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: all), got {getattr(self, name)}")
        parse_dtype(self.save_dtype)

    @property
    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)


EAGLE_ONLY = ("resume", "aux_layers", "mask_token_id", "num_kv_heads", "head_dim", "keep_checkpoint", "rebuild_vocab")


def spd_config(args, target: ModelConfig) -> SPDTrainConfig:
    """``parspec train-drafter --method spd`` arguments -> the training config, after checking
    that the module fits ``--max-bytes``; options of the EAGLE trainers are refused by name."""
    given = [name for name in EAGLE_ONLY if getattr(args, name, None) not in (None, False)]
    if given:
        raise ConfigError("--method spd does not take " + ", ".join("--" + g.replace("_", "-") for g in given))
    tc = SPDTrainConfig(
        num_stages=args.num_stages, hidden_size=args.module_hidden_size, intermediate_size=args.intermediate_size,
        num_heads=args.num_heads or 4, mixer=args.mixer, context=args.context, steps=args.steps,
        batch_size=args.batch_size,
        max_windows=args.max_windows, lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, heldout=args.heldout, eval_every=args.eval_every, seed=args.seed,
        device=args.device, target_dtype=args.dtype, save_dtype=args.save_dtype, max_bytes=args.max_bytes,
        max_train_seconds=args.max_train_seconds, init_from=args.init_from, lookahead=args.lookahead)
    module_config(target, tc)
    return tc


def module_config(target: ModelConfig, tc: SPDTrainConfig, extra: dict | None = None) -> SPDModuleConfig:
    if tc.num_stages > target.num_hidden_layers:
        raise ConfigError(f"num_stages={tc.num_stages} exceeds the target's {target.num_hidden_layers} layers")
    cfg = SPDModuleConfig.for_target(target.num_hidden_layers, tc.num_stages, target.hidden_size, target.vocab_size,
                                     hidden_size=tc.hidden_size,
                                     intermediate_size=tc.intermediate_size or 2 * tc.hidden_size,
                                     num_heads=tc.num_heads, mixer=tc.mixer, context=tc.context,
                                     rms_norm_eps=target.rms_norm_eps,
                                     extra=extra or {})
    size = module_bytes(cfg, parse_dtype(tc.save_dtype))
    if size > tc.max_bytes:
        raise ConfigError(f"the SPD module would take {size / MiB:.2f} MiB in {tc.save_dtype}, over the "
                          f"{tc.max_bytes / MiB:.2f} MiB budget (max_bytes); lower hidden_size or intermediate_size")
    return cfg


# --- the windows of a batch ----------------------------------------------------------------

def window_layout(length: int, n: int, device=None, context: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """For anchors j < ``length`` and window sizes d = 1..n: (positions ``[L, n, T]`` of each
    slot, depths ``[L, n, T]`` (-1 = padding), label positions ``[L, n]`` = j + d).

    Slot C + i (i = 0..n) of a window of size d: padding for i < n - d; x_j at depth n for
    i = n - d; then x_{j+k} at depth d - k, which is depth n - i whatever d is. Slot c < C:
    x_{j-C+c} at depth n, padding before the sequence's start."""
    C, T = context, context + n + 1
    j = torch.arange(length, device=device)[:, None, None]
    d = torch.arange(1, n + 1, device=device)[:, None]
    i = torch.arange(T, device=device)[None, :] - C
    start = n - d  # [n, 1]
    depth = torch.where(i < 0, n, torch.where(i < start, -1, torch.where(i == start, n, n - i)))
    offset = torch.where(i < 0, i, (i - start).clamp(min=0))  # [n, T]: position - j
    positions = j + offset[None]
    depth = torch.where(positions < 0, -1, depth[None].expand_as(positions))
    return positions.clamp(min=0), depth, j[:, :, 0] + d[:, 0][None, :]


@dataclass
class Windows:
    """The scored windows of a batch, flattened: row r is window (b[r], anchor[r], size d[r])."""

    b: torch.Tensor
    anchor: torch.Tensor
    d: torch.Tensor  # 1..n
    positions: torch.Tensor  # [N, T]
    depths: torch.Tensor  # [N, T]
    label: torch.Tensor  # [N] position whose target distribution is the label


def batch_windows(lengths: torch.Tensor, L: int, n: int, generator: torch.Generator | None = None,
                  max_windows: int = 0, lookahead: int = 1, context: int = 0) -> Windows:
    """Every window whose label lies inside its sequence (optionally a seeded sample).
    ``lookahead`` 2 labels each window with the token after the next (P-EAGLE's second
    position: the experiment on drafting two in-flight positions from one window)."""
    device = lengths.device
    positions, depth, label = window_layout(L, n, device, context)
    label = label + (lookahead - 1)
    valid = label[None] < lengths[:, None, None]  # [B, L, n]
    b, j, d0 = valid.nonzero(as_tuple=True)
    if max_windows and b.numel() > max_windows:
        keep = torch.randperm(b.numel(), generator=generator)[:max_windows].to(device).sort().values
        b, j, d0 = b[keep], j[keep], d0[keep]
    return Windows(b, j, d0 + 1, positions[j, d0], depth[j, d0], label[j, d0])


def window_inputs(tokens: torch.Tensor, feats: torch.Tensor, w: Windows):
    """The raw module inputs of the windows (what the runtime passes): token ids, depths and
    features ``[N, T, H]`` (the feature of each slot at its depth; zero where it has none)."""
    rows = w.b[:, None]
    ids = torch.where(w.depths >= 0, tokens[rows, w.positions], 0)
    f = feats[rows, w.positions, (w.depths - 1).clamp(min=0)]
    f = torch.where((w.depths >= 1)[..., None], f, 0)
    return ids, w.depths, f


def window_logits(module: SPDModule, tokens: torch.Tensor, feats: torch.Tensor, w: Windows) -> torch.Tensor:
    """The module's logits for the windows, each (position, depth) projection computed once."""
    embed = module.target_parts[0]
    comp = module.slot_components(embed(tokens).to(module.in_proj.dtype), feats.to(module.in_proj.dtype))
    depth = w.depths.clamp(min=0)
    x = module.add_slot_embed(comp[w.b[:, None], w.positions, depth] + module.depth_embed[depth])
    real = w.depths >= 0
    x = torch.where(real[..., None], x, 0)
    return module.head(module.mix(x, real))


# --- training --------------------------------------------------------------------------------

class SPDTrainer:
    def __init__(self, target, target_cfg: ModelConfig, data: DrafterData, tc: SPDTrainConfig, extra: dict):
        self.tc, self.data, self.target = tc, data, target
        self.device = tc.resolved_device
        self.train_idx, self.heldout_idx = data.split(tc.heldout, tc.seed)
        if not self.train_idx:
            raise ConfigError("no training sequences")
        self.cfg = module_config(target_cfg, tc, extra)
        torch.manual_seed(tc.seed)
        self.module = SPDModule(self.cfg).to(self.device)
        self.module.attach_target(target.model.embed_tokens, target.model.norm, target.lm_head)
        if tc.init_from:
            self._warm_start(tc.init_from)
        self.params = list(self.module.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay)
        self.step = 0
        self.metrics: dict = {"train": [], "eval": []}

    def _warm_start(self, path: str) -> None:
        """The weights of a saved module whose shape (config but provenance) is this one's, or,
        with the MLP mixer, of one with fewer context slots: the mixer's columns for the slots
        it lacks start at zero, so the warm-started module computes exactly what the saved one
        did until training teaches it to use them."""
        from parspec.spd.module import read_weights

        theirs = SPDModuleConfig.from_pretrained(path).to_dict()
        mine = self.cfg.to_dict()
        diff = sorted(k for k in set(mine) | set(theirs)
                      if k not in ("parspec_spd", "torch_dtype") and mine.get(k) != theirs.get(k))
        widen = diff == ["context"] and theirs["context"] < mine["context"] and self.cfg.mixer == "mlp"
        if diff and not widen:
            raise ConfigError(f"cannot warm-start from {path}: its module differs in {', '.join(diff)}")
        state = {k: v.to(device=self.device, dtype=torch.float32) for k, v in read_weights(path).items()}
        if widen:
            extra = mine["context"] - theirs["context"]
            h = self.cfg.hidden_size
            value = state["mlp.gate_up.weight"]  # [2I, T*h]: the new slots are the leftmost
            state["mlp.gate_up.weight"] = torch.cat([value.new_zeros(value.shape[0], extra * h), value], dim=1)
        self.module.load_state_dict(state)
        self.cfg.extra["init_from"] = os.path.normpath(path)

    def _batch_indices(self, step: int) -> list[int]:
        n, B = len(self.train_idx), self.tc.batch_size
        g = torch.Generator().manual_seed(self.tc.seed * 7919 + (step * B) // n)
        perm = torch.randperm(n, generator=g).tolist()
        return [self.train_idx[perm[i % n]] for i in range(step * B, (step + 1) * B)]

    def lr_at(self, step: int, seconds: float) -> float:
        from parspec.train.trainer import learning_rate

        return learning_rate(self.tc, step, seconds)

    def batch_loss(self, indices: list[int], generator=None, max_windows: int = 0):
        """(mean KL over the batch's windows, per-d sums {kl, hits, count, resp_hits, resp_count})."""
        n = self.cfg.num_stages
        batch = self.data.batch(indices, self.device)
        feats, normed = depth_features(self.target, batch.tokens, self.cfg.stage_bounds, logits=False)
        w = batch_windows(batch.lengths, batch.tokens.shape[1], n, generator, max_windows, self.tc.lookahead,
                          self.cfg.context)
        with torch.no_grad():
            target_logp = self.target.compute_logits(normed[w.b, w.label]).log_softmax(-1)
        q = window_logits(self.module, batch.tokens, feats, w)
        p = target_logp.exp()
        kl = (p * (target_logp - q.log_softmax(-1))).sum(-1)  # [N]
        counts = torch.bincount(w.d - 1, minlength=n).clamp(min=1).float()
        loss = (kl / counts[w.d - 1]).sum() / n  # each window size weighs the same
        with torch.no_grad():
            hit = (q.argmax(-1) == target_logp.argmax(-1)).double()
            resp = (w.label >= batch.prompt_lens[w.b]).double()
            stats = {name: torch.zeros(n, dtype=torch.float64, device=self.device).index_add_(0, w.d - 1, v)
                     for name, v in (("kl", kl.detach().double()), ("hits", hit), ("count", torch.ones_like(hit)),
                                     ("resp_hits", hit * resp), ("resp_count", resp))}
        return loss, stats

    @staticmethod
    def summary(stats: dict) -> dict:
        c = stats["count"].clamp(min=1)
        return {"kl": (stats["kl"] / c).tolist(), "acc": (stats["hits"] / c).tolist(),
                "response_acc": (stats["resp_hits"] / stats["resp_count"].clamp(min=1)).tolist(),
                "windows": stats["count"].long().tolist()}

    def train_step(self, seconds: float) -> dict:
        lr = self.lr_at(self.step, seconds)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        g = torch.Generator().manual_seed(self.tc.seed * 1_000_003 + self.step)
        loss, stats = self.batch_loss(self._batch_indices(self.step), g, self.tc.max_windows)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.tc.grad_clip)
        self.optimizer.step()
        self.step += 1
        record = {"step": self.step, "loss": float(loss.detach()), "lr": lr, "grad_norm": float(grad_norm),
                  **self.summary(stats)}
        self.metrics["train"].append(record)
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out KL and top-1 agreement with the target per window size d (over a fixed
        sample of ``eval_windows`` windows per batch); the agreement at d on response
        positions is the acceptance rate of a draft made from such a window."""
        self.module.eval()
        idx = self.heldout_idx or self.train_idx[:self.tc.eval_batch_size]
        total = None
        for start in range(0, len(idx), self.tc.eval_batch_size):
            g = torch.Generator().manual_seed(self.tc.seed + 99 + start)
            _, stats = self.batch_loss(idx[start:start + self.tc.eval_batch_size], g, self.tc.eval_windows)
            total = stats if total is None else {k: total[k] + v for k, v in stats.items()}
        self.module.train()
        out = {"step": self.step, **self.summary(total)}
        self.metrics["eval"].append(out)
        return out

    def train(self) -> dict:
        tc = self.tc
        seconds = 0.0
        stopped_early = False
        self.module.train()
        with tqdm(total=tc.steps, desc=f"train spd n={tc.num_stages}", unit="step") as bar:
            while self.step < tc.steps:
                start = time.perf_counter()
                rec = self.train_step(seconds)
                seconds += time.perf_counter() - start
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=" ".join(f"{a:.2f}" for a in rec["acc"]))
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                    ev = self.evaluate()
                    bar.write(f"step {self.step}: held-out acc by window size " +
                              " ".join(f"{a:.3f}" for a in ev["response_acc"]))
                if tc.max_train_seconds and seconds >= tc.max_train_seconds:
                    stopped_early = self.step < tc.steps
                    break
        self.metrics.update(train_seconds=seconds, stopped_early=stopped_early)
        self.metrics["final_eval"] = self.evaluate()
        return self.metrics["final_eval"]

    def save(self, out_dir: str) -> None:
        """Weights and config into a temporary sibling, then renamed in (config last)."""
        os.makedirs(out_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".spd-", dir=out_dir)
        try:
            self.module.save_pretrained(tmp, parse_dtype(self.tc.save_dtype))
            for name in ("model.safetensors", "config.json"):
                os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def train_spd(target_dir: str, out_dir: str, data: DrafterData, tc: SPDTrainConfig, command: str | None = None) -> dict:
    """Train, then write the module (config.json + model.safetensors), metrics.json, loss.png
    and README.md into ``out_dir``; returns the metrics."""
    from parspec.train.trainer import TrainConfig, load_target

    torch.manual_seed(tc.seed)
    target, target_cfg = load_target(target_dir, TrainConfig(device=tc.device, target_dtype=tc.target_dtype))
    extra = {"target": os.path.normpath(target_dir), "trained_by": "parspec train-drafter --method spd"}
    if tc.lookahead != 1:  # an experiment's module: the loader refuses it for drafting
        extra["lookahead"] = tc.lookahead
    trainer = SPDTrainer(target, target_cfg, data, tc, extra)
    size = module_bytes(trainer.cfg, parse_dtype(tc.save_dtype))
    print(f"SPD module: n={tc.num_stages}, stage bounds {trainer.cfg.stage_bounds}, mixer {tc.mixer}, hidden "
          f"{tc.hidden_size}, {size / MiB:.2f} MiB in {tc.save_dtype}")
    trainer.train()
    trainer.save(out_dir)
    metrics = trainer.metrics
    metrics.update({"method": "spd", "command": command, "config": asdict(tc), "module": trainer.cfg.to_dict(),
                    "module_bytes": size, "steps_done": trainer.step,
                    "data": {**data.meta, "sequences": len(data), "tokens": data.num_tokens,
                             "train_sequences": len(trainer.train_idx),
                             "heldout_sequences": len(trainer.heldout_idx)}})
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    plot_spd_metrics(metrics, os.path.join(out_dir, "loss.png"))
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(render_spd_card(metrics))
    return metrics


# --- report ----------------------------------------------------------------------------------

def plot_spd_metrics(metrics: dict, path: str) -> bool:
    from parspec.train.report import plot_curves

    n = metrics["config"]["num_stages"]
    return plot_curves(metrics, path, loss_label="mean KL", series=lambda d: f"window d={d + 1}",
                       title=f"SPD module n={n}: training KL (moving average)", acc_key="response_acc",
                       acc_title="held-out top-1 agreement with the target (responses)")


def render_spd_card(m: dict) -> str:
    cfg, mod, data, ev = m["config"], m["module"], m["data"], m["final_eval"]
    n = cfg["num_stages"]
    rows = "\n".join(f"| {d + 1} | {ra:.3f} | {a:.3f} | {kl:.3f} | {w} |" for d, (ra, a, kl, w) in
                     enumerate(zip(ev["response_acc"], ev["acc"], ev["kl"], ev["windows"])))
    stopped = " (stopped at the time budget)" if m.get("stopped_early") else ""
    heads = f", {mod['num_heads']} heads" if mod["mixer"] == "attention" else ""
    windows = f", {cfg['max_windows']} sampled windows a step" if cfg["max_windows"] else ""
    warm = f"Warm-started from `{cfg['init_from']}`; the steps and time here are this run's alone.\n" \
        if cfg.get("init_from") else ""
    return f"""# SPD speculation module (n = {n} pipeline stages)

Trained with `parspec train-drafter --method spd` on the target's own outputs.

```
{m.get('command') or '(called from Python)'}
```

Use it with `--pipeline-parallel-size {n} --speculative-config '{{"method": "spd", "model": "<this directory>"}}'`.

## Module

- {m['module_bytes'] / 2**20:.2f} MiB ({cfg['save_dtype']}), config.json + model.safetensors; the target's embedding,
  final norm and lm_head are shared, not stored
- reads the window [x_j at depth {n}, in-flight tokens at depths d-1..0] (left-padded to {n + 1} slots) from
  the target split at layers {mod['stage_bounds']}
- per-depth projections ({n + 1} x {mod['target_hidden_size']} -> {mod['hidden_size']}), depth embedding, mixer
  `{mod['mixer']}` (intermediate {mod['intermediate_size']}{heads}),
  then back to {mod['target_hidden_size']} through the target's final norm and lm_head

## Data

{data['sequences']} sequences ({data['tokens']} tokens): {data.get('num_prompts')} prompts from `{data.get('corpus')}`,
responses of up to {data.get('max_new_tokens')} tokens generated by the target ({data.get('greedy_fraction')} greedy);
{data['heldout_sequences']} sequences held out.

## Training

{warm}{m['steps_done']} steps of {cfg['batch_size']} sequences{windows},
AdamW lr {cfg['lr']} (warm-up, cosine), KL(target || module) over the full vocabulary, every
window of every size d = 1..{n} at every position, sizes weighted equally. Training time
{m.get('train_seconds', 0):.0f} s{stopped}.

## Held-out results

Top-1 agreement with the target's greedy token per window size d (d = {n} is the steady
state; d < {n} are the cycles after a rejection). On response positions this is the
acceptance rate of a draft made from such a window.

| window d | top-1 (responses) | top-1 (all) | KL (nats) | windows |
|---|---|---|---|---|
{rows}

The cycle-exact figures (tokens per cycle, ideal speed-up) come from `benchmarks/spd_acceptance.py`.

![loss](loss.png)
"""
