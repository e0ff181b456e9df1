"""Runs the target: ONE forward over every sequence's new tokens, then verification, on device.

Decode / verify steps (``Q = K + 1`` tokens per sequence) run over static buffers padded
to a batch-size bucket: the host writes each sequence's last token, base position and
block table into page-locked memory, one asynchronous copy moves them, and the device
builds positions and slot mapping itself (``decode_metadata``). The forward from those
buffers to the logits is one CUDA graph per bucket (``GraphCache``); with graphs off the
same function runs eagerly over the same shapes, so the output is identical. Padding
rows point at the cache's pad block, which no sequence owns.

Prefill steps (any lengths) run eagerly with metadata built on the host."""

from __future__ import annotations

import torch

from parspec.kv_cache import allocate_kv_cache, bind_kv_cache
from parspec.metadata import build_attention_metadata, decode_metadata
from parspec.sampling import BatchSampling, probs_from_logits
from parspec.sequence import Sequence
from parspec.step import Proposal, StepOutput
from parspec.cuda_graphs import GraphCache, batch_buckets, bucket_for, shared_pool
from parspec.speculative.proposer import padded_generators
from parspec.speculative.verify import draw_verification_noise, verify_greedy, verify_rejection
from parspec.transfer import pinned, to_device


class ModelRunner:
    def __init__(self, model, *, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype,
                 aux_layers: tuple[int, ...], max_num_seqs: int, num_query_tokens: int, max_positions: int,
                 use_cuda_graphs: bool):
        cfg = model.config
        self.model, self.device, self.block_size = model, device, block_size
        self.aux_layers = aux_layers
        self.q = num_query_tokens  # K + 1 tokens fed per sequence in a decode step
        self.pad_block = num_blocks  # one block past the manager's: padding rows write here
        self.kv_cache = allocate_kv_cache(cfg.num_hidden_layers, num_blocks + 1, block_size,
                                          cfg.num_key_value_heads, cfg.head_dim, dtype, device)
        bind_kv_cache(model.attention_layers, self.kv_cache)
        self.max_positions = max_positions  # bound on any position a step writes (fixes split-KV shapes)
        self.width = -(-max_positions // block_size)  # block-table columns
        cuda = device.type == "cuda"
        # On the GPU a batch is padded to a bucket (one graph each); on the CPU it runs as is.
        self.buckets = batch_buckets(max_num_seqs) if cuda else list(range(1, max_num_seqs + 1))
        bmax = self.buckets[-1]
        self.host_inputs = pinned((2, 2, bmax), torch.int64, device)  # x2: last tokens; base positions
        self.host_tables = pinned((2, bmax, self.width), torch.int32, device)
        self.host_out = pinned((2, bmax * (self.q + 1)), torch.int64, device)
        self._parity = self._out_parity = 0
        self.inputs = torch.zeros(2, bmax, dtype=torch.int64, device=device)
        self.input_ids = torch.zeros(bmax, self.q, dtype=torch.int64, device=device)
        self.block_tables = torch.full((bmax, self.width), self.pad_block, dtype=torch.int32, device=device)
        self.num_drafts = torch.zeros(bmax, dtype=torch.int32, device=device)
        self.graphs = GraphCache(self._decode_forward, enabled=cuda and use_cuda_graphs, pool=shared_pool(device))
        self._sampling_key = None
        self._sampling: BatchSampling | None = None

    def bucket(self, num_seqs: int) -> int:
        return bucket_for(num_seqs, self.buckets)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], prefill: bool, proposal: Proposal | None,
             previous: StepOutput | None = None) -> StepOutput:
        """``previous``: the same batch's last decode step, not yet read by the host; this step's
        positions and last tokens are then derived from its result on the device."""
        return self._prefill(seqs) if prefill else self._decode(seqs, proposal, previous)

    # --- decode / verify ---------------------------------------------------------------------
    def _decode(self, seqs: list[Sequence], proposal: Proposal | None, previous: StepOutput | None) -> StepOutput:
        b = len(seqs)
        rows = self.bucket(b)
        # Two sets of staging buffers: the previous step's copies may still be queued behind its work.
        self._parity ^= 1
        host_inputs, host_tables = self.host_inputs[self._parity], self.host_tables[self._parity]
        tables = host_tables.numpy()
        tables[:rows] = self.pad_block
        for i, s in enumerate(seqs):
            tables[i, :len(s.block_table)] = s.block_table
        self.block_tables[:rows].copy_(host_tables[:rows], non_blocking=True)
        if previous is None:
            inputs = host_inputs.numpy()
            inputs[:, b:rows] = 0
            inputs[0, :b] = [s.last_token for s in seqs]
            inputs[1, :b] = [len(s) - 1 for s in seqs]
            self.inputs[:, :rows].copy_(host_inputs[:, :rows], non_blocking=True)
        else:  # the previous step fed base .. base+K and accepted acc: continue from base + acc + 1
            acc = previous.num_accepted[:b].long()
            self.inputs[1, :b] += acc + 1
            self.inputs[0, :b] = previous.output_tokens[:b].gather(1, acc[:, None])[:, 0]
            self.inputs[:, b:rows] = 0
        self.input_ids[:rows, 0].copy_(self.inputs[0, :rows])
        if proposal is not None:
            self.input_ids[:b, 1:].copy_(proposal.draft_tokens[:b])
            self.num_drafts[:b].copy_(proposal.num_drafts[:b])
            self.num_drafts[b:rows].zero_()
        logits, aux = self.graphs.run(rows)
        sampling = self.sampling(seqs, rows)
        out, acc = self._verify(seqs, sampling, logits, self.input_ids[:rows, 1:], self.num_drafts[:rows], proposal)
        step = StepOutput(b, out, acc, proposal.num_drafts_host[:b] if proposal is not None else [0] * b, aux,
                          base_positions=self.inputs[1, :rows], block_tables=self.block_tables[:rows],
                          fed_tokens=self.input_ids[:rows], sampling=sampling)
        step.start_fetch(self._host_out())
        return step

    def _host_out(self) -> torch.Tensor:
        """Pinned result buffers, alternating: an unread step's result may still be in the other."""
        self._out_parity ^= 1
        return self.host_out[self._out_parity]

    def _decode_forward(self, rows: int):
        """Static buffers -> logits [rows, Q, V] and aux features; captured per bucket."""
        positions, meta = decode_metadata(self.inputs[1, :rows], self.block_tables[:rows], self.q,
                                          self.block_size, self.max_positions)
        hidden, aux = self.model(self.input_ids[:rows].reshape(-1), positions, meta, self.aux_layers)
        logits = self.model.compute_logits(hidden).view(rows, self.q, -1)
        return logits, torch.cat(aux, dim=-1) if aux else None

    # --- prefill ---------------------------------------------------------------------------------
    def _prefill(self, seqs: list[Sequence]) -> StepOutput:
        # Every uncached token is fed; the next token is sampled from the last one's logits.
        token_lists = [s.token_ids[s.num_cached:] for s in seqs]
        input_ids = to_device([t for ts in token_lists for t in ts], torch.int64, self.device)
        positions, meta = build_attention_metadata([s.block_table for s in seqs], [s.num_cached for s in seqs],
                                                   [len(ts) for ts in token_lists], self.block_size, self.device)
        hidden, aux = self.model(input_ids, positions, meta, self.aux_layers)
        logits = self.model.compute_logits(hidden[meta.query_start_loc[1:].long() - 1])[:, None]
        b = len(seqs)
        no_drafts = torch.zeros(b, 0, dtype=torch.int64, device=self.device)
        sampling = self.sampling(seqs, b)
        out, acc = self._verify(seqs, sampling, logits, no_drafts, self.num_drafts[:b].zero_(), None)
        step = StepOutput(b, out, acc, [0] * b, torch.cat(aux, dim=-1) if aux else None, sampling=sampling)
        step.start_fetch(self._host_out())
        return step

    # --- verification ------------------------------------------------------------------------------
    def _verify(self, seqs: list[Sequence], sampling: BatchSampling, logits: torch.Tensor, drafts: torch.Tensor,
                num_drafts: torch.Tensor, proposal: Proposal | None):
        rows = logits.shape[0]
        if sampling.all_greedy:
            return verify_greedy(drafts, num_drafts, logits)
        target_probs = probs_from_logits(logits, sampling)
        uniforms, noise = draw_verification_noise(rows, drafts.shape[1], logits.shape[-1],
                                                  padded_generators(seqs, rows), self.device)
        draft_probs = None
        if proposal is not None and proposal.draft_probs is not None:
            draft_probs = proposal.draft_probs
            if draft_probs.shape[0] < rows:  # padding rows: any distribution will do
                draft_probs = torch.cat([draft_probs, draft_probs[:1].expand(rows - draft_probs.shape[0],
                                                                              *draft_probs.shape[1:])])
            draft_probs = draft_probs[:rows]
        return verify_rejection(drafts, num_drafts, draft_probs, target_probs, uniforms, noise)

    def sampling(self, seqs: list[Sequence], rows: int) -> BatchSampling:
        """The batch's sampling tensors, rebuilt only when its composition changes."""
        key = (rows, tuple(s.seq_id for s in seqs))
        if key != self._sampling_key:
            self._sampling_key = key
            self._sampling = BatchSampling.from_params([s.params for s in seqs], self.device, rows)
        return self._sampling
