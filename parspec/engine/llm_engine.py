"""The engine: requests in, one speculative step at a time, outputs out."""

from __future__ import annotations

import functools
import logging
import random
import time

import numpy as np

import torch
from tqdm import tqdm

from parspec.batch_invariant import set_batch_invariant
from parspec.config import ConfigError, EngineConfig, ModelConfig, SpeculativeConfig, parse_dtype
from parspec.engine.model_runner import ModelRunner
from parspec.engine.scheduler import Scheduler
from parspec.engine.timing import StepEvents
from parspec.sequence import RequestDelta, RequestOutput, Sequence, SpecStats, Status
from parspec.speculative.proposer import TargetView
from parspec.step import PrefillChunks, StepOutput
from parspec.kv_cache import BlockManager, kv_bytes_per_block, num_kv_blocks
from parspec.loader import load_model
from parspec.sampling import SamplingError, SamplingParams
from parspec.speculative import build_proposer
from parspec.speculative.adaptive import AdaptiveDepth
from parspec.tokenizer import Tokenizer

log = logging.getLogger("parspec")


# warm_up(): prompt lengths whose prefills compile every attention query tile (16..128 rows).
WARM_UP_PROMPT_LENGTHS = (1, 2, 3, 5, 9, 17, 33, 65)


def _no_mark(phase: str) -> None:
    pass


class RequestError(ValueError):
    """A request is malformed (prompt too long, bad token ids, ...); the engine stays usable."""


def make_completions(prompt, params: SamplingParams, tokenizer, vocab_size: int, max_model_len: int, device,
                     request_id: str | None = None) -> list[Sequence]:
    """A request checked at the boundary (every engine's: bad input is named here) and its
    ``params.n`` completions, each a Sequence with its ``index``; completion i samples with
    seed + i."""
    if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
        token_ids, text = list(prompt["prompt_token_ids"]), prompt.get("prompt")
    elif isinstance(prompt, str):
        if tokenizer is None:
            raise RequestError("text prompts need a tokenizer (skip_tokenizer_init=True): "
                               "pass {'prompt_token_ids': [...]}")
        token_ids, text = tokenizer.encode(prompt), prompt
    else:
        raise RequestError(f"a prompt is a string or {{'prompt_token_ids': [...]}}, got {prompt!r:.80}")
    if not token_ids:
        raise RequestError("the prompt is empty")
    bad = [t for t in token_ids if not isinstance(t, int) or not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")
    if len(token_ids) >= max_model_len:
        raise RequestError(f"the prompt has {len(token_ids)} tokens, max_model_len is {max_model_len} "
                           "(room for at least one generated token is needed)")
    if not isinstance(params, SamplingParams):
        raise RequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
    bad_bias = [t for t in params.logit_bias or {} if t >= vocab_size]
    if bad_bias:
        raise SamplingError(f"logit_bias has token ids out of the vocabulary [0, {vocab_size}): {bad_bias[:5]}")
    if params.stop and tokenizer is None:
        raise RequestError(f"stop strings {params.stop!r} need a tokenizer (skip_tokenizer_init=True); "
                           "use stop_token_ids")
    first = Sequence(token_ids, params, request_id, text, 0, tokenizer)
    seqs = [first] + [Sequence(token_ids, params, first.request_id, text, i, tokenizer) for i in range(1, params.n)]
    for seq in seqs:
        if seq.seed is not None:
            seq.generator = torch.Generator(device).manual_seed(seq.seed)
    return seqs


class StepError(RuntimeError):
    """A step failed. The requests it ran (``request_ids``) are finished with finish_reason
    "error" and their blocks freed; every other request goes on with the next step()."""

    def __init__(self, message: str, request_ids: list[str]):
        super().__init__(message)
        self.request_ids = request_ids


def _fails_cleanly(step):
    """Wraps LLMEngine.step so that a failure hits only the step's own sequences: they are
    finished ("error"; "abort" for Ctrl-C) with their blocks freed, any step in flight is
    dropped, and the engine keeps serving everything else. An Exception surfaces as StepError
    naming the requests; KeyboardInterrupt and the like propagate as themselves."""

    @functools.wraps(step)
    def guarded(self):
        hit = list(self._inflight[0]) if self._inflight is not None else []  # read by this call
        self._batch = []  # _launch records what this call launches
        try:
            return step(self)
        except Exception as e:
            what = f"{type(e).__name__}: {e}"
            ids = self._fail(hit + self._batch, "error", what)
            raise StepError(f"an engine step failed ({what}); requests {ids} finished with 'error'", ids) from e
        except BaseException:
            self._fail(hit + self._batch, "abort", None)
            raise

    return guarded


class LLMEngine:
    def __init__(self, cfg: EngineConfig, speculative_config=None):
        self.cfg = cfg
        if cfg.pipeline_parallel_size != 1:  # never silently on one device
            raise ConfigError(f"LLMEngine runs the target on one device; pipeline_parallel_size="
                              f"{cfg.pipeline_parallel_size} runs in parspec.spd.engine.PipelineEngine (LLM picks it)")
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
        if cfg.batch_invariant:  # the target only: drafts never decide which tokens are emitted
            set_batch_invariant(self.model)
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
        # num_speculative_tokens "auto": each decode step verifies the depth k <= K that
        # maximises expected tokens per second (speculative/adaptive.py)
        self.depth_policy = AdaptiveDepth(k) if self.spec_config and self.spec_config.adaptive else None
        self._last_read: float | None = None  # host clock when the last decode step was read
        self._forced_depths: list[int] = []  # warm_up(): the depths its steps take, last first
        self.async_scheduling = use_graphs if cfg.async_scheduling is None else cfg.async_scheduling
        self._inflight: tuple[list[Sequence], StepOutput] | None = None  # a decode step launched, not yet read
        self._batch: list[Sequence] = []  # the sequences of the last launched step (what a failure hits)
        self._requests: dict[str, list[Sequence]] = {}  # unfinished request id -> its n completions
        self._changed: dict[int, Sequence] = {}  # seq_id -> completions with news for pop_deltas()
        self.runner = ModelRunner(self.model, num_blocks=num_blocks, block_size=cfg.block_size, device=self.device,
                                  dtype=self.dtype, aux_layers=aux, max_num_seqs=cfg.max_num_seqs,
                                  num_query_tokens=k + 1, max_positions=self.max_model_len + k + extra + 1,
                                  use_cuda_graphs=use_graphs)
        if self.proposer:
            self.proposer.allocate(num_blocks, cfg.block_size)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, k + extra,
                                   prefill_lookahead=extra, on_preempt=self._release_draft_state,
                                   decode_tokens=k + 1, chunked_prefill=cfg.enable_chunked_prefill)
        self.eos_token_ids = set(self.tokenizer.eos_token_ids if self.tokenizer else model_cfg.eos_token_id)
        self.runner.eos_token_ids = tuple(sorted(self.eos_token_ids))  # min_tokens masks them
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
        return num_kv_blocks(cfg, per_block, per_seq, self.device, self.max_model_len)

    # --- requests -----------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams, request_id: str | None = None) -> Sequence:
        """Queues a request: ``params.n`` completions under one request_id (each a Sequence with
        its ``index``). Returns completion 0; ``completions(request_id)`` lists them all."""
        seqs = make_completions(prompt, params, self.tokenizer, self.model_config.vocab_size, self.max_model_len,
                                self.device, request_id)
        if request_id is not None and request_id in self._requests:
            raise RequestError(f"request id {request_id!r} is already in use by an unfinished request")
        for seq in seqs:
            self.scheduler.add(seq)
        self._requests[seqs[0].request_id] = seqs
        return seqs[0]

    def completions(self, request_id: str) -> list[Sequence]:
        """An unfinished request's completions in index order ([] once all have finished)."""
        return list(self._requests.get(request_id, ()))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # --- the loop -----------------------------------------------------------------------
    @_fails_cleanly
    def step(self) -> list[Sequence]:
        """Schedule -> draft -> one target forward + verify -> advance. Returns finished sequences.

        With asynchronous scheduling a steady decode step is launched from the previous step's
        result ON THE DEVICE (next positions and last tokens are computed there), before the
        host reads that result, so the host's bookkeeping overlaps the GPU's work; the step
        then stays in flight until the next call. Anything else (context chunks to feed, a
        change of the running set, a sequence near its length limit) drains it first.

        A step with context chunks (prefill) runs the running sequences' decode rows and the
        chunks in one eager forward and is read at once (``_mixed_step``)."""
        finished = []
        if self._inflight is not None:
            if self._may_continue():
                return self._continue()
            finished = self._complete(*self._inflight)
            self._inflight = None
        batch = self.scheduler.schedule()
        if batch.prefill is not None:
            return finished + self._mixed_step(batch.decode, batch.prefill)
        seqs = batch.decode
        if not seqs:
            return finished
        out, _ = self._launch(seqs, None)
        if self._may_overlap(seqs):
            self._inflight = (seqs, out)
            return finished
        return finished + self._complete(seqs, out)

    def _launch(self, seqs: list[Sequence], previous: StepOutput | None,
                chunks: PrefillChunks | None = None) -> tuple[StepOutput | None, StepOutput | None]:
        """Draft, run the target and verify, all queued on the device; nothing is read back.
        Returns the decode rows' output and the chunks' (each None when there are none)."""
        # a failure from here until the step is read hits these (see _fails_cleanly)
        self._batch = seqs + chunks.seqs if chunks is not None else seqs
        mark = self.step_events.mark if self.step_events is not None and chunks is None else _no_mark
        mark("begin")
        began = time.perf_counter()
        proposal = self.proposer.propose(seqs) if self.proposer is not None and seqs else None
        depth = self._depth(seqs, steady=chunks is None) if proposal is not None else self.k
        mark("drafted")
        if proposal is not None:
            self.drafter_passes += proposal.drafter_passes
            self.depth_steps[depth] += 1
        out, prefilled = self.runner.step(seqs, proposal, previous, chunks, depth)  # one target forward + verification
        mark("verified")
        if self.proposer:  # EAGLE-3 and the draft LM draft the next step here
            if seqs:
                self.proposer.after_verify(seqs, out, False)
            if chunks is not None:
                self.proposer.after_verify(chunks.seqs, prefilled, True)
        mark("end")
        if out is not None:
            out.launched_at = began
        for seq in seqs:
            seq.inflight += depth + 1  # at most this many tokens arrive when the step is read
        return out, prefilled

    def _depth(self, seqs: list[Sequence], steady: bool) -> int:
        """The step's speculation depth: K, or the adaptive policy's choice for this batch (a
        step that also feeds context chunks takes the bucket's current choice, unmeasured)."""
        if self._forced_depths:  # warm_up()
            return self._forced_depths.pop()
        if self.depth_policy is None:
            return self.k
        bucket = self.runner.bucket(len(seqs))
        ids = [s.seq_id for s in seqs]
        return self.depth_policy.choose(ids, bucket) if steady else self.depth_policy.current(ids, bucket)

    def _complete(self, seqs: list[Sequence], out: StepOutput, steady: bool = True) -> list[Sequence]:
        """Read a decode step's result and advance its sequences. ``steady``: a decode-only step,
        whose cost the adaptive depth learns from."""
        out.fetch()  # the step's one host synchronisation
        read = time.perf_counter()
        if self.depth_policy is not None and steady:
            # GPU-bound and asynchronous, the step ran from when the previous one was read;
            # otherwise from its own launch.
            began = out.launched_at if self._last_read is None else max(out.launched_at, self._last_read)
            self.depth_policy.record_cost(self.runner.bucket(len(seqs)), out.depth, read - began)
        self._last_read = read if steady else None
        for seq in seqs:
            seq.inflight -= out.depth + 1
        live = [i for i, s in enumerate(seqs) if s.status != Status.FINISHED]  # finished while it ran
        if len(live) < len(seqs):
            seqs = [seqs[i] for i in live]
            out.tokens = [out.tokens[i] for i in live]
            out.num_drafts = [out.num_drafts[i] for i in live]
            if out.logprobs is not None:
                out.logprobs = [out.logprobs[i] for i in live]
        if self.proposer:
            self.proposer.observe(seqs, out, False)
        return self._advance(seqs, out, False)

    def _mixed_step(self, seqs: list[Sequence], chunks: PrefillChunks) -> list[Sequence]:
        """Decode rows and context chunks in one eager step, read at once (never left in flight)."""
        out, prefilled = self._launch(seqs, None, chunks)
        prefilled.fetch()  # queued after the decode rows' result: this one wait covers both
        if self.proposer:
            self.proposer.observe(chunks.seqs, prefilled, True)
        done = chunks.num_done
        for seq, n in zip(chunks.seqs[done:], chunks.lens[done:]):
            seq.num_cached += n  # a partial chunk: cached, nothing emitted
        finished = self._advance(chunks.seqs[:done], prefilled, True)
        self._last_read = None
        return finished + (self._complete(seqs, out, steady=False) if seqs else [])

    def _may_overlap(self, seqs: list[Sequence]) -> bool:
        """Whether the next step may be launched before this one is read: decode steps whose
        drafts live on the device, no context to prefill, and no sequence near max_model_len (a step
        launched past a finished sequence must stay inside its tables)."""
        if not self.async_scheduling or self.scheduler.has_prefill_work() or any(s.params.needs_history for s in seqs):
            return False
        if self.proposer is not None and not self.proposer.drafts_on_device:
            return False
        room = 2 * (self.k + 1) + self.drafter_slots
        return all(len(s) + s.inflight + room <= self.max_model_len for s in seqs)

    def _may_continue(self) -> bool:
        """Whether the in-flight step's batch can go on as it is: none of its sequences
        finished, exactly the running set, and room to grow without preempting."""
        seqs, _ = self._inflight
        if any(s.status == Status.FINISHED for s in seqs) or seqs != list(self.scheduler.running):
            return False
        if not self._may_overlap(seqs):
            return False
        return all(self.blocks.can_grow(s.block_table, len(s) + s.inflight + self.scheduler.lookahead) for s in seqs)

    def _continue(self) -> list[Sequence]:
        """Launch the next step from the in-flight one's device result, then read that result."""
        prev_seqs, prev_out = self._inflight
        batch = self.scheduler.schedule()
        seqs = batch.decode
        assert batch.prefill is None and seqs == prev_seqs, "the scheduler changed a batch the engine checked"
        out, _ = self._launch(seqs, prev_out)
        finished = self._complete(prev_seqs, prev_out)
        self._inflight = (seqs, out) if len(finished) < len(seqs) else None
        return finished

    def _advance(self, seqs: list[Sequence], out: StepOutput, prefill: bool) -> list[Sequence]:
        finished = []
        now = time.perf_counter()
        for i, (seq, tokens, num_drafts) in enumerate(zip(seqs, out.tokens, out.num_drafts)):
            seq.num_cached = len(seq) - 1 + len(tokens)  # fed tokens, accepted drafts included
            if not seq.inflight:  # a step still in flight reads and writes past this one's end
                # Roll back rejected slots; keep what the drafter wrote past them for the next step.
                self.blocks.shrink(seq.seq_id, seq.block_table, seq.num_cached + self.drafter_slots)
            if not prefill:
                seq.spec.record(num_drafts, len(tokens) - 1)
                self.stats.record(num_drafts, len(tokens) - 1)
                if self.depth_policy is not None:
                    self.depth_policy.observe(seq.seq_id, num_drafts, len(tokens) - 1)
            if not tokens:
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            self._changed[seq.seq_id] = seq
            logprobs = out.logprobs[i] if out.logprobs is not None and seq.logprobs is not None else None
            for j, token in enumerate(tokens):
                seq.token_ids.append(token)
                if logprobs is not None:
                    seq.logprobs.append(logprobs[j])
                reason = seq.check_stop(token, self.eos_token_ids, self.max_model_len)
                if reason is not None:  # the tokens after this one are dropped
                    self._finish(seq, *reason)
                    finished.append(seq)
                    break
        return finished

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None,
                error: str | None = None) -> None:
        """Takes a completion out of the engine: its blocks and drafter state freed at once,
        its final text set, a final delta queued for pop_deltas()."""
        if seq in self.scheduler.running:
            self.scheduler.finish(seq)
        else:  # waiting (a preempted one may still hold blocks) or between the queues
            if seq in self.scheduler.waiting:
                self.scheduler.waiting.remove(seq)
            self.blocks.free(seq.seq_id, seq.block_table)
        self._release_draft_state(seq)
        seq.status, seq.finish_reason, seq.stop_reason, seq.error = Status.FINISHED, reason, stop_reason, error
        seq.finish_time = time.perf_counter()
        seq.finalize_text(self.tokenizer)
        self._changed[seq.seq_id] = seq
        group = self._requests.get(seq.request_id)
        if group is not None and all(s.is_finished for s in group):
            del self._requests[seq.request_id]

    def pop_deltas(self) -> list[RequestDelta]:
        """Everything since the last call: one RequestDelta per completion that got tokens,
        finished, was aborted or failed, in the order that first happened. A completion's
        streamed text holds back the last (longest stop string - 1) characters until they are
        safe. Deltas wait here until popped (generate() takes its own requests' deltas)."""
        changed, self._changed = self._changed, {}
        return [seq.take_delta() for seq in changed.values()]

    def _release_draft_state(self, seq: Sequence) -> None:
        if self.proposer:
            self.proposer.release(seq)
        if self.depth_policy is not None:
            self.depth_policy.release(seq.seq_id)

    def reset_stats(self) -> None:
        """Speculation counters (summed over requests, vLLM's counting; see SpecStats);
        drafter_passes counts drafter forwards (K per step sequentially, 1 + draft_refine_passes in parallel)."""
        self.stats = SpecStats()
        self.drafter_passes = 0
        self.depth_steps = [0] * (self.k + 1)  # steps that drafted, by the depth they verified (K unless "auto")

    @property
    def draft_steps(self) -> int:
        """Engine steps that drafted (one per batch, not per sequence)."""
        return sum(self.depth_steps)

    @property
    def drafter_passes_per_step(self) -> float:
        return self.drafter_passes / self.draft_steps if self.draft_steps else 0.0

    def abort_request(self, request_id: str) -> bool:
        """Abort a request's completions, waiting or running: their KV blocks are freed at once
        (a step still in flight for them is queued on the device before anything that reuses
        them, and its result for them is discarded) and each gets a final "abort" delta.
        Returns whether the request was there, unfinished."""
        seqs = self._requests.get(request_id)
        if seqs is None:
            return False
        for seq in seqs:
            if not seq.is_finished:
                seq.inflight = 0
                self._finish(seq, "abort")
        return True

    def abort_all(self) -> None:
        self._drop_inflight()
        for request_id in list(self._requests):
            self.abort_request(request_id)

    def _drop_inflight(self) -> None:
        """Forget the step in flight: its device work is queued before anything that reuses its blocks."""
        if self._inflight is not None:
            for seq in self._inflight[0]:
                seq.inflight = 0
            self._inflight = None

    def _fail(self, hit: list[Sequence], reason: str, error: str | None) -> list[str]:
        """Finish the unfinished sequences a failed step ran; returns their request ids. A step
        that failed before launching anything (in the scheduler) hits what it was scheduling."""
        self._drop_inflight()
        hit = hit or list(self.scheduler.running) or list(self.scheduler.waiting)[:1]
        ids = []
        for seq in dict.fromkeys(hit):
            if not seq.is_finished:
                seq.inflight = 0
                self._finish(seq, reason, error=error)
                ids.append(seq.request_id)
        return list(dict.fromkeys(ids))

    def warm_up(self, max_batch: int | None = None) -> float:
        """Compile the kernels and capture the CUDA graphs of every decode batch bucket (and,
        with adaptive depth, every depth) now, as vLLM does at start-up, so no request waits
        for them; with adaptive depth, also measure each (bucket, depth) step's cost, so the
        policy starts knowing them. Then the variants other steps need (the attention tile of
        every prompt length class, sampled verification at every depth), so that serving compiles
        no Triton kernel (parspec.compiled_kernels counts them). Runs short dummy requests on an
        idle engine and leaves no trace (statistics, acceptance estimates, KV blocks, the global
        RNG). Returns the seconds it took."""
        if self.has_unfinished_requests():
            raise RuntimeError("warm_up() needs an idle engine")
        start = time.perf_counter()
        depths = self.depth_policy.candidates if self.depth_policy is not None else [self.k]
        limit = min(max_batch or self.cfg.max_num_seqs, self.cfg.max_num_seqs)
        buckets = [b for b in self.runner.buckets if b <= limit]
        params = SamplingParams(temperature=0.0, ignore_eos=True,
                                max_tokens=max(1, min(3 * len(depths) * (self.k + 1) + 2, self.max_model_len - 49)))
        # The first pass compiles and captures; the second is timed. Prompt lengths of both
        # classes Triton specialises integers on (a multiple of 16 or not), long enough for
        # the prefill kernels' tile sizes. At each depth: one step that also prefills a new
        # request (what every arrival causes while others decode), then two steady steps.
        for measure, length in ((False, 41), (True, 48)):
            prompts = [self._dummy_prompt(length), self._dummy_prompt(length + 7)]
            for b in buckets:
                # An arrival needs a free slot: the largest bucket runs one row short (on a GPU the
                # same bucket, since the ladder's steps are wider than one).
                rows = b - 1 if b == self.cfg.max_num_seqs and b > 1 else b
                ids = [self.add_request(prompts[0], params).request_id for _ in range(rows)]
                self.step()  # their prefill
                for d in depths:
                    self._forced_depths = [d] * 3
                    extra = self.add_request(prompts[1], params).request_id
                    self.step()  # decode rows at depth d and the new request's prefill, in one step
                    self.abort_request(extra)
                    while self._forced_depths and self.has_unfinished_requests():
                        self.step()
                self._abort_warm_up(ids)
            if not measure:
                self._compile_prefill_tiles_and_sampling(depths, params.max_tokens)
            if self.depth_policy is not None and not measure:
                self.depth_policy.buckets.clear()  # the capture pass's costs include compiling
        if self.depth_policy is not None:
            self.depth_policy.forget_acceptance()  # dummy prompts say nothing about real ones
        self._changed.clear()
        self._last_read = None
        self.reset_stats()
        return time.perf_counter() - start

    def _compile_prefill_tiles_and_sampling(self, depths: list[int], max_tokens: int) -> None:
        """warm_up()'s share for what the bucket sweep does not reach. The attention kernel's query
        tile is a power of two from the longest query (see attention._attn_config): one prefill
        per prompt of WARM_UP_PROMPT_LENGTHS, whose consecutive lengths at most double, meets
        every tile of the target and of the drafter (whose chunks carry its mask slots). Then
        one seeded sampled request (its own generator: the global RNG is left alone) verifies
        by rejection sampling at each depth, as a greedy warm-up never does."""
        once = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1)  # finishes in its prefill
        for n in WARM_UP_PROMPT_LENGTHS:
            if n < self.max_model_len - 1:
                self.add_request(self._dummy_prompt(n), once)
                self.step()
        sampled = SamplingParams(temperature=1.0, seed=0, ignore_eos=True, max_tokens=max_tokens)
        request_id = self.add_request(self._dummy_prompt(41), sampled).request_id
        self.step()  # its prefill: sampled verification of no drafts
        self._forced_depths = list(depths)
        while self._forced_depths and self.has_unfinished_requests():
            self.step()
        self._abort_warm_up([request_id])

    def _dummy_prompt(self, n: int) -> dict:
        """warm_up()'s prompt of ``n`` tokens (fewer if the context is shorter)."""
        vocab = self.model_config.vocab_size
        return {"prompt_token_ids": [1 + i % (vocab - 1) for i in range(min(n, self.max_model_len - 2))]}

    def _abort_warm_up(self, request_ids: list[str]) -> None:
        """Ends warm_up()'s dummy requests: aborted, a step still in flight read and dropped."""
        for request_id in request_ids:
            self.abort_request(request_id)
        while self._inflight is not None:
            self.step()
        self._forced_depths = []

    def generate(self, prompts, params, use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs ``prompts`` to the end; one RequestOutput each (with its n completions), in order.

        The engine may be busy: other requests share the steps, go on after this returns, and
        their deltas stay for pop_deltas() (this call takes its own). A step that fails for one
        of these requests, a bad prompt or Ctrl-C aborts this call's requests (only those) and
        re-raises; the engine stays usable. A failure that hit only other requests is theirs."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        groups: list[list[Sequence]] = []
        try:
            for prompt, sp in zip(prompts, params):
                groups.append(self.completions(self.add_request(prompt, sp).request_id))
            with tqdm(total=len(groups), desc="generate", disable=not use_tqdm, unit="req") as bar:
                self._run_until_finished(groups, bar)
        except BaseException:
            for group in groups:
                self.abort_request(group[0].request_id)
            raise
        finally:
            for seq in (s for group in groups for s in group):
                self._changed.pop(seq.seq_id, None)
        speculative = self.proposer is not None
        return [RequestOutput.from_sequences(group, speculative) for group in groups]

    def _run_until_finished(self, groups: list[list[Sequence]], bar) -> None:
        left = [group for group in groups if not all(s.is_finished for s in group)]
        while left:
            if not self.has_unfinished_requests():
                raise RuntimeError("generate(): the engine lost requests it had not finished")
            try:
                self.step()
            except StepError:
                if any(s.finish_reason == "error" for group in left for s in group):
                    raise
            still = [group for group in left if not all(s.is_finished for s in group)]
            bar.update(len(left) - len(still))
            left = still
