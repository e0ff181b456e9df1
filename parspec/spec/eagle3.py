"""EAGLE-3 drafting, sequential (K passes) or parallel (P-EAGLE: one pass).

The drafter reads the target's residual stream at the input of a few target layers
(``aux_layers``). Its entry ``p`` pairs the target's feature of position ``p`` with the
token at ``p + 1`` and sits at position ``p`` of the drafter's own paged KV cache, which
is indexed by the sequences' shared block tables; its output predicts the token at
``p + 2``.

Per sequence, ``seq.draft_state`` holds the *pending* entries: those whose target
features arrived with the last target step but are not yet in the drafter's cache
(``start``: position of the first, ``tokens``: the tokens at ``start + 1 ...``,
``features``: ``[n, n_aux * H]`` device rows). ``observe`` fills it after every target
step; ``propose`` writes them to the cache and drafts from the last one.

* After a prefill of positions ``c .. n-1`` the pending entries are ``c .. n-1`` with
  tokens ``t[c+1] .. t[n-1]`` and the token the target just emitted.
* After a decode step that fed ``[t[n-1], d1 .. dK]`` at positions ``n-1 .. n-1+K`` and
  emitted ``a + 1`` tokens (a accepted drafts + one), the features of positions
  ``n-1 .. n-1+a`` are valid (they saw only verified tokens); entry ``n-1+i`` carries
  emitted token ``i``. Positions the drafter wrote speculatively in the previous step
  (its own later passes, or P-EAGLE's mask slots) start at ``n-1`` too, so the pending
  entries overwrite them before anything reads them.

Sequential drafting: pass 1 runs every sequence's pending entries with
``hidden = fc(features)``; the last one's output gives draft 1. Passes 2..K run one
entry per sequence at the next position: the previous draft as token, the previous
pass's pre-norm output as hidden.

Parallel drafting (P-EAGLE): one pass over the pending entries followed by K-1 mask
slots at the next K-1 positions (token ``mask_token_id``, hidden ``fc(mask_hidden)``),
causal attention over the cache; the last real entry gives draft 1, mask slot j draft
j+2. The mask slots' K/V land in slots the scheduler reserved (``len(seq) + K``) and are
overwritten by real entries in later steps.

With ``parallel_drafting`` off, a P-EAGLE head drafts sequentially (its mask_hidden is
unused); with it on, the head must have been trained for it.
"""

from __future__ import annotations

import torch

from parspec.config import ConfigError, ModelConfig, SpeculativeConfig
from parspec.engine.metadata import build_attention_metadata
from parspec.models.eagle3 import Eagle3Config, Eagle3Drafter, default_aux_layers, load_eagle3
from parspec.sampling import BatchSampling
from parspec.spec.proposer import ModelProposer, Proposal, sample_drafts

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
        if not cfg.parallel_drafting or cfg.mask_token_id is None:
            raise ConfigError(f"parallel_drafting is on but drafter {path} is not a P-EAGLE head (its config "
                              "has no parallel_drafting/mask_token_id, its checkpoint no mask_hidden); "
                              "turn parallel_drafting off to draft sequentially with it")
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


class Eagle3Proposer(ModelProposer):
    def __init__(self, spec: SpeculativeConfig, engine):
        super().__init__(spec.num_speculative_tokens)
        self.device, self.dtype = engine.device, engine.dtype
        self.parallel = bool(spec.parallel_drafting)
        target = engine.model_config
        path = spec.model
        cfg = Eagle3Config.from_pretrained(path)  # LoadError when the directory is missing
        self.aux_layers = resolve_aux_layers(cfg, target, path)
        check_head_config(cfg, target, path, self.parallel)
        self.model = load_eagle3(path, engine.dtype, engine.device, target_embedding=engine.model.model.embed_tokens,
                                 max_positions=engine.max_model_len + self.k + 1)
        self.cfg = self.model.config
        check_head_model(self.model, target, self.aux_layers, path, self.parallel)
        self.mask_token_id = self.cfg.mask_token_id if self.parallel else None
        self.block_size = None

    # --- state --------------------------------------------------------------------------
    def observe(self, seqs, step, prefill: bool) -> None:
        feats = step.aux_hidden
        if feats is None:
            raise RuntimeError("EAGLE-3 drafting needs the target's aux hidden states; the runner returned none")
        offset = 0
        fed_per_seq = None if prefill else step.output_tokens.shape[1]
        for seq, emitted in zip(seqs, step.tokens):
            if prefill:
                # Called before the engine advances: num_cached is still where this prefill began.
                start = seq.num_cached
                fed = len(seq) - start
                tokens = seq.token_ids[start + 1:] + list(emitted[:1])
            else:
                start, fed = len(seq) - 1, fed_per_seq
                tokens = list(emitted)  # entry n-1+i carries emitted token i
            rows = feats[offset:offset + len(tokens)]
            offset += fed
            state = seq.draft_state
            if not prefill and "start" in state:
                # Entries not drafted from yet (no propose since the last step): keep them.
                if state["start"] + len(state["tokens"]) != start:
                    raise RuntimeError(f"sequence {seq.seq_id}: pending draft entries end at "
                                       f"{state['start'] + len(state['tokens'])}, new ones start at {start}")
                state["tokens"] = state["tokens"] + tokens
                state["features"] = torch.cat([state["features"], rows])
            else:
                state.clear()
                state.update(start=start, tokens=tokens, features=rows)

    def _take_pending(self, seqs) -> tuple[list[int], list[list[int]], list[torch.Tensor]]:
        starts, tokens, feats = [], [], []
        for seq in seqs:
            state = seq.draft_state
            if "start" not in state:
                raise RuntimeError(f"sequence {seq.seq_id} reached the drafter without target features "
                                   "(observe() was not called after its prefill)")
            starts.append(state.pop("start"))
            tokens.append(state.pop("tokens"))
            feats.append(state.pop("features"))
        return starts, tokens, feats

    def _check_room(self, seqs, last_positions: list[int]) -> None:
        for seq, last in zip(seqs, last_positions):
            if last >= len(seq.block_table) * self.block_size:
                raise RuntimeError(f"sequence {seq.seq_id}: the drafter writes position {last} but its block "
                                   f"table holds {len(seq.block_table) * self.block_size} slots")

    # --- drafting -----------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, seqs) -> Proposal:
        sampling = BatchSampling.from_params([s.params for s in seqs], self.device)
        pending = self._take_pending(seqs)
        if self.parallel:
            logits = self._parallel_logits(seqs, pending)
            draft_tokens, draft_probs = self._choose(logits, sampling, seqs)
            passes = 1
        else:
            draft_tokens, draft_probs = self._sequential(seqs, pending, sampling)
            passes = self.k
        return Proposal.full(draft_tokens, draft_probs, passes)

    def _choose(self, logits: torch.Tensor, sampling: BatchSampling, seqs):
        """Draft logits [B, n, Vd] -> target-vocabulary drafts [B, n] and q [B, n, V] (None if all greedy)."""
        draft_ids, q = sample_drafts(logits, sampling, seqs)  # over the draft vocabulary
        return self.model.draft_to_target(draft_ids), None if q is None else self.model.scatter_to_target(q)

    def _sequential(self, seqs, pending, sampling):
        starts, token_lists, feats = pending
        b = len(seqs)
        q_lens = [len(t) for t in token_lists]
        self._check_room(seqs, [s + q - 1 + self.k - 1 for s, q in zip(starts, q_lens)])
        tables = [s.block_table for s in seqs]
        tokens = torch.tensor([t for ts in token_lists for t in ts], dtype=torch.int64).to(self.device,
                                                                                             non_blocking=True)
        hidden = self.model.project(torch.cat(feats))
        drafts, probs = [], []
        for i in range(self.k):
            positions, meta = build_attention_metadata(tables, starts, q_lens, self.block_size, self.device)
            normed, prenorm = self.model(tokens, positions, hidden, meta)
            if i == 0:
                last = meta.query_start_loc[1:].long() - 1
                normed, prenorm = normed[last], prenorm[last]
            token, q = self._choose(self.model.compute_logits(normed)[:, None], sampling, seqs)
            drafts.append(token[:, 0])
            probs.append(None if q is None else q[:, 0])
            starts = [s + n for s, n in zip(starts, q_lens)]
            q_lens = [1] * b
            tokens, hidden = token[:, 0], prenorm
        draft_probs = None if probs[0] is None else torch.stack(probs, dim=1)
        return torch.stack(drafts, dim=1), draft_probs

    def _parallel_logits(self, seqs, pending) -> torch.Tensor:
        """One pass over the pending entries + K-1 mask slots per sequence; draft logits [B, K, Vd]."""
        starts, token_lists, feats = pending
        k, n_mask = self.k, self.k - 1
        real = [len(t) for t in token_lists]
        q_lens = [n + n_mask for n in real]
        self._check_room(seqs, [s + q - 1 for s, q in zip(starts, q_lens)])
        total_real = sum(real)
        tokens, src, rows = [], [], []
        real_off = out_off = 0
        for ts, n in zip(token_lists, real):
            tokens += ts + [self.mask_token_id] * n_mask
            src += list(range(real_off, real_off + n)) + [total_real] * n_mask  # row total_real: the mask
            rows += range(out_off + n - 1, out_off + n - 1 + k)
            real_off += n
            out_off += n + n_mask
        to_dev = lambda x: torch.tensor(x, dtype=torch.int64).to(self.device, non_blocking=True)  # noqa: E731
        projected = self.model.project(torch.cat(feats + [self.model.mask_hidden.to(feats[0].dtype)]))
        hidden = projected.index_select(0, to_dev(src)) if n_mask else projected[:total_real]
        positions, meta = build_attention_metadata([s.block_table for s in seqs], starts, q_lens,
                                                   self.block_size, self.device)
        normed, _ = self.model(to_dev(tokens), positions, hidden, meta)
        logits = self.model.compute_logits(normed.index_select(0, to_dev(rows)))
        return logits.view(len(seqs), k, -1)
