"""Training an EAGLE-3 head (sequential drafting, training-time test) or a P-EAGLE head
(parallel drafting: all K depths from one forward) on a target's own outputs.

The drafter's embedding is the target's, shared and frozen (not saved). Its lm_head starts
from the target's rows of the draft vocabulary and its final norm from the target's (same
width), P-EAGLE's mask_hidden from the mean real feature. AdamW, linear warm-up then
cosine decay (over the steps, or over a time budget), gradient clipping, bf16 autocast on
CUDA (float32 on CPU). Every random choice (batch order, depth subsampling) is a function
of (seed, step), so a run resumed
from a checkpoint continues exactly as the uninterrupted run would (without a time
budget, which makes the learning-rate schedule depend on the clock).

Checkpoints (``OUT/checkpoint/``): drafter.safetensors + optimizer.safetensors (AdamW
moments) + trainer_state.json, swapped in whole (see ``save_checkpoint``); one is saved on
Ctrl-C and before the head is written, so no finished step is lost. Output: ``save_eagle3``
layout (config.json + model.safetensors) + metrics.json + loss.png + README.md."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from parspec.config import ConfigError, ModelConfig, parse_dtype, resolve_device
from parspec.models.drafter import Eagle3Config, Eagle3Drafter, default_aux_layers, load_eagle3, save_eagle3
from parspec.train.data import (Batch, DrafterData, DraftVocab, build_draft_vocab, capture, pick_mask_token,
                                vocab_of)
from parspec.train.layout import depth_keep_fractions, make_plan, segment_bounds
from parspec.train.objective import DepthStats, segment_loss

METHODS = ("eagle3", "p-eagle")
REFINE_EVAL_PASSES = 2  # refinement passes scored in evaluation (besides teacher forcing)
MiB = 1 << 20
CHECKPOINT = "checkpoint"  # under OUT; CHECKPOINT.tmp is one being written, CHECKPOINT.old one being replaced


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training, raised once the checkpoint of the last finished step is saved."""

    def __init__(self, checkpoint_dir: str, step: int):
        super().__init__(f"training interrupted at step {step}; checkpoint saved in {checkpoint_dir}")
        self.checkpoint_dir, self.step = checkpoint_dir, step


# --- the output directory --------------------------------------------------------------------

def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover_checkpoint(out_dir: str) -> None:
    """Undo a crash inside ``save_checkpoint``: a half-written CHECKPOINT.tmp is dropped, and
    a CHECKPOINT.old left between the two renames is the whole previous checkpoint."""
    final = os.path.join(out_dir, CHECKPOINT)
    old, tmp = final + ".old", final + ".tmp"
    if os.path.isdir(old):
        if os.path.isdir(final):
            shutil.rmtree(old)
        else:
            os.replace(old, final)
    if os.path.isdir(tmp):
        shutil.rmtree(tmp)


def check_out_dir(out_dir: str, resume: bool = False, overwrite: bool = False) -> None:
    """Before any data generation or training: OUT must be a directory that can be created
    and written, and an earlier run's checkpoint or head in it is continued or replaced only
    when asked."""
    if resume and overwrite:
        raise ConfigError("give --resume (continue from the checkpoint in --out) or --overwrite (start over), not both")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--out {out_dir} cannot be created: {existing} exists and is not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(f"--out {out_dir} is not writable: cannot create a file in {existing} ({e.strerror})") from e
    if existing != os.path.abspath(out_dir):
        return
    recover_checkpoint(out_dir)
    checkpoint, head = os.path.join(out_dir, CHECKPOINT), os.path.join(out_dir, "model.safetensors")
    has_checkpoint = os.path.isfile(os.path.join(checkpoint, "trainer_state.json"))
    if overwrite or (resume and has_checkpoint) or not (has_checkpoint or os.path.isfile(head)):
        return
    if has_checkpoint:
        raise ConfigError(f"{out_dir} already holds a training checkpoint ({checkpoint}): pass --resume to "
                          "continue from it, or --overwrite to start over and replace it")
    raise ConfigError(f"{out_dir} already holds a trained head ({head}) and no checkpoint to --resume from: pass "
                      f"--overwrite to replace it, or choose another --out (--init-from {out_dir} warm-starts from it)")


VOCAB_FROM = ("sequences", "responses")


@dataclass
class TrainConfig:
    method: str = "p-eagle"
    num_speculative_tokens: int = 7  # depths (P-EAGLE) / TTT steps (EAGLE-3) trained
    draft_vocab_size: int = 2048
    intermediate_size: int | None = None  # None: 1.5 x the target's hidden size
    num_layers: int = 1
    num_heads: int | None = None  # attention shape of the head's layers; None: the target's
    num_kv_heads: int | None = None
    head_dim: int | None = None
    init_from: str | None = None  # warm start: a saved head of the same shape (weights only)
    vocab_from: str = "sequences"  # draft vocabulary: most frequent in whole sequences, or in "responses"
    rebuild_vocab: bool = False  # warm start: pick a new draft vocabulary from this data (else keep the head's)
    aux_layers: tuple[int, ...] | None = None  # None: EAGLE-3's default, spread if it repeats
    mask_token_id: int | None = None  # None: a spare special token of the tokenizer
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int | None = None  # None: 5% of the steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    depth_decay: float = 0.8
    deep_keep: float = 0.7  # P-EAGLE keeps deep_keep^d of the anchors at depth d ...
    deep_min_keep: float = 0.2  # ... and at least this fraction
    deep_greedy_only: bool = False  # P-EAGLE: depths >= 1 only where the tokens they skip are greedy output
    chain_weight: float = 0.0  # P-EAGLE: scale depth d by 1 - w + w * P(drafter right at depths < d)
    refine_share: float = 0.0  # P-EAGLE: share of anchors whose depths >= 1 get the real token, not the mask
    segment_len: int = 256  # anchors per segment; 0 = whole sequences
    heldout: int = 128  # held-out sequences (at most a fifth of the data)
    eval_every: int = 500
    eval_batch_size: int = 16
    checkpoint_every: int = 1000
    seed: int = 0
    device: str = "auto"
    target_dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    save_dtype: str = "bfloat16"
    max_bytes: int = 8 * MiB  # saved head (embedding excluded)
    init_from_target: bool = True
    max_train_seconds: float | None = None  # time budget: the schedule completes within it
    keep_checkpoint: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ConfigError(f"num_speculative_tokens must be an integer >= 1, got {k!r}")
        for name in ("draft_vocab_size", "num_layers", "steps", "batch_size", "eval_batch_size", "num_heads",
                     "num_kv_heads", "head_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not (0 < self.deep_keep <= 1 and 0 < self.deep_min_keep <= 1):
            raise ConfigError(f"deep_keep and deep_min_keep must be in (0, 1], got {self.deep_keep}, "
                              f"{self.deep_min_keep}")
        if self.deep_greedy_only and self.method != "p-eagle":
            raise ConfigError("deep_greedy_only is a P-EAGLE option (EAGLE-3's training-time test feeds the "
                              f"real tokens in), got method {self.method!r}")
        if self.vocab_from not in VOCAB_FROM:
            raise ConfigError(f"vocab_from must be one of {', '.join(VOCAB_FROM)}, got {self.vocab_from!r}")
        if self.rebuild_vocab and not self.init_from:
            raise ConfigError("rebuild_vocab re-picks a warm start's draft vocabulary; without init_from the "
                              "vocabulary is picked from the data anyway")
        if not 0 <= self.chain_weight <= 1:
            raise ConfigError(f"chain_weight must be in [0, 1], got {self.chain_weight}")
        if self.chain_weight and self.method != "p-eagle":
            raise ConfigError("chain_weight is a P-EAGLE option (EAGLE-3's training-time test scores one depth "
                              f"per pass), got method {self.method!r}")
        if not 0 <= self.refine_share <= 1:
            raise ConfigError(f"refine_share must be in [0, 1], got {self.refine_share}")
        if self.refine_share and self.method != "p-eagle":
            raise ConfigError("refine_share trains P-EAGLE's refinement passes (EAGLE-3's training-time test feeds "
                              f"the real tokens in already), got method {self.method!r}")
        if self.num_heads is not None and self.num_kv_heads is not None and self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.segment_len < 0:
            raise ConfigError(f"segment_len must be >= 0 (0: whole sequences), got {self.segment_len}")
        parse_dtype(self.save_dtype)

    @property
    def resolved_device(self) -> torch.device:
        return resolve_device(self.device)


def refine_summary(ev: dict) -> str:
    """The refinement figures of an evaluation, for a log line ('' without them)."""
    return "".join(f"; {mode}: ~{r['acceptance_length']:.2f}" for mode, r in ev.get("refine", {}).items()
                   if r["acceptance_length"])


# --- the head's shape ------------------------------------------------------------------------

def pick_aux_layers(num_layers: int) -> tuple[int, ...]:
    """EAGLE-3's (2, L//2, L-3) when those are distinct; else low/middle/last-layer inputs
    spread over a shallow target (5 layers: 1, 2, 4)."""
    default = default_aux_layers(num_layers)
    if len(set(default)) == 3 and min(default) >= 0:
        return default
    if num_layers >= 4:
        return (1, num_layers // 2, num_layers - 1)
    return tuple(range(num_layers))


def drafter_config(target: ModelConfig, tc: TrainConfig, mask_token_id: int | None) -> Eagle3Config:
    aux = tuple(tc.aux_layers) if tc.aux_layers else pick_aux_layers(target.num_hidden_layers)
    bad = [i for i in aux if not 0 <= i < target.num_hidden_layers]
    if bad:
        raise ConfigError(f"aux layers {bad} are outside the target's {target.num_hidden_layers} layers")
    if tc.draft_vocab_size > target.vocab_size:
        raise ConfigError(f"draft vocabulary size {tc.draft_vocab_size} exceeds the target's vocabulary "
                          f"({target.vocab_size})")
    parallel = tc.method == "p-eagle"
    return Eagle3Config(
        hidden_size=target.hidden_size, intermediate_size=tc.intermediate_size or target.hidden_size * 3 // 2,
        num_attention_heads=tc.num_heads or target.num_attention_heads,
        num_key_value_heads=tc.num_kv_heads or min(target.num_key_value_heads, tc.num_heads or target.num_attention_heads),
        head_dim=tc.head_dim or target.head_dim, vocab_size=target.vocab_size, draft_vocab_size=tc.draft_vocab_size,
        target_hidden_size=target.hidden_size, num_hidden_layers=tc.num_layers, rms_norm_eps=target.rms_norm_eps,
        rope_theta=target.rope_theta, rope_scaling=target.rope_scaling,
        max_position_embeddings=target.max_position_embeddings, aux_layer_ids=aux,
        parallel_drafting=parallel, mask_token_id=(mask_token_id if mask_token_id is not None else 0)
        if parallel else None)


def head_bytes(cfg: Eagle3Config, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the saved head: float tensors in ``dtype``, d2t/t2d as they are, no embedding."""
    with torch.device("meta"):
        model = Eagle3Drafter(cfg)
    return sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
               for name, t in model.state_dict().items() if not name.startswith("embed_tokens."))


def check_head_size(cfg: Eagle3Config, tc: TrainConfig) -> int:
    size = head_bytes(cfg, parse_dtype(tc.save_dtype))
    if size > tc.max_bytes:
        raise ConfigError(f"the head would take {size / MiB:.2f} MiB in {tc.save_dtype}, over the "
                          f"{tc.max_bytes / MiB:.2f} MiB budget (max_bytes); lower the draft vocabulary, "
                          "the intermediate size or the layers")
    return size


# --- the trainer -----------------------------------------------------------------------------


def learning_rate(tc, step: int, train_seconds: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio over the progress, which is
    step / steps, or the share of max_train_seconds spent when that is further along
    (the schedule then completes within the time budget). ``tc``: a training config with
    lr, steps, warmup_steps, max_train_seconds and min_lr_ratio."""
    warmup = tc.warmup_steps if tc.warmup_steps is not None else max(1, tc.steps // 20)
    if step < warmup:
        return tc.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, tc.steps - warmup)
    if tc.max_train_seconds:
        progress = max(progress, train_seconds / tc.max_train_seconds)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * cosine)

class Trainer:
    def __init__(self, target, target_cfg: ModelConfig, data: DrafterData, tc: TrainConfig, out_dir: str,
                 eos_ids: tuple[int, ...] = (), target_dir: str | None = None):
        self.tc, self.out_dir, self.data, self.target = tc, out_dir, data, target
        self.device = tc.resolved_device
        self.train_idx, self.heldout_idx = data.split(tc.heldout, tc.seed)
        self._perms: dict[int, list[int]] = {}
        if not self.train_idx:
            raise ConfigError("no training sequences")
        counts = data.token_counts(target_cfg.vocab_size, self.train_idx)
        mask_id = tc.mask_token_id
        # A warm start keeps the head's draft vocabulary and mask token, so it can go on with
        # new data, whose token counts would pick a slightly different vocabulary, unless told
        # to rebuild it (the rows of the tokens it keeps survive; _adopt_lm_head).
        warm = load_eagle3(tc.init_from, torch.float32, "cpu", target_embedding=target.model.embed_tokens) \
            if tc.init_from else None
        if warm is None or tc.rebuild_vocab:
            picked = counts if tc.vocab_from == "sequences" else \
                data.token_counts(target_cfg.vocab_size, self.train_idx, responses_only=True)
            self.vocab: DraftVocab = build_draft_vocab(picked, tc.draft_vocab_size, always=eos_ids)
        else:
            self.vocab = vocab_of(warm, target_cfg.vocab_size)
            if self.vocab.ids.numel() != tc.draft_vocab_size:
                raise ConfigError(f"cannot warm-start from {tc.init_from}: its draft_vocab_size is "
                                  f"{self.vocab.ids.numel()}, not {tc.draft_vocab_size} (--rebuild-vocab picks "
                                  "a new vocabulary of that size)")
            if mask_id is None:
                mask_id = warm.config.mask_token_id
        if tc.method == "p-eagle" and mask_id is None:
            if target_dir is None:
                raise ConfigError("P-EAGLE needs mask_token_id (or the target directory to pick one)")
            mask_id = pick_mask_token(target_dir, counts, exclude=eos_ids)
        if mask_id is not None and not 0 <= mask_id < target_cfg.vocab_size:
            raise ConfigError(f"mask_token_id {mask_id} is outside the target's vocabulary")
        self.cfg = drafter_config(target_cfg, tc, mask_id)
        self.head_bytes = check_head_size(self.cfg, tc)
        self.keep = depth_keep_fractions(tc.num_speculative_tokens, tc.deep_keep, tc.deep_min_keep)
        torch.manual_seed(tc.seed)
        max_len = max(len(s) for s in data.sequences)
        self.drafter = Eagle3Drafter(self.cfg, max_positions=max(target_cfg.max_position_embeddings, max_len)
                                     + tc.num_speculative_tokens + 1).to(self.device)
        self.drafter.embed_tokens = target.model.embed_tokens  # shared, frozen, not saved
        self.drafter.embed_tokens.weight.requires_grad_(False)
        with torch.no_grad():
            self.drafter.d2t.copy_(self.vocab.d2t)
            self.drafter.t2d.copy_(self.vocab.t2d)
            self._init_from_target(target, target_cfg)
            if warm is not None:
                self._init_from_head(warm, tc.init_from, target)
        self.params = [p for n, p in self.drafter.named_parameters() if not n.startswith("embed_tokens.")]
        self.optimizer = torch.optim.AdamW(self.params, lr=tc.lr, betas=(0.9, 0.95), eps=1e-8,
                                           weight_decay=tc.weight_decay)
        self.step = 0
        self.metrics: dict = {"train": [], "eval": []}
        self._updating = False  # inside a parameter update, which Ctrl-C must not cut in two
        self._interrupt_pending = False

    def _init_from_target(self, target, target_cfg: ModelConfig) -> None:
        if self.cfg.parallel_drafting:
            batch, cap = self._capture(self._batch_indices(0))
            real = torch.arange(batch.tokens.shape[1], device=self.device)[None, :] < batch.lengths[:, None]
            self.drafter.mask_hidden.copy_(cap.features[real].float().mean(0, keepdim=True))
        if self.tc.init_from_target and self.cfg.hidden_size == target_cfg.hidden_size:
            ids = self.vocab.ids.to(self.device)
            self.drafter.lm_head.weight.copy_(target.lm_head.weight[ids].float())
            self.drafter.norm.weight.copy_(target.model.norm.weight.float())

    # What an EAGLE-3 head lacks to be a P-EAGLE head of its shape: a P-EAGLE run may start from it.
    PARALLEL_KEYS = ("parallel_drafting", "mask_token_id", "ptd_token_id")

    def _init_from_head(self, head: Eagle3Drafter, path: str, target) -> None:
        """Warm start from a saved head of the same shape (its draft vocabulary already adopted).
        A P-EAGLE run may start from an EAGLE-3 head: every shared weight is copied and only the
        mask slot's hidden state (``mask_hidden``) starts fresh, from the mean target feature.
        A head may also grow deeper than the one it starts from: the extra layers go on top,
        their output projections (o_proj, down_proj) zero, so they add nothing to the residual
        stream and the grown head drafts exactly as the saved one until training moves them.
        It may grow wider MLPs the same way: the saved gate and up rows are kept, the new
        ones start random, and the new down_proj columns start at zero. With ``rebuild_vocab``
        its draft vocabulary (and so its size) may change too: ``_adopt_lm_head``."""
        mine, theirs = self.cfg.to_dict(), head.config.to_dict()
        from_sequential = self.cfg.parallel_drafting and not head.config.parallel_drafting
        grown = self.cfg.num_hidden_layers - head.config.num_hidden_layers
        widened = self.cfg.intermediate_size - head.config.intermediate_size
        diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)
                      and not (from_sequential and k in self.PARALLEL_KEYS)
                      and not (k == "num_hidden_layers" and grown > 0)
                      and not (k == "intermediate_size" and widened > 0)
                      and not (k == "draft_vocab_size" and self.tc.rebuild_vocab))
        if diff:
            why = {"num_hidden_layers": "a head may grow deeper, not shallower",
                   "intermediate_size": "an MLP may grow wider, not narrower"}
            raise ConfigError(f"cannot warm-start from {path}: its head differs in {', '.join(diff)}"
                              + "".join(f" ({why[k]})" for k in diff if k in why))
        state = {n: t for n, t in head.state_dict().items() if not n.startswith("embed_tokens.")}
        if widened > 0:
            self._widen_mlps(state, head.config.num_hidden_layers, head.config.intermediate_size)
        if self.tc.rebuild_vocab:
            for name in ("lm_head.weight", "d2t", "t2d"):
                state.pop(name)
            self._adopt_lm_head(head, target)
        self.drafter.load_state_dict(state, strict=False)
        for layer in self.drafter.layers[head.config.num_hidden_layers:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()

    def _adopt_lm_head(self, head: Eagle3Drafter, target, ridge: float = 1e-3) -> None:
        """The output rows for a rebuilt draft vocabulary. A token the saved head had keeps its
        row. A new token's row is the target's output row for it mapped into the head's space by
        the linear map that best takes the target's rows of the old vocabulary to the head's
        (ridge least squares), so it starts out scored about as the head would score it."""
        old = vocab_of(head, self.drafter.t2d.numel()).ids
        new = self.vocab.ids
        rows = head.lm_head.weight.detach().float().cpu()  # [old vocab, drafter hidden]
        t_rows = target.lm_head.weight.detach().float().cpu()  # [target vocab, target hidden]
        x = t_rows[old]
        gram = x.T @ x
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0])
        mapping = torch.linalg.solve(gram, x.T @ rows)  # [target hidden, drafter hidden]
        out = t_rows[new] @ mapping
        where_old = torch.full((self.drafter.t2d.numel(),), -1, dtype=torch.long)
        where_old[old] = torch.arange(old.numel())
        kept = where_old[new]
        out[kept >= 0] = rows[kept[kept >= 0]]
        self.drafter.lm_head.weight.copy_(out.to(self.drafter.lm_head.weight))

    def _widen_mlps(self, state: dict, num_layers: int, narrow: int) -> None:
        """Copies the saved MLPs of ``narrow`` width into the first units of this head's wider
        ones (taking them out of ``state``); the other units' down_proj columns become zero."""
        for i, layer in enumerate(self.drafter.layers[:num_layers]):
            gate_up = state.pop(f"layers.{i}.mlp.gate_up_proj.weight")  # [2 * narrow, H]: gate rows, then up
            down = state.pop(f"layers.{i}.mlp.down_proj.weight")  # [H, narrow]
            wide = layer.mlp.down_proj.weight.shape[1]
            layer.mlp.gate_up_proj.weight[:narrow].copy_(gate_up[:narrow])
            layer.mlp.gate_up_proj.weight[wide:wide + narrow].copy_(gate_up[narrow:])
            layer.mlp.down_proj.weight.zero_()
            layer.mlp.down_proj.weight[:, :narrow].copy_(down)

    # --- data ---------------------------------------------------------------------------
    def _batch_indices(self, step: int) -> list[int]:
        n, B = len(self.train_idx), self.tc.batch_size
        out = []
        for i in range(step * B, (step + 1) * B):
            epoch, j = divmod(i, n)
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(self.tc.seed * 7919 + epoch)
                self._perms[epoch] = torch.randperm(n, generator=g).tolist()
            out.append(self.train_idx[self._perms[epoch][j]])
        return out

    def _capture(self, indices: list[int]):
        batch = self.data.batch(indices, self.device)
        return batch, capture(self.target, batch, self.cfg.aux_layer_ids, self.vocab)

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lr_at(self, step: int, train_seconds: float = 0.0) -> float:
        return learning_rate(self.tc, step, train_seconds)

    # --- one batch ----------------------------------------------------------------------
    def batch_loss(self, indices: list[int], step: int | None, bounds=None, backward: bool = True,
                   chain: bool = False, captured=None, refine_share: float | None = None,
                   slot_tokens: torch.Tensor | None = None) -> tuple[float, DepthStats, Batch]:
        """Loss of one batch, gradients accumulated segment by segment. ``step`` seeds
        P-EAGLE's depth subsampling and refined anchors; None keeps every anchor at every depth
        (evaluation), refined where ``refine_share`` (default 0 there) says so."""
        batch, cap = captured or self._capture(indices)
        K = self.tc.num_speculative_tokens
        keep = None
        generator = None
        if step is not None and self.tc.method == "p-eagle":
            keep = self.keep
            generator = torch.Generator().manual_seed(self.tc.seed * 1_000_003 + step)
        if refine_share is None:
            refine_share = self.tc.refine_share if step is not None else 0.0
        plan = make_plan(batch, cap, K, self.tc.depth_decay, keep, generator,
                         greedy_only=self.tc.deep_greedy_only and step is not None, refine_share=refine_share,
                         slot_tokens=slot_tokens)
        A = batch.tokens.shape[1] - 1
        stats = DepthStats.zeros(K, self.device, (len(indices), K, A) if chain else None)
        total = 0.0
        for a, e in bounds or segment_bounds(A, self.tc.segment_len):
            with self._autocast():
                loss = segment_loss(self.tc.method, self.drafter, batch, cap, plan, a, e,
                                    self.cfg.mask_token_id, stats, self.tc.chain_weight if step is not None else 0.0)
            if backward:
                loss.backward()
            total += loss.detach()
        return float(total), stats, batch

    def train_step(self, train_seconds: float = 0.0) -> dict:
        lr = self.lr_at(self.step, train_seconds)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        self.drafter.train()
        loss, stats, _ = self.batch_loss(self._batch_indices(self.step), self.step)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.tc.grad_clip)
        self._updating = True
        try:
            self.optimizer.step()
            self.step += 1
            record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": float(grad_norm), **stats.summary()}
            self.metrics["train"].append(record)
        finally:
            self._updating = False
        if self._interrupt_pending:
            self._interrupt_pending = False
            raise KeyboardInterrupt
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out per-depth top-1 accuracy and KL (every anchor at every depth), and the
        acceptance length estimated on greedy responses: 1 + the mean number of leading
        depths whose top-1 equals the actual greedy token.

        A head trained with refine_share is scored again on the same anchors under "refine":
        after 1..REFINE_EVAL_PASSES refinement passes (each slot fed the previous pass's top-1
        draft of the depth before it, as the engine's draft_refine_passes does), and
        teacher-forced (every slot fed the real token: what more passes tend to)."""
        self.drafter.eval()
        K = self.tc.num_speculative_tokens
        modes = ["mask"]
        if self.tc.refine_share:
            modes += [f"refine {r}" for r in range(1, REFINE_EVAL_PASSES + 1)] + ["teacher-forced"]
        totals = {m: DepthStats.zeros(K, self.device) for m in modes}
        accepted, anchors = dict.fromkeys(modes, 0.0), 0
        idx = self.heldout_idx or self.train_idx[:self.tc.eval_batch_size]
        for start in range(0, len(idx), self.tc.eval_batch_size):
            chunk = idx[start:start + self.tc.eval_batch_size]
            batch, cap = self._capture(chunk)
            A = batch.tokens.shape[1] - 1
            p = torch.arange(A, device=self.device)[None, :]
            eligible = (batch.greedy[:, None] & (p >= batch.prompt_lens[:, None] - 2)
                        & (p <= batch.lengths[:, None] - 2 - K))
            anchors += int(eligible.sum())
            drafts = None
            for mode in modes:
                slots = None
                if mode.startswith("refine"):  # slot d reads the last pass's draft of depth d-1
                    slots = torch.cat([torch.zeros_like(drafts[:, :1]), drafts[:, :-1]], dim=1)
                _, stats, _ = self.batch_loss(chunk, None, backward=False, chain=True, captured=(batch, cap),
                                              refine_share=0.0 if mode == "mask" else 1.0, slot_tokens=slots)
                drafts = stats.draft
                totals[mode].add(stats)
                run = stats.chain.long().cumprod(dim=1).sum(dim=1)  # [B, A] leading hits
                accepted[mode] += float(run[eligible].sum())
        self.drafter.train()
        tau = {m: 1 + accepted[m] / anchors if anchors else None for m in modes}
        out = {"step": self.step, **totals["mask"].summary(), "acceptance_length": tau["mask"], "anchors": anchors}
        if len(modes) > 1:
            out["refine"] = {m: {**totals[m].summary(), "acceptance_length": tau[m]} for m in modes[1:]}
        self.metrics["eval"].append(out)
        return out

    # --- checkpoints --------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> str:
        return os.path.join(self.out_dir, CHECKPOINT)

    def _fingerprint(self) -> dict:
        """What a resumed run must share with the checkpoint's."""
        free = ("max_train_seconds", "keep_checkpoint", "device", "eval_every", "checkpoint_every")
        return {"drafter": self.cfg.to_dict(), "data": {"digest": self.data.digest()},
                "train": {k: v for k, v in asdict(self.tc).items() if k not in free}}

    def save_checkpoint(self) -> None:
        """All files of this step or none: they are written and fsynced in CHECKPOINT.tmp,
        then the previous checkpoint is renamed to CHECKPOINT.old and CHECKPOINT.tmp to
        CHECKPOINT; ``recover_checkpoint`` repairs a crash at any point of that."""
        final = self.checkpoint_dir
        os.makedirs(self.out_dir, exist_ok=True)
        recover_checkpoint(self.out_dir)
        tmp, old = final + ".tmp", final + ".old"
        os.makedirs(tmp)
        weights = {n: t.detach().cpu().contiguous() for n, t in self.drafter.state_dict().items()
                   if not n.startswith("embed_tokens.")}
        save_file(weights, os.path.join(tmp, "drafter.safetensors"))
        state = self.optimizer.state_dict()
        moments = {f"{i}.{k}": v.detach().cpu().contiguous() for i, s in state["state"].items()
                   for k, v in s.items() if isinstance(v, torch.Tensor)}
        save_file(moments, os.path.join(tmp, "optimizer.safetensors"))
        trainer_state = {"step": self.step, "metrics": self.metrics, "fingerprint": self._fingerprint(),
                         "param_groups": state["param_groups"]}
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(trainer_state, f)
        for name in os.listdir(tmp):
            _fsync(os.path.join(tmp, name))
        _fsync(tmp)
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync(self.out_dir)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> bool:
        if os.path.isdir(self.out_dir):
            recover_checkpoint(self.out_dir)
        path = self.checkpoint_dir
        state_file = os.path.join(path, "trainer_state.json")
        if not os.path.isfile(state_file):
            return False
        with open(state_file) as f:
            trainer_state = json.load(f)
        saved = json.loads(json.dumps(trainer_state["fingerprint"]))
        mine = json.loads(json.dumps(self._fingerprint()))
        if saved != mine:
            diff = sorted(k for part in ("drafter", "data", "train") for k in set(saved[part]) | set(mine[part])
                          if saved[part].get(k) != mine[part].get(k))
            raise ConfigError(f"cannot resume from {path}: the run differs in {', '.join(diff)}")
        with safe_open(os.path.join(path, "drafter.safetensors"), framework="pt", device=str(self.device)) as f:
            weights = {n: f.get_tensor(n) for n in f.keys()}
        missing, unexpected = self.drafter.load_state_dict(weights, strict=False)
        missing = [n for n in missing if not n.startswith("embed_tokens.")]
        if missing or unexpected:
            raise ConfigError(f"checkpoint {path} does not fit the drafter: missing {missing}, unexpected {unexpected}")
        moments: dict[int, dict] = {}
        with safe_open(os.path.join(path, "optimizer.safetensors"), framework="pt", device="cpu") as f:
            for name in f.keys():
                i, key = name.split(".", 1)
                moments.setdefault(int(i), {})[key] = f.get_tensor(name)
        for i, s in moments.items():  # moments on the parameter's device, the step count where AdamW keeps it
            param = self.params[i]
            for key, v in s.items():
                s[key] = v if key == "step" else v.to(param.device)
        self.optimizer.load_state_dict({"state": moments, "param_groups": trainer_state["param_groups"]})
        self.step = trainer_state["step"]
        self.metrics = trainer_state["metrics"]
        return True

    # --- the loop -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _interrupts_between_updates(self):
        """Ctrl-C raises KeyboardInterrupt at once, except inside a parameter update, which it
        lets finish first (so the checkpoint saved on the way out is of a whole step)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(signum, frame):
            if not self._updating:
                raise KeyboardInterrupt
            self._interrupt_pending = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)

    def train(self) -> dict:
        """Steps until ``steps`` (or ``max_train_seconds`` of training, evaluations and
        checkpoints not counted), evaluating and checkpointing on the way. Ctrl-C saves a
        checkpoint of the last finished step and raises TrainingInterrupted."""
        try:
            with self._interrupts_between_updates():
                return self._train()
        except KeyboardInterrupt:
            self.save_checkpoint()
            raise TrainingInterrupted(self.checkpoint_dir, self.step) from None

    def _train(self) -> dict:
        tc = self.tc
        train_seconds = self.metrics.get("train_seconds", 0.0)
        stopped_early = False
        with tqdm(total=tc.steps, initial=self.step, desc=f"train {tc.method}", unit="step") as bar:
            while self.step < tc.steps:
                start = time.perf_counter()
                rec = self.train_step(train_seconds)  # reads the loss back: the step has finished
                train_seconds += time.perf_counter() - start
                self.metrics["train_seconds"] = train_seconds
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", acc0=f"{rec['acc'][0]:.2f}",
                                accK=f"{rec['acc'][-1]:.2f}")
                if tc.eval_every and self.step % tc.eval_every == 0 and self.step < tc.steps:
                    ev = self.evaluate()
                    bar.write(f"step {self.step}: held-out acc " + " ".join(f"{a:.2f}" for a in ev["acc"])
                              + (f", acceptance length ~{ev['acceptance_length']:.2f}"
                                 if ev["acceptance_length"] else "") + refine_summary(ev))
                if tc.checkpoint_every and self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                    self.save_checkpoint()
                if tc.max_train_seconds and train_seconds >= tc.max_train_seconds:
                    stopped_early = self.step < tc.steps
                    break
        self.metrics["stopped_early"] = stopped_early
        self.metrics["final_eval"] = self.evaluate()
        return self.metrics["final_eval"]

    def save_head(self, path: str | None = None) -> str:
        """``save_eagle3`` into a temporary sibling directory, then each file renamed into
        ``path``: a crash leaves no half-written file."""
        path = path or self.out_dir
        head = copy.deepcopy(self.drafter).to(parse_dtype(self.tc.save_dtype))
        os.makedirs(path, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".head-", dir=path)
        try:
            save_eagle3(head, tmp, include_embedding=False)
            names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")  # config last: it names the weights
            for name in names:
                _fsync(os.path.join(tmp, name))
            for name in names:
                os.replace(os.path.join(tmp, name), os.path.join(path, name))
            _fsync(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path


def load_target(target_dir: str, tc: TrainConfig):
    from parspec.loader import load_model

    device = tc.resolved_device
    dtype = parse_dtype(tc.target_dtype) if tc.target_dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    target, cfg = load_model(target_dir, dtype, device)
    target.requires_grad_(False)
    return target.eval(), cfg


def train_drafter(target_dir: str, out_dir: str, data: DrafterData, tc: TrainConfig, resume: bool = False,
                  command: str | None = None, overwrite: bool = False) -> dict:
    """Train, save the head in vLLM's layout with its metrics, loss plot and card; returns
    the metrics. ``resume`` continues from OUT's checkpoint, ``overwrite`` replaces what an
    earlier run left in OUT; without either, such a run is refused."""
    from parspec.tokenizer import Tokenizer
    from parspec.train.report import plot_metrics, write_card

    check_out_dir(out_dir, resume, overwrite)
    target, target_cfg = load_target(target_dir, tc)
    tok = Tokenizer(target_dir)
    eos_ids = tuple(tok.eos_token_ids) + ((tok.bos_token_id,) if tok.bos_token_id is not None else ())
    trainer = Trainer(target, target_cfg, data, tc, out_dir, eos_ids=eos_ids, target_dir=target_dir)
    print(f"drafter: {tc.method}, K={tc.num_speculative_tokens}, draft vocab {tc.draft_vocab_size}, "
          f"aux layers {list(trainer.cfg.aux_layer_ids)}, mask token {trainer.cfg.mask_token_id}, "
          f"{trainer.head_bytes / MiB:.2f} MiB in {tc.save_dtype} (budget {tc.max_bytes / MiB:.2f} MiB)")
    if resume and trainer.load_checkpoint():
        print(f"resumed from {trainer.checkpoint_dir} at step {trainer.step}")
    elif os.path.isdir(trainer.checkpoint_dir):  # --overwrite: an earlier run's, not to be resumed by mistake
        shutil.rmtree(trainer.checkpoint_dir)
    trainer.train()
    trainer.save_checkpoint()  # until the head and its files are all written
    trainer.save_head(out_dir)
    metrics = trainer.metrics
    metrics.update({"method": tc.method, "command": command, "config": asdict(tc),
                    "drafter": trainer.cfg.to_dict(), "head_bytes": trainer.head_bytes,
                    "data": {**data.meta, "sequences": len(data), "tokens": data.num_tokens,
                             "train_sequences": len(trainer.train_idx),
                             "heldout_sequences": len(trainer.heldout_idx)},
                    "steps_done": trainer.step})
    with open(os.path.join(out_dir, "metrics.json.tmp"), "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(os.path.join(out_dir, "metrics.json.tmp"), os.path.join(out_dir, "metrics.json"))
    plot_metrics(metrics, os.path.join(out_dir, "loss.png"))
    write_card(metrics, os.path.join(out_dir, "README.md"))
    if not tc.keep_checkpoint and os.path.isdir(trainer.checkpoint_dir):
        shutil.rmtree(trainer.checkpoint_dir)
    return metrics
