"""The engine: requests in, one speculative step at a time, outputs out."""

from __future__ import annotations

import logging
import random
import time

import numpy as np

import torch
from tqdm import tqdm

from parspec.config import ConfigError, EngineConfig, ModelConfig, SpeculativeConfig, parse_dtype
from parspec.engine.model_runner import ModelRunner
from parspec.engine.scheduler import Scheduler
from parspec.engine.timing import StepEvents
from parspec.sequence import RequestOutput, Sequence, SpecStats, Status
from parspec.speculative.proposer import TargetView
from parspec.step import StepOutput
from parspec.kv_cache import BlockManager, kv_bytes_per_block
from parspec.loader import load_model
from parspec.sampling import SamplingParams
from parspec.speculative import build_proposer
from parspec.tokenizer import Tokenizer

log = logging.getLogger("parspec")


def _no_mark(phase: str) -> None:
    pass


class RequestError(ValueError):
    """A request is malformed (prompt too long, bad token ids, ...); the engine stays usable."""


class LLMEngine:
    def __init__(self, cfg: EngineConfig, speculative_config=None):
        self.cfg = cfg
        if cfg.seed is not None:  # vLLM's engine-wide seed: unseeded sampling repeats run to run
            random.seed(cfg.seed)
            np.random.seed(cfg.seed)
            torch.manual_seed(cfg.seed)  # CPU and every CUDA device
        self.step_events: StepEvents | None = None  # attach one to time the step phases on the GPU
        self.spec_config = SpeculativeConfig.from_any(speculative_config)
        self.device = cfg.resolved_device()
        model_cfg = ModelConfig.from_pretrained(cfg.model)
        self.dtype = self._resolve_dtype(cfg.dtype, model_cfg)
        self.max_model_len = self._resolve_max_model_len(cfg.max_model_len, model_cfg)
        k = self.spec_config.num_speculative_tokens if self.spec_config else 0
        self.model, self.model_config = load_model(cfg.model, self.dtype, self.device,
                                                   max_positions=self.max_model_len + k + 1, cfg=model_cfg)
        self.tokenizer = None if cfg.skip_tokenizer_init else Tokenizer(cfg.model)
        use_graphs = not cfg.enforce_eager and self.device.type == "cuda"
        target = TargetView(self.model_config, cfg.model, self.device, self.dtype, self.model.model.embed_tokens,
                            self.max_model_len, cfg.max_num_seqs, use_graphs)
        self.proposer = build_proposer(self.spec_config, target) if self.spec_config else None
        num_blocks = self._num_kv_blocks(k)
        self.blocks = BlockManager(num_blocks, cfg.block_size)
        aux = self.proposer.aux_layers if self.proposer else ()
        extra = self.proposer.extra_slots if self.proposer else 0
        self.drafter_slots = extra
        self.k = k
        self.async_scheduling = use_graphs if cfg.async_scheduling is None else cfg.async_scheduling
        self._inflight: tuple[list[Sequence], StepOutput, bool] | None = None  # launched, not yet read
        self.runner = ModelRunner(self.model, num_blocks=num_blocks, block_size=cfg.block_size, device=self.device,
                                  dtype=self.dtype, aux_layers=aux, max_num_seqs=cfg.max_num_seqs,
                                  num_query_tokens=k + 1, max_positions=self.max_model_len + k + extra + 1,
                                  use_cuda_graphs=use_graphs)
        if self.proposer:
            self.proposer.allocate(num_blocks, cfg.block_size)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, k + extra,
                                   prefill_lookahead=extra, on_preempt=self._release_draft_state)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids if self.tokenizer else model_cfg.eos_token_id)
        self.reset_stats()

    # --- set-up -------------------------------------------------------------------------
    def _resolve_dtype(self, dtype: str, model_cfg: ModelConfig) -> torch.dtype:
        if dtype != "auto":
            return parse_dtype(dtype)
        if self.device.type == "cpu":
            return torch.float32  # CPU matmuls in bf16 are slow and lossy
        return parse_dtype(model_cfg.torch_dtype) if model_cfg.torch_dtype in ("bfloat16", "float16") else torch.bfloat16

    @staticmethod
    def _resolve_max_model_len(requested: int | None, model_cfg: ModelConfig) -> int:
        limit = model_cfg.max_position_embeddings
        if model_cfg.sliding_window:
            limit = min(limit, model_cfg.sliding_window)  # full attention is exact up to the window
        if requested is None:
            return limit
        if requested > limit:
            raise ConfigError(f"max_model_len={requested} exceeds what the model supports ({limit})")
        return requested

    def _num_kv_blocks(self, k: int) -> int:
        cfg, mc = self.cfg, self.model_config
        per_block = kv_bytes_per_block(mc.num_hidden_layers, cfg.block_size, mc.num_key_value_heads,
                                       mc.head_dim, self.dtype)
        if self.proposer:
            per_block += self.proposer.kv_bytes_per_block(cfg.block_size)
        extra = self.proposer.extra_slots if self.proposer else 0
        per_seq = (self.max_model_len + k + extra + cfg.block_size - 1) // cfg.block_size
        wanted = per_seq * cfg.max_num_seqs
        if cfg.num_kv_blocks is not None:
            num = cfg.num_kv_blocks
        elif cfg.kv_cache_memory_bytes is not None:
            num = cfg.kv_cache_memory_bytes // per_block
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - cfg.gpu_memory_utilization) * total - (1 << 30)  # 1 GiB for activations
            num = min(int(budget // per_block), wanted)
        else:
            num = min((4 << 30) // per_block, wanted)
        if num < per_seq:
            raise ConfigError(f"the KV cache holds {num} blocks of {cfg.block_size} tokens but one sequence of "
                              f"max_model_len={self.max_model_len} needs {per_seq}; lower max_model_len "
                              "or give the cache more memory")
        return num

    # --- requests -----------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams, request_id: str | None = None) -> Sequence:
        token_ids, text = self._prompt_tokens(prompt)
        if not token_ids:
            raise RequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt token ids out of range [0, {vocab}): {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise RequestError(f"the prompt has {len(token_ids)} tokens, max_model_len is {self.max_model_len} "
                               "(room for at least one generated token is needed)")
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise RequestError(f"stop strings {params.stop!r} need a tokenizer (skip_tokenizer_init=True); "
                               "use stop_token_ids")
        seq = Sequence(token_ids, params, request_id, text)
        if params.seed is not None:
            seq.generator = torch.Generator(self.device).manual_seed(params.seed)
        self.scheduler.add(seq)
        return seq

    def _prompt_tokens(self, prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"]), prompt.get("prompt")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("text prompts need a tokenizer (skip_tokenizer_init=True): "
                                   "pass {'prompt_token_ids': [...]}")
            return self.tokenizer.encode(prompt), prompt
        raise RequestError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {prompt!r:.80}")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # --- the loop -----------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Schedule -> draft -> one target forward + verify -> advance. Returns finished sequences.

        With asynchronous scheduling a steady decode step is launched from the previous step's
        result ON THE DEVICE (next positions and last tokens are computed there), before the
        host reads that result, so the host's bookkeeping overlaps the GPU's work; the step
        then stays in flight until the next call. Anything else (a prefill, a change of the
        running set, a sequence near its length limit) drains it first and runs as before."""
        finished = []
        if self._inflight is not None:
            if self._may_continue():
                return self._continue()
            finished = self._complete(*self._inflight)
            self._inflight = None
        seqs, prefill = self.scheduler.schedule()
        if not seqs:
            return finished
        out = self._launch(seqs, prefill, None)
        if not prefill and self._may_overlap(seqs):
            self._inflight = (seqs, out, prefill)
            return finished
        return finished + self._complete(seqs, out, prefill)

    def _launch(self, seqs: list[Sequence], prefill: bool, previous: StepOutput | None) -> StepOutput:
        """Draft, run the target and verify, all queued on the device; nothing is read back."""
        mark = self.step_events.mark if self.step_events is not None and not prefill else _no_mark
        mark("begin")
        proposal = None if prefill or self.proposer is None else self.proposer.propose(seqs)
        mark("drafted")
        if proposal is not None:
            self.drafter_passes += proposal.drafter_passes
            self.draft_steps += 1
        out = self.runner.step(seqs, prefill, proposal, previous)  # one target forward + verification
        mark("verified")
        if self.proposer:
            self.proposer.after_verify(seqs, out, prefill)  # EAGLE-3 and the draft LM draft the next step here
        mark("end")
        if not prefill:
            for seq in seqs:
                seq.inflight += self.k + 1  # at most this many tokens arrive when the step is read
        return out

    def _complete(self, seqs: list[Sequence], out: StepOutput, prefill: bool) -> list[Sequence]:
        out.fetch()  # the step's one host synchronisation
        if not prefill:
            for seq in seqs:
                seq.inflight -= self.k + 1
        live = [i for i, s in enumerate(seqs) if s.status != Status.FINISHED]  # finished while it ran
        if len(live) < len(seqs):
            seqs = [seqs[i] for i in live]
            out.tokens = [out.tokens[i] for i in live]
            out.num_drafts = [out.num_drafts[i] for i in live]
        if self.proposer:
            self.proposer.observe(seqs, out, prefill)
        return self._advance(seqs, out, prefill)

    def _may_overlap(self, seqs: list[Sequence]) -> bool:
        """Whether the next step may be launched before this one is read: decode steps whose
        drafts live on the device, nobody waiting, and no sequence near max_model_len (a step
        launched past a finished sequence must stay inside its tables)."""
        if not self.async_scheduling or self.scheduler.waiting:
            return False
        if self.proposer is not None and not self.proposer.drafts_on_device:
            return False
        room = 2 * (self.k + 1) + self.drafter_slots
        return all(len(s) + s.inflight + room <= self.max_model_len for s in seqs)

    def _may_continue(self) -> bool:
        """Whether the in-flight step's batch can go on as it is: a decode step, none of its
        sequences finished, exactly the running set, and room to grow without preempting."""
        seqs, _, prefill = self._inflight
        if prefill or any(s.status == Status.FINISHED for s in seqs) or seqs != list(self.scheduler.running):
            return False
        if not self._may_overlap(seqs):
            return False
        return all(self.blocks.can_grow(s.block_table, len(s) + s.inflight + self.scheduler.lookahead) for s in seqs)

    def _continue(self) -> list[Sequence]:
        """Launch the next step from the in-flight one's device result, then read that result."""
        prev_seqs, prev_out, _ = self._inflight
        seqs, prefill = self.scheduler.schedule()
        assert not prefill and seqs == prev_seqs, "the scheduler changed a batch the engine checked"
        out = self._launch(seqs, False, prev_out)
        finished = self._complete(prev_seqs, prev_out, False)
        self._inflight = (seqs, out, False) if len(finished) < len(seqs) else None
        return finished

    def _advance(self, seqs: list[Sequence], out: StepOutput, prefill: bool) -> list[Sequence]:
        finished = []
        now = time.perf_counter()
        for seq, tokens, num_drafts in zip(seqs, out.tokens, out.num_drafts):
            seq.num_cached = len(seq) - 1 + len(tokens)  # fed tokens, accepted drafts included
            if not seq.inflight:  # a step still in flight reads and writes past this one's end
                # Roll back rejected slots; keep what the drafter wrote past them for the next step.
                self.blocks.shrink(seq.seq_id, seq.block_table, seq.num_cached + self.drafter_slots)
            if not prefill:
                seq.spec.record(num_drafts, len(tokens) - 1)
                self.stats.record(num_drafts, len(tokens) - 1)
            if seq.first_token_time is None:
                seq.first_token_time = now
            for token in tokens:
                seq.token_ids.append(token)
                if self._check_stop(seq, token):
                    break
            if seq.status == Status.FINISHED:
                seq.finish_time = now
                self._finalize_text(seq)
                self.scheduler.finish(seq)
                self._release_draft_state(seq)
                finished.append(seq)
        return finished

    def _check_stop(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        n = seq.num_output_tokens
        reason = None
        if not p.ignore_eos and token in self.eos_token_ids:
            reason = ("stop", None)
        elif token in p.stop_token_ids:
            reason = ("stop", token)
        elif p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids, p.skip_special_tokens)
            hit = min(((text.find(s), s) for s in p.stop if s in text), default=None)
            if hit is not None:
                seq.text = text[:hit[0]]
                reason = ("stop", hit[1])
        if reason is None and p.max_tokens is not None and n >= p.max_tokens:
            reason = ("length", None)
        if reason is None and len(seq) >= self.max_model_len:
            reason = ("length", None)
        if reason is None:
            return False
        seq.status = Status.FINISHED
        seq.finish_reason, seq.stop_reason = reason
        return True

    def _finalize_text(self, seq: Sequence) -> None:
        if self.tokenizer is None or (seq.finish_reason == "stop" and isinstance(seq.stop_reason, str)):
            return
        ids = seq.output_token_ids
        if seq.finish_reason == "stop":  # vLLM keeps an EOS or stop_token_ids token in token_ids, not in text
            ids = ids[:-1]
        seq.text = self.tokenizer.decode(ids, seq.params.skip_special_tokens)

    def _release_draft_state(self, seq: Sequence) -> None:
        if self.proposer:
            self.proposer.release(seq)

    def reset_stats(self) -> None:
        """Speculation counters (summed over requests, vLLM's counting; see SpecStats);
        drafter_passes counts drafter forwards (K per step sequentially, 1 with parallel drafting)."""
        self.stats = SpecStats()
        self.drafter_passes = 0
        self.draft_steps = 0  # engine steps that drafted (one per batch, not per sequence)

    @property
    def drafter_passes_per_step(self) -> float:
        return self.drafter_passes / self.draft_steps if self.draft_steps else 0.0

    def abort_request(self, request_id: str) -> bool:
        """Abort one request, waiting or running: its KV blocks are freed at once (a step still
        in flight for it is queued on the device before anything that reuses them, and its
        result for this request is discarded). Returns whether the request was there."""
        for seq in self.scheduler.waiting:
            if seq.request_id == request_id:
                self.scheduler.waiting.remove(seq)
                self._mark_aborted(seq)
                return True
        for seq in self.scheduler.running:
            if seq.request_id == request_id:
                self.scheduler.finish(seq)
                self._release_draft_state(seq)
                self._mark_aborted(seq)
                return True
        return False

    @staticmethod
    def _mark_aborted(seq: Sequence) -> None:
        seq.status, seq.finish_reason, seq.inflight = Status.FINISHED, "abort", 0
        seq.finish_time = time.perf_counter()

    def abort_all(self) -> None:
        if self._inflight is not None:  # its device work is queued before anything that reuses the blocks
            for seq in self._inflight[0]:
                seq.inflight = 0
            self._inflight = None
        for seq in list(self.scheduler.running):
            self.scheduler.finish(seq)
            self._release_draft_state(seq)
            self._mark_aborted(seq)
        for seq in self.scheduler.waiting:
            self._mark_aborted(seq)
        self.scheduler.waiting.clear()

    def generate(self, prompts, params, use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        if self.has_unfinished_requests():
            raise RequestError("generate() needs an idle engine; other requests are in flight")
        try:
            seqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        except Exception:
            self.abort_all()  # a bad prompt in the list leaves nothing half-queued
            raise
        speculative = self.proposer is not None
        try:
            with tqdm(total=len(seqs), desc="generate", disable=not use_tqdm, unit="req") as bar:
                while self.has_unfinished_requests():
                    bar.update(len(self.step()))
        except BaseException:  # a failing step or Ctrl-C: free everything, keep the engine usable
            self.abort_all()
            raise
        return [RequestOutput.from_sequence(s, speculative) for s in seqs]
