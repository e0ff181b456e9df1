"""Runs the target: ONE forward over every sequence's new tokens, then verification, on device.

Decode / verify steps (``Q = K + 1`` tokens per sequence, or k + 1 for a step that verifies
only k <= K drafts: adaptive speculation) run over static buffers padded to a batch-size
bucket: the host writes each sequence's last token, base position and block table into
page-locked memory, one asynchronous copy moves them, and the device
builds positions and slot mapping itself (``decode_metadata``). The forward from those
buffers to the logits is one CUDA graph per (bucket, depth) (``GraphCache``); with graphs off the
same function runs eagerly over the same shapes, so the output is identical. Padding
rows point at the cache's pad block, which no sequence owns.

A step with context chunks (prefill, chunked or whole) runs eagerly: the decode rows,
staged as above, and the chunks of any lengths go through ONE forward with ragged
metadata built on the host (``_mixed``); logits are computed only for the decode rows and
the last token of each chunk that completes its context."""

from __future__ import annotations

import torch

from parspec.kv_cache import allocate_kv_cache, bind_kv_cache
from parspec.metadata import build_attention_metadata, concat_metadata, decode_metadata
from parspec.sampling import BatchSampling, SamplingHistory, probs_from_logits, process_logits, token_logprobs
from parspec.sequence import Sequence
from parspec.step import PrefillChunks, Proposal, StepOutput
from parspec.cuda_graphs import GraphCache, batch_buckets, bucket_for, shared_pool
from parspec.speculative.proposer import padded_generators
from parspec.speculative.verify import PLACEHOLDER, draw_verification_noise, verify_greedy, verify_rejection
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
        self.vocab_size = cfg.vocab_size
        self.eos_token_ids: tuple[int, ...] = ()  # the engine's; min_tokens masks them

    def bucket(self, num_seqs: int) -> int:
        return bucket_for(num_seqs, self.buckets)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], proposal: Proposal | None, previous: StepOutput | None = None,
             chunks: PrefillChunks | None = None, depth: int | None = None) -> tuple[StepOutput | None,
                                                                                   StepOutput | None]:
        """One target forward + verification over the decode rows ``seqs`` ([last token + drafts]
        each) and, if given, context chunks. Returns the decode rows' output (None without
        any) and the chunks' (None without chunks).

        ``previous``: the same batch's last decode step, not yet read by the host; this step's
        positions and last tokens are then derived from its result on the device.
        ``depth``: verify at most this many of the proposal's drafts (default all K): the
        rows feed depth + 1 tokens, so a shallow step costs the target less."""
        q = self.q if depth is None else depth + 1
        if chunks is None:  # the fast path: static buffers, one graph per (bucket, depth)
            rows = self._stage_decode(seqs, proposal, previous, q)
            logits, aux = self.graphs.run((rows, q))
            return self._finish_decode(seqs, rows, q, logits, aux, proposal), None
        return self._mixed(seqs, proposal, chunks, q)

    # --- decode / verify ---------------------------------------------------------------------
    def _stage_decode(self, seqs: list[Sequence], proposal: Proposal | None, previous: StepOutput | None,
                      q: int) -> int:
        """Fill the static buffers for the decode rows; returns the padded row count (the bucket)."""
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
            drafted = proposal.num_drafts[:b]
            self.num_drafts[:b].copy_(drafted if q == self.q else drafted.clamp(max=q - 1))
            self.num_drafts[b:rows].zero_()
        return rows

    def _finish_decode(self, seqs: list[Sequence], rows: int, q: int, logits: torch.Tensor,
                       aux: torch.Tensor | None, proposal: Proposal | None) -> StepOutput:
        b = len(seqs)
        sampling = self.sampling(seqs, rows)
        out, acc, logprobs = self._verify(seqs, sampling, logits, self.input_ids[:rows, 1:q], self.num_drafts[:rows],
                                          proposal)
        num_drafts = [0] * b if proposal is None else [min(n, q - 1) for n in proposal.num_drafts_host[:b]]
        if q < self.q:  # a shallow step: widen to K + 1 columns, the shape the drafters read
            out, aux, logprobs = _widen(out, aux, logprobs, rows, self.q)
        step = StepOutput(b, out, acc, num_drafts, aux, base_positions=self.inputs[1, :rows],
                          block_tables=self.block_tables[:rows], fed_tokens=self.input_ids[:rows],
                          sampling=sampling, logprob_data=logprobs, depth=q - 1)
        step.start_fetch(self._host_out(step.host_size))
        return step

    def _host_out(self, size: int) -> torch.Tensor:
        """Pinned result buffers, alternating: an unread step's result may still be in the other.
        Grown (both) when a step carries logprobs; an unread step keeps its old buffer alive."""
        if size > self.host_out.shape[1]:
            self.host_out = pinned((2, size), torch.int64, self.device)
        self._out_parity ^= 1
        return self.host_out[self._out_parity]

    def _decode_forward(self, key: tuple[int, int]):
        """Static buffers -> logits [rows, q, V] and aux features; captured per (bucket, q)."""
        rows, q = key
        positions, meta = decode_metadata(self.inputs[1, :rows], self.block_tables[:rows], q,
                                          self.block_size, self.max_positions)
        hidden, aux = self.model(self.input_ids[:rows, :q].reshape(-1), positions, meta, self.aux_layers)
        logits = self.model.compute_logits(hidden).view(rows, q, -1)
        return logits, torch.cat(aux, dim=-1) if aux else None

    # --- steps with context chunks (prefill) -------------------------------------------------
    def _mixed(self, seqs: list[Sequence], proposal: Proposal | None, chunks: PrefillChunks,
               q: int) -> tuple[StepOutput | None, StepOutput]:
        """The decode rows (staged and padded as for their graph, so the drafters see the same
        shapes) followed by the chunks, in ONE eager forward over ragged metadata; logits only
        for the decode rows and the last token of each chunk that completes its context."""
        starts = [s.num_cached for s in chunks.seqs]
        chunk_ids = to_device([t for s, c, n in zip(chunks.seqs, starts, chunks.lens) for t in s.token_ids[c:c + n]],
                              torch.int64, self.device)
        chunk_pos, chunk_meta = build_attention_metadata([s.block_table for s in chunks.seqs], starts, chunks.lens,
                                                         self.block_size, self.device)
        rows = self._stage_decode(seqs, proposal, None, q) if seqs else 0
        input_ids, positions, meta = chunk_ids, chunk_pos, chunk_meta
        if rows:
            dec_pos, dec_meta = decode_metadata(self.inputs[1, :rows], self.block_tables[:rows], q,
                                                self.block_size, self.max_positions)
            input_ids = torch.cat([self.input_ids[:rows, :q].reshape(-1), chunk_ids])
            positions, meta = torch.cat([dec_pos, chunk_pos]), concat_metadata(dec_meta, chunk_meta)
        hidden, aux = self.model(input_ids, positions, meta, self.aux_layers)
        aux = torch.cat(aux, dim=-1) if aux else None
        split = rows * q
        decoded = None
        if rows:
            logits = self.model.compute_logits(hidden[:split]).view(rows, q, -1)
            decoded = self._finish_decode(seqs, rows, q, logits, None if aux is None else aux[:split], proposal)
        ends = chunk_meta.query_start_loc[1:chunks.num_done + 1].long() - 1  # last token of each completing chunk
        prefilled = self._finish_chunks(chunks, hidden[split:].index_select(0, ends),
                                        None if aux is None else aux[split:])
        return decoded, prefilled

    def _finish_chunks(self, chunks: PrefillChunks, last_hidden: torch.Tensor,
                       aux: torch.Tensor | None) -> StepOutput:
        """The completing chunks sample their context's next token (verification with no drafts,
        so a seeded request draws exactly as in an unchunked prefill); the others emit nothing."""
        done = chunks.num_done
        seqs = chunks.seqs[:done]
        out = torch.zeros(done, 1, dtype=torch.int64, device=self.device)
        acc = torch.zeros(done, dtype=torch.int32, device=self.device)
        sampling = logprobs = None
        if done:
            logits = self.model.compute_logits(last_hidden)[:, None]
            sampling = self.sampling(seqs, done)
            no_drafts = torch.zeros(done, 0, dtype=torch.int64, device=self.device)
            out, acc, logprobs = self._verify(seqs, sampling, logits, no_drafts, torch.zeros_like(acc), None)
        step = StepOutput(done, out, acc, [0] * done, aux, sampling=sampling, chunk_lens=list(chunks.lens),
                          logprob_data=logprobs)
        step.start_fetch(self._host_out(step.host_size))
        return step

    # --- verification ------------------------------------------------------------------------------
    def _verify(self, seqs: list[Sequence], sampling: BatchSampling, logits: torch.Tensor, drafts: torch.Tensor,
                num_drafts: torch.Tensor, proposal: Proposal | None):
        """Verification against the processed target distribution (position j of a row sees the
        row's output plus drafts 0..j-1). Returns the output tokens, the accepted counts and,
        when a row asked for them, the packed logprobs of the raw logits (else None)."""
        rows = logits.shape[0]
        target = logits
        if sampling.needs_processing:
            target = process_logits(logits, sampling, self._history(seqs, rows, sampling), drafts, num_drafts)
        if sampling.all_greedy:
            out, acc = verify_greedy(drafts, num_drafts, target)
        else:
            out, acc = self._verify_sampled(seqs, sampling, target, drafts, num_drafts, proposal)
        logprobs = token_logprobs(logits, out, sampling.max_logprobs) if sampling.max_logprobs >= 0 else None
        return out, acc, logprobs

    def _verify_sampled(self, seqs, sampling, logits, drafts, num_drafts, proposal):
        rows = logits.shape[0]
        target_probs = probs_from_logits(logits, sampling)
        uniforms, noise = draw_verification_noise(rows, drafts.shape[1], logits.shape[-1],
                                                  padded_generators(seqs, rows), self.device)
        draft_probs = None
        if proposal is not None and proposal.draft_probs is not None:
            draft_probs = proposal.draft_probs
            if draft_probs.shape[0] < rows:  # padding rows: any distribution will do
                draft_probs = torch.cat([draft_probs, draft_probs[:1].expand(rows - draft_probs.shape[0],
                                                                              *draft_probs.shape[1:])])
            draft_probs = draft_probs[:rows, :drafts.shape[1]]  # a shallow step verifies the first k
        return verify_rejection(drafts, num_drafts, draft_probs, target_probs, uniforms, noise)

    def _history(self, seqs: list[Sequence], rows: int, sampling: BatchSampling) -> SamplingHistory | None:
        """The output tokens of the rows whose sampling reads them, uploaded in one copy. The
        engine never overlaps such a step with the previous one, so the host's tokens are current."""
        if not sampling.needs_history:
            return None
        outputs = [s.output_token_ids if s.params.needs_history else () for s in seqs]
        return SamplingHistory.build(outputs, rows, self.vocab_size, self.device)

    def sampling(self, seqs: list[Sequence], rows: int) -> BatchSampling:
        """The batch's sampling tensors, rebuilt only when its composition changes."""
        key = (rows, tuple(s.seq_id for s in seqs))
        if key != self._sampling_key:
            self._sampling_key = key
            self._sampling = BatchSampling.from_params([s.params for s in seqs], self.device, rows,
                                                       prompts=[s.penalized_prompt for s in seqs],
                                                       vocab_size=self.vocab_size, eos_token_ids=self.eos_token_ids)
        return self._sampling


def _widen(out: torch.Tensor, aux: torch.Tensor | None, logprobs: torch.Tensor | None, rows: int,
           width: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A shallow step's results padded from q to ``width`` positions a row: output tokens with
    PLACEHOLDER, features and logprob data with zeros (never read: past every row's acceptance)."""
    q = out.shape[1]
    out = torch.nn.functional.pad(out, (0, width - q), value=PLACEHOLDER)
    if aux is not None:
        aux = torch.nn.functional.pad(aux.view(rows, q, -1), (0, 0, 0, width - q)).view(rows * width, -1)
    if logprobs is not None:
        logprobs = torch.nn.functional.pad(logprobs, (0, 0, 0, width - q))
    return out, aux, logprobs
