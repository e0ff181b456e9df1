"""Runs the target: builds per-step inputs and attention metadata from the sequences,
does ONE forward over every sequence's new tokens, and verifies the drafts on device."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parspec.attention import AttentionMetadata
from parspec.engine.metadata import build_attention_metadata
from parspec.engine.sequence import Sequence
from parspec.kv_cache import allocate_kv_cache, bind_kv_cache
from parspec.sampling import BatchSampling, probs_from_logits
from parspec.spec.proposer import Proposal
from parspec.spec.verify import draw_verification_noise, verify_greedy, verify_rejection


@dataclass
class StepOutput:
    """One target forward + verification. Device tensors stay on device; ``fetch()`` is the
    step's single synchronisation (it fills ``tokens``)."""

    output_tokens: torch.Tensor  # [B, K+1] int64, PLACEHOLDER-padded
    num_accepted: torch.Tensor  # [B] int32
    num_drafts: list[int]
    aux_hidden: torch.Tensor | None  # [T, len(aux_layers) * H] features of every fed token, if asked for
    positions: torch.Tensor  # [T] positions of the fed tokens
    meta: AttentionMetadata  # the target's attention metadata of this step
    tokens: list[list[int]] = field(default_factory=list)  # per sequence: accepted drafts + one
    _host: tuple | None = None  # (output_tokens, num_accepted) copies on their way to the host
    _ready: object = None  # CUDA event recorded after those copies

    def start_fetch(self) -> None:
        """Start copying the result to the host; later device work does not delay fetch()."""
        self._host = (self.output_tokens.to("cpu", non_blocking=True), self.num_accepted.to("cpu", non_blocking=True))
        if self.output_tokens.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def fetch(self) -> list[list[int]]:
        if self._host is None:
            self.start_fetch()
        if self._ready is not None:
            self._ready.synchronize()
        out, acc = (t.tolist() for t in self._host)
        self.tokens = [row[:a + 1] for row, a in zip(out, acc)]
        return self.tokens


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, aux_layers: tuple[int, ...] = ()):
        cfg = model.config
        self.model, self.device, self.block_size = model, device, block_size
        self.aux_layers = aux_layers
        self.kv_cache = allocate_kv_cache(cfg.num_hidden_layers, num_blocks, block_size,
                                          cfg.num_key_value_heads, cfg.head_dim, dtype, device)
        bind_kv_cache(model.attention_layers, self.kv_cache)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], prefill: bool, proposal: Proposal | None) -> StepOutput:
        if prefill:
            # Every uncached token is fed; the next token is sampled from the last one's logits.
            token_lists = [s.token_ids[s.num_cached:] for s in seqs]
            starts = [s.num_cached for s in seqs]
            input_ids = torch.tensor([t for ts in token_lists for t in ts], device=self.device)
            q_lens = [len(ts) for ts in token_lists]
        else:
            k = proposal.draft_tokens.shape[1] if proposal is not None else 0
            last = torch.tensor([s.last_token for s in seqs], device=self.device)[:, None]
            fed = last if proposal is None else torch.cat([last, proposal.draft_tokens], dim=1)
            input_ids = fed.reshape(-1)
            starts = [len(s) - 1 for s in seqs]
            q_lens = [k + 1] * len(seqs)
        positions, meta = build_attention_metadata([s.block_table for s in seqs], starts, q_lens,
                                                   self.block_size, self.device)
        hidden, aux = self.model(input_ids, positions, meta, self.aux_layers)
        if prefill:
            logits = self.model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1])[:, None]
        else:
            logits = self.model.compute_logits(hidden).view(len(seqs), q_lens[0], -1)
        out, acc, num_drafts = self.verify(seqs, logits, None if prefill else proposal)
        step = StepOutput(out, acc, num_drafts, torch.cat(aux, dim=-1) if aux else None, positions, meta)
        step.start_fetch()
        return step

    def verify(self, seqs: list[Sequence], logits: torch.Tensor, proposal: Proposal | None):
        b, k = logits.shape[0], logits.shape[1] - 1
        if proposal is None:
            drafts = torch.zeros(b, 0, dtype=torch.int64, device=self.device)
            num_drafts = torch.zeros(b, dtype=torch.int32, device=self.device)
            num_drafts_host = [0] * b
        else:
            drafts, num_drafts, num_drafts_host = proposal.draft_tokens, proposal.num_drafts, proposal.num_drafts_host
        sampling = BatchSampling.from_params([s.params for s in seqs], self.device)
        if sampling.all_greedy:
            out, acc = verify_greedy(drafts, num_drafts, logits)
        else:
            target_probs = probs_from_logits(logits, sampling)
            uniforms, noise = draw_verification_noise(b, k, logits.shape[-1], [s.generator for s in seqs],
                                                      self.device)
            draft_probs = proposal.draft_probs if proposal is not None else None
            out, acc = verify_rejection(drafts, num_drafts, draft_probs, target_probs, uniforms, noise)
        return out, acc, num_drafts_host
