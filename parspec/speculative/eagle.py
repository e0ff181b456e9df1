"""EAGLE-3 drafting, sequential (K passes) or parallel (P-EAGLE: one pass).

The drafter reads the target's residual stream at the input of a few target layers
(``aux_layers``). Its entry ``p`` pairs the target's feature of position ``p`` with the
token at ``p + 1`` and sits at position ``p`` of the drafter's own paged KV cache, which
is indexed by the sequences' shared block tables; its output predicts the token at
``p + 2``.

The drafter runs right after each target step, before the host reads the step's result
(``after_verify``), and the drafts wait on the device for the next step (``propose``
only gathers them). Its new entries are the fed positions whose features are valid:

* after a context chunk of positions ``c .. c+m-1``: entries ``c .. c+m-1`` with tokens
  ``t[c+1] .. t[c+m]``; when the chunk completes the context (``c+m = n``) the last of
  them is the token the target just emitted (positions known on the host; the emitted
  token is scattered in on the device) and it drafts; a partial chunk only fills the
  drafter's cache (chunked prefill), so a prompt prefilled in chunks leaves the cache
  exactly as one prefill would;
* after a decode step that fed ``[t[n-1], d1 .. dK]`` at positions ``n-1 .. n-1+K`` and
  accepted ``a`` drafts: entries ``n-1 .. n-1+a``, entry ``n-1+i`` carrying emitted token
  ``i``. ``a`` is only known on the device, so the pass has a fixed padded layout built
  there (``parspec.speculative.draft_inputs``): all K+1 fed positions, the rejected ones not
  written and their outputs discarded, queries attending by position.

Positions the drafter wrote speculatively (its later passes, P-EAGLE's mask slots) lie
past the last entry, so the next step's entries overwrite them before anything reads them.

Sequential drafting: pass 1 runs the new entries with ``hidden = fc(features)``; the last
accepted one's output gives draft 1. Passes 2..K run one entry per sequence at the next
position: the previous draft as token, the previous pass's pre-norm output as hidden.

Parallel drafting (P-EAGLE): one pass over the new entries followed by K-1 mask slots at
the K-1 positions after the last accepted entry (token ``mask_token_id``, hidden
``fc(mask_hidden)``); the last accepted entry gives draft 1, mask slot j draft j+2.

Refinement passes (parspec's ``draft_refine_passes`` = R): R more passes over the same layout
(positions, metadata, hidden inputs), each mask slot's token now the previous pass's draft of
the row before it (a target id). A slot whose earlier drafts are right then sees the true
tokens, as training feeds it (teacher forcing). Each pass rewrites the real entries' K/V
identically and the slots' K/V past the last entry; the last pass's outputs are the drafts.

Either way the drafter writes up to K-1 positions past what the target's step holds, so
the scheduler reserves ``extra_slots`` = K-1 more. With ``parallel_drafting`` off a
P-EAGLE head drafts sequentially (its mask_hidden unused); with it on, the head must have
been trained for it: a mask token in its config (mask_token_id / ptd_token_id / pard_token)
and mask_hidden in its checkpoint.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass, replace

from parspec.attention import AttentionMetadata
from parspec.config import ConfigError, ModelConfig, SpeculativeConfig
from parspec.models.drafter import Eagle3Config, Eagle3Drafter, default_aux_layers, load_eagle3
from parspec.speculative.draft_inputs import draft_inputs
from parspec.metadata import build_attention_metadata, decode_metadata
from parspec.speculative.proposer import AfterVerifyDrafter, TargetView, sample_drafts
from parspec.transfer import to_device

MIN_LAYERS_FOR_DEFAULT_AUX = 4


def resolve_aux_layers(cfg: Eagle3Config, target: ModelConfig, path: str) -> tuple[int, ...]:
    """The target layers whose inputs the head reads: its config's, else EAGLE-3's default."""
    num_layers = target.num_hidden_layers
    if cfg.aux_layer_ids is None:
        if num_layers < MIN_LAYERS_FOR_DEFAULT_AUX:
            raise ConfigError(
                f"drafter {path} lists no eagle_aux_hidden_state_layer_ids and the target has only "
                f"num_hidden_layers={num_layers}: EAGLE-3's default layers (2, L//2, L-3) = "
                f"{default_aux_layers(num_layers)} need at least {MIN_LAYERS_FOR_DEFAULT_AUX} layers; "
                "list the layers in the drafter's config.json (eagle_config.eagle_aux_hidden_state_layer_ids)")
        ids = default_aux_layers(num_layers)
    else:
        ids = tuple(cfg.aux_layer_ids)
    if not ids:
        raise ConfigError(f"drafter {path}: eagle_aux_hidden_state_layer_ids is empty")
    bad = [i for i in ids if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"drafter {path}: aux layer ids {list(ids)} include {bad}, outside the target's "
                          f"layers [0, {num_layers})")
    return tuple(int(i) for i in ids)


def check_head_config(cfg: Eagle3Config, target: ModelConfig, path: str, parallel: bool) -> None:
    """Shape checks that need only the two configs (before any weight is read)."""
    if cfg.target_hidden_size != target.hidden_size:
        raise ConfigError(f"drafter {path}: target_hidden_size={cfg.target_hidden_size} but the target's "
                          f"hidden_size is {target.hidden_size}: the head was trained for another target")
    if cfg.vocab_size != target.vocab_size:
        raise ConfigError(f"drafter {path}: vocab_size={cfg.vocab_size} but the target's vocab_size is "
                          f"{target.vocab_size}: drafter and target must share a vocabulary")
    if parallel:
        if cfg.mask_token_id is None:
            raise ConfigError(f"parallel_drafting is on but drafter {path} is not a P-EAGLE head: its config "
                              "names no mask token (mask_token_id, ptd_token_id or pard_token) to go with a "
                              "mask_hidden; turn parallel_drafting off to draft sequentially with it")
        if not 0 <= cfg.mask_token_id < cfg.vocab_size:
            raise ConfigError(f"drafter {path}: mask_token_id={cfg.mask_token_id} is outside the vocabulary "
                              f"[0, {cfg.vocab_size})")


def check_head_model(model: Eagle3Drafter, target: ModelConfig, aux: tuple[int, ...], path: str,
                     parallel: bool) -> None:
    """Checks on the loaded head (the shared embedding is only known now)."""
    cfg = model.config
    emb = model.embed_tokens
    if emb.embedding_dim != cfg.hidden_size:
        raise ConfigError(f"drafter {path}: its hidden_size={cfg.hidden_size} but the embedding it uses "
                          f"(the target's, the checkpoint has no embed_tokens) has width {emb.embedding_dim}; "
                          "save the head with its own embed_tokens")
    if emb.num_embeddings != target.vocab_size:
        raise ConfigError(f"drafter {path}: embedding has {emb.num_embeddings} rows, the target's vocab_size "
                          f"is {target.vocab_size}")
    want = len(aux) * target.hidden_size
    if model.fc.in_features != want:
        raise ConfigError(f"drafter {path}: fc reads {model.fc.in_features} features but {len(aux)} aux layers "
                          f"x target hidden_size {target.hidden_size} = {want}")
    if parallel and model.mask_hidden is None:
        raise ConfigError(f"parallel_drafting is on but drafter {path} has no mask_hidden")


@dataclass
class DraftPass:
    """One drafter forward over new entries (and mask slots)."""

    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    hidden: torch.Tensor  # [T, H] projected features (or fc(mask_hidden))
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [B, 1 + num_mask]: the last accepted entry, then the mask slots


class Eagle3Proposer(AfterVerifyDrafter):
    staged = ("output_tokens", "num_accepted", "base_positions", "block_tables", "aux_hidden")

    def __init__(self, spec: SpeculativeConfig, target: TargetView):
        super().__init__(spec.num_speculative_tokens, target)
        self.parallel = bool(spec.parallel_drafting)
        self.extra_slots = self.k - 1
        self.refine_passes = spec.draft_refine_passes
        self.drafter_passes = 1 + self.refine_passes if self.parallel else self.k
        path = spec.model
        cfg = Eagle3Config.from_pretrained(path)  # LoadError when the directory is missing
        self.aux_layers = resolve_aux_layers(cfg, target.config, path)
        check_head_config(cfg, target.config, path, self.parallel)
        self.max_positions = target.max_model_len + 2 * self.k + 1
        self.model = load_eagle3(path, target.dtype, target.device, target_embedding=target.embed_tokens,
                                 max_positions=self.max_positions, require_mask_hidden=self.parallel)
        self.cfg = self.model.config
        check_head_model(self.model, target.config, self.aux_layers, path, self.parallel)
        self.mask_token_id = self.cfg.mask_token_id if self.parallel else None
        self.num_mask = self.k - 1 if self.parallel else 0

    def prefill_drafts(self, seqs, step, sampling, generators):
        p = self._prefill_pass(seqs, step)
        if not step.num_seqs:  # partial chunks only: fill the drafter's cache, draft nothing
            self.model(p.tokens, p.positions, p.hidden, p.meta)
            return None, None
        return self._draft(p, step.num_seqs, sampling, generators)

    def decode_drafts(self, rows: int, sampling, generators):
        return self._draft(self._decode_pass(rows), rows, sampling, generators)

    def _draft(self, p: DraftPass, rows: int, sampling, generators):
        if self.parallel:
            return self._parallel(p, rows, sampling, generators)
        return self._sequential(p, rows, sampling, generators)

    def _prefill_pass(self, seqs, step) -> DraftPass:
        """Entries num_cached .. num_cached + m - 1 of each chunk (m = its length); a chunk that
        completes its context (the first ``step.num_seqs``) ends in the emitted token and the
        mask slots. Metadata from the host."""
        starts = [s.num_cached for s in seqs]  # before the engine advances: where this chunk began
        real = step.chunk_lens
        done = step.num_seqs
        q_lens = [n + self.num_mask if i < done else n for i, n in enumerate(real)]
        tokens, src, rows, emitted_at = [], [], [], []
        total_real = sum(real)
        real_off = out_off = 0
        for i, (seq, c, n) in enumerate(zip(seqs, starts, real)):
            src += range(real_off, real_off + n)
            if i < done:
                emitted_at.append(out_off + n - 1)
                tokens += seq.token_ids[c + 1:c + n] + [0] + [self.mask_token_id] * self.num_mask
                src += [total_real] * self.num_mask  # total_real: the mask
                rows.append([out_off + n - 1 + j for j in range(1 + self.num_mask)])
            else:  # a partial chunk: the token after each entry is a prompt token
                tokens += seq.token_ids[c + 1:c + n + 1]
            real_off += n
            out_off += q_lens[i]
        tokens = to_device(tokens, torch.int64, self.device)
        tokens[to_device(emitted_at, torch.int64, self.device)] = step.output_tokens[:, 0]
        feats = step.aux_hidden
        if self.num_mask:
            feats = torch.cat([feats, self.model.mask_hidden.to(feats.dtype)])
        hidden = self.model.project(feats).index_select(0, to_device(src, torch.int64, self.device))
        positions, meta = build_attention_metadata([s.block_table for s in seqs], starts, q_lens,
                                                   self.block_size, self.device)
        meta.max_seq_len = self.max_positions
        # At least a completing chunk's queries (its entry and mask slots), even in a step of short
        # partial chunks: the attention tile then never drops below the ones warm_up() compiles.
        meta.max_query_len = max(meta.max_query_len, 1 + self.num_mask)
        return DraftPass(tokens, positions, hidden, meta, to_device(rows, torch.int64, self.device))

    def _decode_pass(self, rows: int) -> DraftPass:
        """The padded layout of ``draft_inputs``, built on the device from what was accepted."""
        out = self.staged_input("output_tokens", rows)
        k1 = out.shape[1]
        tables = self.staged_input("block_tables", rows)
        inp = draft_inputs(out, self.staged_input("num_accepted", rows), self.staged_input("base_positions", rows),
                           tables, self.block_size, self.num_mask, self.mask_token_id or 0)
        aux = self.staged_input("aux_hidden", rows)
        hidden = self.model.project(aux).view(rows, k1, -1)
        if self.num_mask:
            mask = self.model.project(self.model.mask_hidden.to(aux.dtype))
            hidden = torch.cat([hidden, mask.expand(rows, self.num_mask, -1)], dim=1)
        q = k1 + self.num_mask
        meta = AttentionMetadata(slot_mapping=inp.slot_mapping, query_start_loc=self.query_starts(rows, q),
                                 seq_lens=inp.seq_lens, block_tables=tables, max_query_len=q,
                                 max_seq_len=self.max_positions, query_positions=inp.positions)
        return DraftPass(inp.tokens, inp.positions, hidden.reshape(rows * q, -1), meta,
                         inp.sample_rows.view(rows, 1 + self.num_mask))

    def _choose(self, logits: torch.Tensor, sampling, generators):
        """Draft logits [B, n, Vd] -> target-vocabulary drafts [B, n] and q [B, n, V] (None if all greedy)."""
        draft_ids, q = sample_drafts(logits, sampling, generators)  # over the draft vocabulary
        return self.model.draft_to_target(draft_ids), None if q is None else self.model.scatter_to_target(q)

    def _sequential(self, p: DraftPass, b: int, sampling, generators):
        normed, prenorm = self.model(p.tokens, p.positions, p.hidden, p.meta)
        last = p.sample_rows[:, 0]
        normed, prenorm = normed.index_select(0, last), prenorm.index_select(0, last)
        base = p.positions.index_select(0, last)
        tables = p.meta.block_tables[:b]  # the drafting rows come first (partial chunks after them)
        drafts, probs = [], []
        for i in range(self.k):
            if i:
                pos, meta = decode_metadata(base + i, tables, 1, self.block_size, self.max_positions)
                normed, prenorm = self.model(token, pos, prenorm, meta)
            token, q = self._choose(self.model.compute_logits(normed)[:, None], sampling, generators)
            token = token[:, 0]
            drafts.append(token)
            probs.append(None if q is None else q[:, 0])
        draft_probs = None if probs[0] is None else torch.stack(probs, dim=1)
        return torch.stack(drafts, dim=1), draft_probs

    def _parallel(self, p: DraftPass, rows: int, sampling, generators):
        """P-EAGLE's pass, then the refinement passes. Sampled, every pass draws its drafts on the
        same generators and the last pass's draws and q are returned: the earlier draws are
        randomness independent of the target and the final drafts are drawn from exactly that q,
        so verification stays lossless."""
        logits = self._parallel_logits(p, rows)
        slots = p.sample_rows[:, 1:].flatten()
        for _ in range(self.refine_passes):
            drafts, _ = sample_drafts(logits, sampling, generators)
            fed = self.model.draft_to_target(drafts[:, :-1]).flatten()  # the row before each slot drafted these
            logits = self._parallel_logits(replace(p, tokens=p.tokens.index_copy(0, slots, fed)), rows)
        return self._choose(logits, sampling, generators)

    def _parallel_logits(self, p: DraftPass, rows: int) -> torch.Tensor:
        """One pass over the new entries + K-1 mask slots per sequence; draft logits [B, K, Vd]."""
        normed, _ = self.model(p.tokens, p.positions, p.hidden, p.meta)
        logits = self.model.compute_logits(normed.index_select(0, p.sample_rows.flatten()))
        return logits.view(rows, self.k, -1)
