"""What one engine step passes between its parts: the proposer's drafts (``Proposal``) and
the target's verified result (``StepOutput``). Low-level on purpose: the engine and the
proposers both import it, and neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parspec.sampling import BatchSampling


@dataclass
class Proposal:
    draft_tokens: torch.Tensor  # [B, K] int64 target-vocabulary ids; entries past num_drafts unused
    num_drafts: torch.Tensor  # [B] int32, 0..K
    num_drafts_host: list[int]  # the same counts on the host, for statistics
    draft_probs: torch.Tensor | None = None  # [B, K, V] float32; None = deterministic drafts
    drafter_passes: int = 0  # drafter forward passes this step (1 for parallel drafting)

    @classmethod
    def full(cls, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, drafter_passes: int,
             num_seqs: int | None = None) -> Proposal:
        """Every row drafted all K tokens (``num_seqs`` real rows; the tensors may hold more)."""
        b, k = draft_tokens.shape
        n = b if num_seqs is None else num_seqs
        return cls(draft_tokens, torch.full((b,), k, dtype=torch.int32, device=draft_tokens.device), [k] * n,
                   draft_probs, drafter_passes)


@dataclass
class StepOutput:
    """One target forward + verification. The device tensors may hold padding rows after
    the ``num_seqs`` real ones (a CUDA-graph bucket); ``fetch()`` is the step's single
    synchronisation and fills ``tokens`` for the real rows."""

    num_seqs: int
    output_tokens: torch.Tensor  # [Bp, K+1] int64, PLACEHOLDER-padded
    num_accepted: torch.Tensor  # [Bp] int32
    num_drafts: list[int]  # per real sequence
    aux_hidden: torch.Tensor | None  # [T, len(aux_layers) * H] features of every fed token, if asked for
    base_positions: torch.Tensor | None = None  # decode: [Bp] int64 position of each row's first fed token
    block_tables: torch.Tensor | None = None  # decode: [Bp, W] int32 (padding rows point at the pad block)
    fed_tokens: torch.Tensor | None = None  # decode: [Bp, K+1] the tokens fed (last token, then the drafts)
    sampling: BatchSampling | None = None  # the rows' sampling tensors verification used (drafters reuse them)
    tokens: list[list[int]] = field(default_factory=list)  # per sequence: accepted drafts + one
    _host: torch.Tensor | None = None  # [Bp, K+2] host copy: output tokens, then the accepted count
    _ready: object = None  # CUDA event recorded after that copy

    def start_fetch(self, host: torch.Tensor) -> None:
        """Start copying the result into ``host`` (a flat pinned int64 buffer of at least
        Bp * (K+2) entries); device work queued later does not delay fetch()."""
        rows, width = self.output_tokens.shape
        packed = torch.cat([self.output_tokens, self.num_accepted[:, None].long()], dim=1)
        self._host = host[:rows * (width + 1)].view(rows, width + 1)
        self._host.copy_(packed, non_blocking=True)
        if self.output_tokens.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def fetch(self) -> list[list[int]]:
        if self._ready is not None:
            self._ready.synchronize()
        rows = self._host[:self.num_seqs].tolist()
        self.tokens = [row[:row[-1] + 1] for row in rows]
        return self.tokens
