"""What one engine step passes between its parts: the proposer's drafts (``Proposal``) and
the target's verified result (``StepOutput``). Low-level on purpose: the engine and the
proposers both import it, and neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parspec.sampling import BatchSampling, unpack_logprobs
from parspec.sequence import Sequence, TokenLogprob


@dataclass
class Proposal:
    draft_tokens: torch.Tensor  # [B, K] int64 target-vocabulary ids; entries past num_drafts unused
    num_drafts: torch.Tensor  # [B] int32, 0..K
    num_drafts_host: list[int]  # the same counts on the host, for statistics
    draft_probs: torch.Tensor | None = None  # [B, K, V] float32; None = deterministic drafts
    drafter_passes: int = 0  # drafter forward passes this step (1 + draft_refine_passes for parallel drafting)

    @classmethod
    def full(cls, draft_tokens: torch.Tensor, draft_probs: torch.Tensor | None, drafter_passes: int,
             num_seqs: int | None = None) -> Proposal:
        """Every row drafted all K tokens (``num_seqs`` real rows; the tensors may hold more)."""
        b, k = draft_tokens.shape
        n = b if num_seqs is None else num_seqs
        return cls(draft_tokens, torch.full((b,), k, dtype=torch.int32, device=draft_tokens.device), [k] * n,
                   draft_probs, drafter_passes)


@dataclass
class PrefillChunks:
    """The context chunks one step feeds (chunked prefill): ``seqs[i]`` feeds ``lens[i]`` of
    its tokens from position ``seqs[i].num_cached``. The first ``num_done`` complete their
    context (the prompt, or prompt and output after a preemption) and emit a token; the
    others only fill the cache."""

    seqs: list[Sequence]
    lens: list[int]
    num_done: int


@dataclass
class StepOutput:
    """One target forward + verification. The device tensors may hold padding rows after
    the ``num_seqs`` real ones (a CUDA-graph bucket); ``fetch()`` is the step's single
    synchronisation and fills ``tokens`` (and ``logprobs``) for the real rows."""

    num_seqs: int
    output_tokens: torch.Tensor  # [Bp, K+1] int64, PLACEHOLDER-padded
    num_accepted: torch.Tensor  # [Bp] int32
    num_drafts: list[int]  # per real sequence
    aux_hidden: torch.Tensor | None  # [T, len(aux_layers) * H] features of every fed token, if asked for
    base_positions: torch.Tensor | None = None  # decode: [Bp] int64 position of each row's first fed token
    block_tables: torch.Tensor | None = None  # decode: [Bp, W] int32 (padding rows point at the pad block)
    fed_tokens: torch.Tensor | None = None  # decode: [Bp, K+1] the tokens fed (last token, then the drafts)
    # decode: the step's depth k <= K (adaptive speculation feeds k + 1 tokens a row; the
    # tensors above stay K + 1 wide, the columns past k PLACEHOLDER / zero, so drafters see one shape)
    depth: int = 0
    launched_at: float = 0.0  # host clock when the engine began the step (adaptive depth's cost)
    sampling: BatchSampling | None = None  # the rows' sampling tensors verification used (drafters reuse them)
    # prefill: tokens fed per chunk of the step's PrefillChunks (all of them; only the first
    # num_seqs, which completed their context, have rows above; aux_hidden covers every chunk)
    chunk_lens: list[int] | None = None
    # [Bp, K+1, 2 + 2L] int64 (sampling.token_logprobs' layout) when a row asked for logprobs
    logprob_data: torch.Tensor | None = None
    tokens: list[list[int]] = field(default_factory=list)  # per sequence: accepted drafts + one
    # per sequence, aligned with ``tokens``: one TokenLogprob per token, or None where the
    # request did not ask; None altogether when no row asked
    logprobs: list[list[TokenLogprob] | None] | None = None
    _host: torch.Tensor | None = None  # [Bp, K+2 (+ logprobs)] host copy: output tokens, the accepted count, ...
    _ready: object = None  # CUDA event recorded after that copy

    @property
    def host_size(self) -> int:
        """int64 entries ``start_fetch`` needs in its host buffer."""
        rows, width = self.output_tokens.shape
        extra = 0 if self.logprob_data is None else self.logprob_data[0].numel()
        return rows * (width + 1 + extra)

    def start_fetch(self, host: torch.Tensor) -> None:
        """Start copying the result into ``host`` (a flat pinned int64 buffer of at least
        ``host_size`` entries); device work queued later does not delay fetch()."""
        rows = self.output_tokens.shape[0]
        parts = [self.output_tokens, self.num_accepted[:, None].long()]
        if self.logprob_data is not None:
            parts.append(self.logprob_data.reshape(rows, -1))
        packed = torch.cat(parts, dim=1)
        self._host = host[:packed.numel()].view(rows, packed.shape[1])
        self._host.copy_(packed, non_blocking=True)
        if self.output_tokens.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def fetch(self) -> list[list[int]]:
        if self._ready is not None:
            self._ready.synchronize()
        width = self.output_tokens.shape[1]
        host = self._host[:self.num_seqs]
        rows = host[:, :width + 1].tolist()
        self.tokens = [row[:row[-1] + 1] for row in rows]
        if self.logprob_data is not None:
            packed = host[:, width + 1:].reshape(self.num_seqs, width, self.logprob_data.shape[-1])
            self.logprobs = self._read_logprobs(packed)
        return self.tokens

    def _read_logprobs(self, packed: torch.Tensor) -> list[list[TokenLogprob] | None]:
        logprob, rank, top_ids, top_lp = (t.tolist() for t in unpack_logprobs(packed))
        out = []
        for i, tokens in enumerate(self.tokens):
            wanted = self.sampling.logprobs[i]
            out.append(None if wanted is None else [
                TokenLogprob(t, logprob[i][j], rank[i][j], list(zip(top_ids[i][j][:wanted], top_lp[i][j][:wanted])))
                for j, t in enumerate(tokens)])
        return out
