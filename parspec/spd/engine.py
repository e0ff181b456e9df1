"""The pipelined engine (rank 0): plain pipelined decoding and the SPD loop.

Rank 0 drives everything (see ``parspec.spd.pipeline``): it keeps the sequences, runs stage 0,
turns the tokens leaving the last stage into logits (final norm + lm_head, which the SPD
module shares anyway), verifies and samples, and tells the workers what each cycle carries.

A *cycle* advances every stage by one token. ``_Slot`` records what a stage holds in a cycle
(its micro-batch and the rows' positions); the list of slots is a shift register: what
stage i held in cycle c, stage i+1 holds in cycle c+1, and what stage n-1 held comes back to
rank 0 at the start of the next cycle (the *exit*).

* Plain pipelining: the sequences split into up to n micro-batches; a micro-batch re-enters
  stage 0 in the cycle its token exits, so with n micro-batches the pipeline stays full.
* SPD (``parspec/spd`` contract, issue 14): every sequence advances in lockstep as ONE
  micro-batch and a new token enters stage 0 every cycle: the SPD module's draft, or the
  target's token after a rejection. An exit's logits verify the draft right behind it
  (greedy match or rejection sampling with one draft, ``verify_greedy`` / ``verify_rejection``
  with K = 1); a rejection drops every in-flight token after it (their rows' later exits
  are ignored: they are older than the row's restart) and the corrected token enters. KV
  rollback is positional: a stage writes the slot of the token it processes and attends
  to positions <= it, so stale slots past the correction are overwritten before anyone
  reads them. The module drafts from the window [x_j(depth n), in-flight tokens at depths
  d-1..0], built from the previous cycle's stage outputs, while stage 0 computes (on its own
  CUDA stream on a GPU).
* SPD with an EAGLE-3 head (``"model"`` a head directory for this target, told from an SPD
  module by its config.json; ``parspec.spd.eagle3``, the semantics of ``simulate.Eagle3Drafting``):
  every stage carries the residual stream at the input of the head's aux layers it owns along
  with the activation ([rows, 2 + A, H]; the ``AUX`` command), so each exit brings rank 0 the
  aux features of the exiting token m, the row's *anchor*. The draft chains from it: step 0 is
  m's real entry (token x[m+1], fc(aux features of m), position m), steps 1..w-1 feed the next
  in-flight token with the previous step's output hidden at the next position, and the last
  step's argmax (or sample, its q recorded like the module's) is the draft. The head's K/V
  live in dense per-row buffers indexed by position (real entries stay, chained ones are
  overwritten by later real entries); the prompt's real entries are written at prefill. A row
  whose anchor moved restarts its chain (w passes); otherwise (refilling after a rejection) it
  extends it by one pass. Passes are batched over rows, padding rows writing a spare position;
  they run where the module runs, and the workers then send rank 0 nothing but the exit. The
  passes are one fixed-shape step (all n passes, which rows are real in which pass read from a
  schedule copied to the device; ``Eagle3Chain.forward_static``), a CUDA graph per (rows,
  attention span) with graphs on, so rank 0 launches one replay instead of every pass's
  kernels. The exit's anchor features are written in place on the drafting stream.

Each cycle has one host read on rank 0 (the verified tokens and the drafts to enter next);
per-cycle timings are CUDA events on a GPU, read at the end of a generate() call."""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from parspec.config import ConfigError, EngineConfig, ModelConfig, SpeculativeConfig, parse_dtype, read_json
from parspec.cuda_graphs import GraphCache
from parspec.engine.llm_engine import LLMEngine, RequestError, make_completions
from parspec.kv_cache import BlockManager, OutOfBlocks, kv_bytes_per_block, num_kv_blocks
from parspec.sampling import (BatchSampling, SamplingHistory, SamplingParams, probs_from_logits,
                              process_logits, token_logprobs, unpack_logprobs)
from parspec.sequence import RequestOutput, Sequence, SpecStats, Status, TokenLogprob
from parspec.spd.eagle3 import Eagle3Chain, check_spd_head, is_eagle3_dir, plan_rows
from parspec.spd.partition import stage_bounds
from parspec.spd.pipeline import (AUX, CYCLE, DTYPES, HEADER, INIT, KV, PHASE, TIMES, PipelineError, Stage, StageProcesses,
                                  cycle_command_size, launched_by_torchrun, prefill_payload, serve_stage,
                                  unpack_prefill)
from parspec.speculative.verify import draw_verification_noise, verify_greedy, verify_rejection
from parspec.transfer import to_device



@dataclass
class _Slot:
    """What one stage holds in one cycle: a micro-batch and its rows' positions (-1: idle row)."""

    micro_batch: int
    positions: list[int]


@dataclass
class _Token:
    token: int
    position: int
    entered: int  # the cycle it entered stage 0
    emitted: bool  # verified (or the target's own token); False: a draft awaiting verification


@dataclass
class _Row:
    seq: Sequence
    micro_batch: int
    index: int  # row inside its micro-batch
    inflight: deque = field(default_factory=deque)  # oldest first
    exit_token: int = 0  # x_j: the last token that left the last stage validly
    context: list[int] = field(default_factory=list)  # the module's context: x_{j-C}..x_{j-1}
    to_enter: int | None = None  # a token the target emitted that enters stage 0 this cycle
    done: bool = False
    chain_anchor: int = -1  # EAGLE-3: the anchor position of the row's current chain
    chain_len: int = 0  # ... and the chain steps computed from it


@dataclass
class PipelineTimes:
    """Per-cycle breakdown summed over a run (seconds): rank 0's stage 0, the module, every
    stage's compute and the cycles it was active in (a stage idles in some cycles of plain
    pipelining at low concurrency: its time is per active cycle), and the wall time of the
    cycles; transfer + host ~ cycle - slowest stage; rank 0's host work per cycle = cycle - the
    time it waited in the cycle's host read."""

    cycles: int = 0
    cycle_s: float = 0.0
    module_s: float = 0.0
    stage_s: list[float] = field(default_factory=list)
    stage_cycles: list[int] = field(default_factory=list)
    read_s: float = 0.0  # rank 0 blocked in the cycle's one host read (waiting for the GPUs)

    def as_dict(self) -> dict:
        per = (lambda x, k=self.cycles: 1e3 * x / k if k else 0.0)
        stage = [per(s, k) for s, k in zip(self.stage_s, self.stage_cycles)]
        slowest = max(stage, default=0.0)
        cycle = per(self.cycle_s)
        return {"cycles": self.cycles, "cycle_ms": cycle, "module_ms": per(self.module_s),
                "stage_ms": stage, "stage_active_cycles": list(self.stage_cycles), "slowest_stage_ms": slowest,
                "transfer_and_host_ms": max(cycle - slowest, 0.0),
                "rank0_host_ms": cycle - per(self.read_s), "rank0_read_wait_ms": per(self.read_s)}


class PipelineEngine:
    """``LLM(model, pipeline_parallel_size=n)``: the target over n stage processes; with
    ``speculative_config={"method": "spd", "model": DIR}`` (DIR: an SPD module or an EAGLE-3 head
    for this target; or a ``drafter`` callable with the SPD module's forward signature, for tests)
    the SPD loop, else plain pipelined decoding."""

    def __init__(self, cfg: EngineConfig, speculative_config=None, drafter=None):
        self.cfg = cfg
        n = self.num_stages = cfg.pipeline_parallel_size
        self.spec_config = SpeculativeConfig.from_any(speculative_config)
        if self.spec_config is not None and self.spec_config.method != "spd":
            raise ConfigError(f"pipeline_parallel_size={n} runs plain or with speculative method 'spd', "
                              f"not {self.spec_config.method!r}")
        for name, value in (("batch_invariant", cfg.batch_invariant), ("async_scheduling", cfg.async_scheduling)):
            if value:
                raise ConfigError(f"{name}={value!r} is not supported with pipeline_parallel_size={n}")
        if cfg.seed is not None:
            torch.manual_seed(cfg.seed)
        model_cfg = self.model_config = ModelConfig.from_pretrained(cfg.model)
        try:
            self.bounds = stage_bounds(model_cfg.num_hidden_layers, n)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        self.eagle3 = False  # SPD drafts with an EAGLE-3 head (Eagle3Chain), not the SPD module
        if self.spec_config is not None:
            path = self.spec_config.model
            if path and os.path.isdir(path) and is_eagle3_dir(path):
                check_spd_head(path, model_cfg)
                self.eagle3 = True
            else:
                _check_module_dir(path, n, self.bounds)
        self.device = _rank0_device(cfg)
        self.dtype = _resolve_dtype(cfg.dtype, model_cfg, self.device)
        self.max_model_len = LLMEngine._resolve_max_model_len(cfg.max_model_len, model_cfg)
        self.max_positions = self.max_model_len + n + 2  # drafts run up to n positions past the output
        self.k = 1
        self.drafter = drafter
        self._bar = None  # generate()'s progress bar (finished requests)
        self._pending: list = []  # rank 0's sends in flight: this cycle's
        self._sent_before: list = []  # and the previous cycle's
        self._timers: dict[str, list] = {"module": [], "stage0": []}  # GPU: (start, end) events
        self.times = PipelineTimes()
        if launched_by_torchrun() and int(os.environ["RANK"]) != 0:
            serve_stage(int(os.environ["RANK"]), n, cfg.model, self.device.type, None)
            raise SystemExit(0)  # a torchrun rank > 0 only serves its stage
        self.procs = StageProcesses(n, cfg.model, self.device)
        self._finalizer = weakref.finalize(self, StageProcesses.shutdown, self.procs)
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise
        self.tokenizer = None
        if not cfg.skip_tokenizer_init:
            from parspec.tokenizer import Tokenizer
            self.tokenizer = Tokenizer(cfg.model)
        eos = self.tokenizer.eos_token_ids if self.tokenizer else model_cfg.eos_token_id
        self.eos_token_ids = set(eos)
        self.stats = SpecStats()

    # --- set-up ---------------------------------------------------------------------------
    def _start(self) -> None:
        cfg, n = self.cfg, self.num_stages
        self.num_blocks = self._num_kv_blocks()
        self.pad_block = self.num_blocks
        self.blocks = BlockManager(self.num_blocks, cfg.block_size)
        ch = self.channel = self.procs.channel
        use_graphs = not cfg.enforce_eager and self.device.type == "cuda"
        ch.command([INIT, self.num_blocks, cfg.block_size, self.max_positions, DTYPES.index(self.dtype), n,
                    cfg.max_num_seqs, int(use_graphs)])
        self.stage = Stage(cfg.model, self.model_config, self.bounds, 0, self.dtype, self.device, self.num_blocks,
                           cfg.block_size, self.max_positions, cfg.max_num_seqs, use_graphs)
        for rank in range(1, n):  # each worker says it has loaded its stage
            ch.small_from(1, rank)
        self.module_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.use_graphs = use_graphs
        self.module_graphs: GraphCache | None = None
        if self.eagle3:
            self._start_eagle3()
        elif self.spec_config is not None:
            from parspec.spd.module import SPDModule
            model = self.stage.model
            self.drafter = SPDModule.from_pretrained(self.spec_config.model, model.model.embed_tokens,
                                                     model.model.norm, model.lm_head, self.device, self.dtype)

    def _start_eagle3(self) -> None:
        """Load the head on rank 0 and make every stage carry its aux features (AUX command)."""
        self.drafter = Eagle3Chain(self.spec_config.model, self.model_config, self.stage.model.model.embed_tokens,
                                   self.device, self.dtype, self.cfg.max_num_seqs, self.max_positions,
                                   self.num_stages)
        aux = self.drafter.aux_layers
        self.channel.command([AUX, len(aux)], torch.tensor(aux, dtype=torch.int64))
        self.stage.set_aux(aux)
        # The head's static step replays beside stage 0 like the module's graph: its own
        # capture stream, hence its own cuBLAS workspace (see _module_buffers).
        capture = torch.cuda.Stream(self.device) if self.use_graphs else None
        self.eagle3_graphs = GraphCache(self.drafter.forward_static, enabled=self.use_graphs,
                                        capture_error_mode="thread_local", capture_stream=capture)

    def _module_buffers(self) -> None:
        """Static window buffers and graphs of the module (again if the drafter was replaced)."""
        if self.module_graphs is not None and self._graphed_drafter is self.drafter:
            return
        n, rows, hidden = self.num_stages, self.cfg.max_num_seqs, self.model_config.hidden_size
        self.context = getattr(getattr(self.drafter, "config", None), "context", 0)
        t = self.context + n + 1
        self.module_window = torch.zeros(3, rows, t, dtype=torch.int64, device=self.device)
        # sources: 0 none, 1..n-1 the stages' outputs, n the exit x_j, n + k the context x_{j-k}
        self.module_sources = torch.zeros(t, rows, hidden, dtype=self.dtype, device=self.device)
        # The module's graph replays beside stage 0's, on another stream: its own memory pool, and
        # its own capture stream, hence its own cuBLAS workspace (a shared one is a race).
        capture = torch.cuda.Stream(self.device) if self.use_graphs else None
        self.module_graphs = GraphCache(self._module_forward, enabled=self.use_graphs,
                                        capture_error_mode="thread_local", capture_stream=capture)
        self._graphed_drafter = self.drafter

    def _num_kv_blocks(self) -> int:
        cfg, mc, n = self.cfg, self.model_config, self.num_stages
        layers = max(b - a for a, b in zip(self.bounds, self.bounds[1:]))
        per_block = kv_bytes_per_block(layers, cfg.block_size, mc.num_key_value_heads, mc.head_dim, self.dtype)
        per_seq = -(-self.max_positions // cfg.block_size)
        weights = sum(os.path.getsize(f) for f in _weight_files(cfg.model)) // n  # this stage's share, roughly
        return num_kv_blocks(cfg, per_block, per_seq, self.device, self.max_model_len,
                             reserved_bytes=weights if self.device.type == "cuda" else 0)

    def shutdown(self) -> None:
        """Stop the worker processes and leave the process group (also at garbage collection)."""
        self._finalizer()

    # --- requests -------------------------------------------------------------------------
    def generate(self, prompts, params, use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs ``prompts`` to the end, ``max_num_seqs`` completions at a time; one RequestOutput
        per prompt (with ``params.n`` completions)."""
        if self.procs.closed:
            raise PipelineError(self.procs.failure or "the pipeline has been shut down")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None:
            params = SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise RequestError(f"{len(prompts)} prompts but {len(params)} sampling params")
        groups = [make_completions(p, sp, self.tokenizer, self.model_config.vocab_size, self.max_model_len,
                                   self.device) for p, sp in zip(prompts, params)]
        seqs = [s for group in groups for s in group]
        size = self.cfg.max_num_seqs
        try:
            with tqdm(total=len(seqs), desc="generate", disable=not use_tqdm, unit="req") as self._bar:
                for i in range(0, len(seqs), size):
                    self._run(seqs[i:i + size])
        except RequestError:
            raise
        except BaseException as e:
            # the workers' state is unknown after a failure in the middle of a cycle
            self.procs.failure = self.procs.failure or f"the pipeline stopped after an error in generate(): {e!r}"
            self.shutdown()
            raise
        return [RequestOutput.from_sequences(group, self.spd) for group in groups]

    @property
    def spd(self) -> bool:
        return self.drafter is not None

    # --- one group of sequences -------------------------------------------------------------
    @torch.inference_mode()
    def _run(self, seqs: list[Sequence]) -> None:
        rows = self._place(seqs)
        try:
            self._phase(rows)
            self._prefill(rows)
            self._cycles(rows)
        finally:
            self.last_block_tables = {r.seq.request_id: list(r.seq.block_table) for r in rows}
            for row in rows:
                self.blocks.free(row.seq.seq_id, row.seq.block_table)

    def _place(self, seqs: list[Sequence]) -> list[_Row]:
        """Blocks for each sequence's whole run (prompt + output + the drafts in flight) and its
        micro-batch: one for SPD (lockstep), else up to n."""
        n = self.num_stages
        for seq in seqs:
            room = self.max_model_len if seq.params.max_tokens is None else min(
                self.max_model_len, len(seq) + seq.params.max_tokens)
            try:
                self.blocks.grow(seq.seq_id, seq.block_table, room + n + 1)
            except OutOfBlocks as e:
                for s in seqs:
                    self.blocks.free(s.seq_id, s.block_table)
                raise RequestError(f"the KV cache cannot hold these {len(seqs)} sequences at once ({e}); lower "
                                   "max_num_seqs or max_tokens, or give the cache more blocks") from e
            seq.status = Status.RUNNING
        groups = 1 if self.spd else min(n, len(seqs))
        self.rows_per_mb = -(-len(seqs) // groups)
        self.num_mb = groups
        return [_Row(seq, i // self.rows_per_mb, i % self.rows_per_mb) for i, seq in enumerate(seqs)]

    def _phase(self, rows: list[_Row]) -> None:
        width = max(len(r.seq.block_table) for r in rows)
        tables = torch.full((self.num_mb, self.rows_per_mb, width), self.pad_block, dtype=torch.int64)
        for r in rows:
            tables[r.micro_batch, r.index, :len(r.seq.block_table)] = torch.tensor(r.seq.block_table)
        self.channel.command([PHASE, self.num_mb, self.rows_per_mb, width], tables.flatten())
        self.channel.set_command_size(cycle_command_size(self.num_stages, self.rows_per_mb))
        self.stage.tables = tables.to(torch.int32).to(self.device)
        self.sampling = self._batch_sampling([r.seq for r in rows])
        self.generators = [r.seq.generator for r in rows]
        vocab = self.model_config.vocab_size
        ring = self.num_stages + 1
        # draft distributions by the cycle their token enters (mod n+1); greedy batches need none
        self.q_ring = None if self.sampling.all_greedy or not self.spd else torch.zeros(
            ring, len(rows), vocab, dtype=torch.float32, device=self.device)
        self.drafts = None  # [B] device: the module's drafts for the next cycle
        if self.eagle3:
            self.context = 0  # the module's context tokens: none
        elif self.spd:
            self._module_buffers()
        self.drafts_host: list[int] | None = None  # the same, read with the cycle's one host read

    def _prefill(self, rows: list[_Row]) -> None:
        """Every prompt through every stage in one ragged pass; the first output token of each
        row is sampled from its last prompt token's logits."""
        bs = self.cfg.block_size
        positions, slots, cu, seq_lens, ids = [], [], [0], [], []
        for r in rows:
            seq, table = r.seq, r.seq.block_table
            for p in range(len(seq)):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            ids.extend(seq.token_ids)
            cu.append(cu[-1] + len(seq))
            seq_lens.append(len(seq))
        header, payload = prefill_payload(positions, slots, cu, seq_lens, [r.seq.block_table for r in rows])
        self.channel.command(header, payload)
        pos, meta = unpack_prefill(header, payload, self.device)
        out = self.stage.run(None, to_device(ids, torch.int64, self.device), pos, meta)
        self._pending.append(self.channel.send(out, 1))
        back, work = self.channel.recv(out.shape, self.dtype, self.num_stages - 1)
        self.channel.wait(work, host=self.device.type == "cpu")
        last = back[to_device(cu[1:], torch.int64, self.device) - 1]  # [B, 2, H]
        tokens, _, packed = self._verify(self._logits(last), list(range(len(rows))), [None] * len(rows),
                                         [r.seq for r in rows])
        host = torch.cat([tokens] if packed is None else [tokens, packed.flatten()]).tolist()
        logprobs = self._unpack_logprobs(host[len(rows):], [r.seq for r in rows], host[:len(rows)])
        now = time.perf_counter()
        for i, (r, t) in enumerate(zip(rows, host[:len(rows)])):
            r.exit_token = r.seq.token_ids[-1]
            r.seq.first_token_time = now
            self._emit(r, t, logprobs[i])
            if not r.done:
                r.to_enter = t
        self.exit_feat = last[:, :2].sum(dim=1)  # x_p at depth n, per row (SPD's window)
        if self.eagle3:
            if self.module_stream is not None:  # the previous group's last draft may still use the head's buffers
                torch.cuda.current_stream(self.device).wait_stream(self.module_stream)
            self.drafter.prefill([r.seq.token_ids[:r.seq.num_prompt_tokens] for r in rows], back, cu)
        if self.spd and self.context:  # the prompt's tokens before x_p, at depth n
            C = self.context
            for r in rows:
                r.context = r.seq.token_ids[:r.seq.num_prompt_tokens][-1 - C:-1]
            k = torch.arange(1, C + 1, device=self.device)[:, None]
            at = to_device(cu[1:], torch.int64, self.device)[None] - 1 - k  # [C, B]
            starts = to_device(cu[:-1], torch.int64, self.device)[None]
            self.history = torch.where((at >= starts)[..., None], back[at.clamp(min=0)].sum(dim=2), 0)

    # --- the cycles -----------------------------------------------------------------------------
    def _cycles(self, rows: list[_Row]) -> None:
        n = self.num_stages
        held: list[_Slot | None] = [None] * n  # what each stage held in the previous cycle
        ready = deque(range(self.num_mb))  # micro-batches whose token waits to enter stage 0
        stage0_out = None
        times = self.times
        c = 0
        while True:
            t0 = self._clock()
            self._flush(keep_last=True)
            # Stages 1..n-1 take over what the stage before held, whatever this cycle's verification
            # says (a dropped token's work is ignored at its exit), so the workers get their orders
            # before rank 0 waits for the exit: they need not idle through its round trip.
            if any(s is not None for s in held[:-1]):
                self._pending.append(self._command([None] + held[:-1]))
            exit_pair, features = self._receive(held, stage0_out)
            if held[n - 1] is not None:
                mb = held[n - 1].micro_batch
                self._exit(c, [r for r in rows if r.micro_batch == mb], exit_pair)
                if not self.spd:
                    ready.append(mb)
            elif self.spd and self.drafts is not None:
                self._read_drafts(rows, None)
            entry = self._enter(c, rows, ready)
            now = [entry] + held[:-1]
            if all(s is None for s in now):
                break
            inputs_ready = self._mark()  # the window's inputs are queued; stage 0 first, the module beside it
            window_inputs = features, self.exit_feat
            if entry is not None:
                stage0_out = self._stage0(entry, rows)
                self._pending.append(self.channel.send(stage0_out, 1))
            else:
                stage0_out = None
            if self.eagle3:
                self._draft_eagle3(c, rows, inputs_ready)
            elif self.spd:
                self._draft(c, rows, *window_inputs, inputs_ready)
            held = now
            c += 1
            times.cycles += 1
            times.cycle_s += self._clock() - t0
        self._collect_times()

    def _command(self, slots: list[_Slot | None]):
        """A CYCLE command: each stage's slot (stage 0's is rank 0's own business), not waited for."""
        command = [CYCLE, self.rows_per_mb, int(self._module_features)] + [0] * (HEADER - 3)
        for s in slots:
            command += [0, -1] + [-1] * self.rows_per_mb if s is None else [1, s.micro_batch] + s.positions
        return self.channel.command(command, wait=False)

    def _receive(self, held: list[_Slot | None], stage0_out):
        """The previous cycle's outputs that come back to rank 0: the exit pair from the last
        stage and, for SPD, every stage's output (stage 0's is local)."""
        n, shape = self.num_stages, (self.rows_per_mb, self.stage.width, self.model_config.hidden_size)
        host = self.device.type == "cpu"
        features = [stage0_out if held[0] is not None else None]
        for i in range(1, n - 1):
            if self._module_features and held[i] is not None:
                buf, work = self.channel.recv(shape, self.dtype, i)
                self.channel.wait(work, host=host)
                features.append(buf)
            else:
                features.append(None)
        exit_pair = None
        if held[n - 1] is not None:
            exit_pair, work = self.channel.recv(shape, self.dtype, n - 1)
            self.channel.wait(work, host=host)
        return exit_pair, features

    @property
    def _module_features(self) -> bool:
        """Every stage sends its output to rank 0 too (the SPD module's window; not EAGLE-3's)."""
        return self.spd and not self.eagle3

    def _exit(self, c: int, mb_rows: list[_Row], exit_pair: torch.Tensor) -> None:
        """Tokens leaving the last stage: a valid exit (the row's oldest in-flight token, not one
        dropped by a rejection) verifies the draft behind it or samples the next token."""
        n = self.num_stages
        valid = [r for r in mb_rows if not r.done and r.inflight and r.inflight[0].entered == c - n]
        drafts = []
        for r in valid:
            x = r.inflight.popleft()
            if self.spd and self.context:
                r.context = (r.context + [r.exit_token])[-self.context:]
            r.exit_token = x.token
            nxt = r.inflight[0] if r.inflight else None
            drafts.append(nxt if nxt is not None and not nxt.emitted else None)
        idx = to_device([r.index for r in valid], torch.int64, self.device)
        if self.eagle3 and valid:  # the exited tokens become their rows' anchors
            self._new_anchors(idx, exit_pair[idx, 2:])
        elif self.spd and valid:
            # out of place: the module (its own stream on a GPU) may still read the old one
            if self.context:  # the old x_j becomes context 1, context k becomes k + 1
                moved = torch.cat([self.exit_feat[idx][None], self.history[:-1, idx]])
                self.history = self.history.index_copy(1, idx, moved)
            self.exit_feat = self.exit_feat.index_copy(0, idx, exit_pair[idx, :2].sum(dim=1))
        if not valid:
            if self.spd and self.drafts is not None:
                self._read_drafts(mb_rows, None)
            return
        pairs = exit_pair[idx]
        tokens, accepted, packed = self._verify(self._logits(pairs), [r.index if self.spd else None for r in valid],
                                                drafts, [r.seq for r in valid])
        verdicts = torch.cat([tokens, accepted.long()] + ([] if packed is None else [packed.flatten()]))
        host = self._read_drafts(mb_rows, verdicts) if self.spd else self._host_read(verdicts)
        k = len(valid)
        tokens_h, acc_h = host[:k], host[k:2 * k]
        logprobs = self._unpack_logprobs(host[2 * k:], [r.seq for r in valid], tokens_h)
        for r, draft, t, acc, lp in zip(valid, drafts, tokens_h, acc_h, logprobs):
            if draft is not None:
                r.seq.spec.record(1, int(acc))
                self.stats.record(1, int(acc))
                if acc:
                    draft.emitted = True
                    self._emit(r, draft.token, lp)
                    continue
                r.inflight.clear()  # the rejected draft and everything behind it
            self._emit(r, t, lp)
            if not r.done:
                r.to_enter = t

    def _read_drafts(self, rows: list[_Row], extra: torch.Tensor | None) -> list[int]:
        """The cycle's one host read: the module's drafts (for the rows' next entries) and
        ``extra`` (the verified tokens) together. Returns ``extra`` on the host."""
        if self.drafts is None:
            return [] if extra is None else self._host_read(extra)
        if self.module_stream is not None:  # the drafts (and their q) come from the module's stream
            torch.cuda.current_stream(self.device).wait_stream(self.module_stream)
        packed = self.drafts if extra is None else torch.cat([extra, self.drafts])
        values = self._host_read(packed)
        split = 0 if extra is None else extra.numel()
        self.drafts_host = values[split:]
        self.drafts = None
        return values[:split]

    def _host_read(self, values: torch.Tensor) -> list:
        """A cycle's one host read, timed (the wait is the GPUs' and the links', not the host's)."""
        t0 = self._clock()
        out = values.tolist()
        self.times.read_s += self._clock() - t0
        return out

    def _enter(self, c: int, rows: list[_Row], ready: deque) -> _Slot | None:
        """What enters stage 0 this cycle. SPD: for every live row, the target's token if it just
        emitted one, else the module's draft. Plain: the next ready micro-batch's tokens."""
        if self.spd:
            mb = 0
            candidates = rows
        else:
            while ready and all(r.done for r in rows if r.micro_batch == ready[0]):
                ready.popleft()
            if not ready:
                return None
            mb = ready.popleft()
            candidates = [r for r in rows if r.micro_batch == mb]
        positions = [-1] * self.rows_per_mb
        self.entry_ids = [0] * self.rows_per_mb
        any_entry = False
        for r in candidates:
            if r.done:
                continue
            if r.to_enter is not None:
                tok, emitted = r.to_enter, True
                r.to_enter = None
                r.inflight.clear()
            elif self.spd and r.inflight and self.drafts_host is not None:
                tok, emitted = self.drafts_host[r.index], False
            else:
                continue
            pos = r.inflight[-1].position + 1 if r.inflight else len(r.seq) - 1
            r.inflight.append(_Token(tok, pos, c, emitted))
            positions[r.index] = pos
            self.entry_ids[r.index] = tok
            any_entry = True
        return _Slot(mb, positions) if any_entry else None

    def _stage0(self, entry: _Slot, rows: list[_Row]) -> torch.Tensor:
        ids = to_device(self.entry_ids, torch.int64, self.device)
        positions = to_device(entry.positions, torch.int64, self.device)
        start = self._timer_start(None)
        out = self.stage.cycle(entry.micro_batch, positions, input_ids=ids)
        self._timer_stop("stage0", start, None)
        return out

    # --- the SPD module ---------------------------------------------------------------------------
    def _mark(self):
        """An event on the main stream (GPU) the module's stream waits for; None on the CPU."""
        if self.module_stream is None:
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def _draft(self, c: int, rows: list[_Row], features: list[torch.Tensor | None], exit_feat: torch.Tensor,
               ready) -> None:
        """Draft every row's next token from its window; runs beside stage 0 (its own stream on a
        GPU, which waits only for ``ready``: the window's inputs, not stage 0's work)."""
        n, b, C = self.num_stages, len(rows), self.context
        t = C + n + 1
        window = torch.zeros(3, b, t, dtype=torch.int64)  # token ids, depths, feature sources
        ids, depths, src = window  # src 0: no feature; k in 1..n-1: stage k-1's output; n: the exit
        depths.fill_(-1)
        for r in rows:
            for k, token in enumerate(reversed(r.context), start=1):  # x_{j-k} in slot C - k
                depths[r.index, C - k], ids[r.index, C - k], src[r.index, C - k] = n, token, n + k
            inflight = list(r.inflight)
            d = len(inflight)
            for k in range(d):  # depth k: the token that entered k cycles ago
                slot = t - 1 - k
                depths[r.index, slot] = k
                ids[r.index, slot] = inflight[d - 1 - k].token
                src[r.index, slot] = k
            depths[r.index, t - 1 - d] = n
            ids[r.index, t - 1 - d] = r.exit_token
            src[r.index, t - 1 - d] = n
        reads = [exit_feat] + [f for f in features if f is not None] + ([self.history] if C else [])
        with self._beside_stage0(ready, reads) as stream:
            host = window.pin_memory() if stream is not None else window
            self.module_window[:, :b].copy_(host, non_blocking=True)
            for k, f in enumerate(features[:n - 1] + [exit_feat], start=1):
                slot = self.module_sources[k, :b]
                if f is None:
                    slot.zero_()
                elif f.dim() == 3:  # a stage's (hidden, residual) pair: the residual stream
                    torch.sum(f, dim=1, out=slot)
                else:
                    slot.copy_(f)
            if C:
                self.module_sources[n + 1:, :b].copy_(self.history)
            logits = self.module_graphs.run(b)
            self.drafts = self._sample_drafts(c + 1, logits)

    @contextlib.contextmanager
    def _beside_stage0(self, ready, reads: list[torch.Tensor] = ()):
        """The drafter's work, timed as "module": on a GPU on its own stream, which waits only for
        ``ready`` (its inputs queued), not for stage 0; ``reads``: main-stream tensors it reads,
        kept from reuse until it ran. Yields the stream (None on the CPU)."""
        stream = self.module_stream
        if stream is not None:
            stream.wait_event(ready)
            for t in reads:
                t.record_stream(stream)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            start = self._timer_start(stream)
            yield stream
            self._timer_stop("module", start, stream)

    def _draft_eagle3(self, c: int, rows: list[_Row], ready) -> None:
        """EAGLE-3: every live row's chain from its anchor through its in-flight tokens (see
        ``parspec.spd.eagle3``), beside stage 0 like the module; the schedule is host-known."""
        plans = plan_rows(rows, lambda r: not r.done and bool(r.inflight))
        with self._beside_stage0(ready):
            sampled = self.q_ring is not None
            drafts, q = self.drafter.draft(plans, self.sampling if sampled else None,
                                           self.generators if sampled else None, run=self._eagle3_step)
            if q is not None:  # the draft's distribution, for verification by the cycle it enters
                self.q_ring[(c + 1) % (self.num_stages + 1)] = q
            self.drafts = drafts

    def _new_anchors(self, idx: torch.Tensor, aux: torch.Tensor) -> None:
        """The exit's aux features become ``idx``'s anchors, in place (the head's graphs read that
        buffer). On a GPU the write runs on the drafting stream, after the main stream's exit work:
        in stream order after the previous draft read the old anchors and before the next draft,
        without making the main stream wait for the draft."""
        stream = self.module_stream
        if stream is None:
            self.drafter.exited(idx, aux)
            return
        stream.wait_stream(torch.cuda.current_stream(self.device))
        for t in (idx, aux):
            t.record_stream(stream)  # main-stream memory read there: not reused before the write ran
        with torch.cuda.stream(stream):
            self.drafter.exited(idx, aux)

    def _eagle3_step(self, key: tuple[int, int]) -> torch.Tensor:
        """The head's static step for (rows, span): its CUDA graph replayed with graphs on, else
        run eagerly. A key's first call with graphs on warms up, captures and replays: three
        runs of a step that updates the chain state in place, so they run all-idle passes and
        the real schedule then replays once."""
        graphs = self.eagle3_graphs
        if graphs.enabled and key not in graphs.graphs:
            with self.drafter.idle_passes(key[0]):
                graphs.run(key)
        return graphs.run(key)

    def _module_forward(self, b: int) -> torch.Tensor:
        """The module over the static window buffers (captured as a CUDA graph per row count on
        a GPU, with graphs on): features gathered per slot from their sources, then logits."""
        ids, depths, src = self.module_window[:, :b]
        rows = torch.arange(b, device=self.device)[:, None]
        return self.drafter(ids, depths, self.module_sources[src, rows])

    def _sample_drafts(self, enters: int, logits: torch.Tensor) -> torch.Tensor:
        """Greedy rows: the argmax. Sampled rows: a draw from q (the request's processed draft
        distribution), recorded for verification by the cycle the draft enters."""
        if self.q_ring is None:
            return logits.argmax(dim=-1)
        q = probs_from_logits(logits.float(), self.sampling)
        self.q_ring[enters % (self.num_stages + 1)] = q
        _, noise = draw_verification_noise(q.shape[0], 0, q.shape[1], self.generators, self.device)
        return (q / noise).argmax(dim=-1)

    # --- logits, verification, output -------------------------------------------------------------
    def _logits(self, pairs: torch.Tensor) -> torch.Tensor:
        model = self.stage.model
        hidden, _ = model.model.norm.add_forward(pairs[:, 0], pairs[:, 1])
        return model.compute_logits(hidden)

    def _verify(self, logits: torch.Tensor, rows: list[int | None], drafts: list[_Token | None],
                seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Each row's next token: with a draft, verification of that one draft (K = 1; the bonus
        is ignored, the next exit brings the logits it needs); without, a plain sample. Returns
        the emitted tokens [R], whether the draft was accepted [R], and the emitted tokens'
        packed logprobs (None when no row asked)."""
        r_count, vocab = logits.shape
        has = to_device([d is not None for d in drafts], torch.int32, self.device)
        draft_ids = to_device([[d.token if d is not None else 0] for d in drafts], torch.int64, self.device)
        gens = [s.generator for s in seqs]
        plain = self.sampling.all_greedy and not self.sampling.needs_processing and self.sampling.max_logprobs < 0
        sampling = self.sampling if plain else self._batch_sampling(seqs)
        # min_tokens, logit_bias and the penalties, with each row's output so far (the verified
        # position follows it): the distribution the non-speculative sampler would use
        history = SamplingHistory.build([s.output_token_ids for s in seqs], r_count, vocab, self.device) \
            if sampling.needs_history else None
        target = process_logits(logits[:, None], sampling, history)  # [R, 1, V] float32
        if sampling.all_greedy:
            out, acc = verify_greedy(draft_ids, has, target.expand(r_count, 2, vocab).contiguous())
        else:
            p = probs_from_logits(target, sampling)
            q = torch.zeros(r_count, 1, vocab, dtype=torch.float32, device=self.device)
            picked = [(i, d.entered % (self.num_stages + 1), row) for i, (row, d) in enumerate(zip(rows, drafts))
                      if d is not None]
            if picked:  # each draft's q, kept by the cycle it entered
                i, slot, row = (to_device(x, torch.int64, self.device) for x in zip(*picked))
                q[i, 0] = self.q_ring[slot, row]
            uniforms, noise = draw_verification_noise(r_count, 1, vocab, gens, self.device)
            out, acc = verify_rejection(draft_ids, has, q, torch.cat([p, p], dim=1), uniforms, noise)
        # the emitted token's logprob under the raw logits (vLLM's default), when a row asked
        packed = None if sampling.max_logprobs < 0 else token_logprobs(logits[:, None], out[:, :1],
                                                                         sampling.max_logprobs)[:, 0]
        return out[:, 0], acc, packed

    @staticmethod
    def _unpack_logprobs(ints: list[int], seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprob | None]:
        """Host ints of ``token_logprobs``' layout (one row per sequence) -> each sequence's
        entry for its emitted token ``tokens[i]`` (None where it did not ask, or nobody did)."""
        if not ints:
            return [None] * len(seqs)
        logprob, rank, top_ids, top_lp = (x.tolist() for x in unpack_logprobs(
            torch.tensor(ints, dtype=torch.int64).view(len(seqs), -1)))
        return [None if s.params.logprobs is None else
                TokenLogprob(tokens[i], logprob[i], rank[i],
                             list(zip(top_ids[i][:s.params.logprobs], top_lp[i][:s.params.logprobs])))
                for i, s in enumerate(seqs)]

    def _batch_sampling(self, seqs: list[Sequence]) -> BatchSampling:
        return BatchSampling.from_params([s.params for s in seqs], self.device,
                                         prompts=[s.penalized_prompt for s in seqs],
                                         vocab_size=self.model_config.vocab_size, eos_token_ids=self.eos_token_ids)

    def _emit(self, row: _Row, token: int, logprob: TokenLogprob | None = None) -> None:
        seq = row.seq
        seq.token_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        reason = seq.check_stop(token, self.eos_token_ids, self.max_model_len)
        if reason is not None:
            row.done = True
            seq.status, seq.finish_reason, seq.stop_reason = Status.FINISHED, *reason
            seq.finish_time = time.perf_counter()
            seq.finalize_text(self.tokenizer)
            if self._bar is not None:
                self._bar.update(1)

    # --- timing -----------------------------------------------------------------------------------
    def _clock(self) -> float:
        return time.perf_counter()

    def _flush(self, keep_last: bool = False) -> None:
        """Wait for rank 0's sends. A gloo send completes only once its receiver has posted the
        receive, which a worker does in the cycle after the send: ``keep_last`` leaves the
        previous cycle's sends alone."""
        if keep_last:
            done, self._sent_before, self._pending = self._sent_before, self._pending, []
        else:
            done, self._sent_before, self._pending = self._sent_before + self._pending, [], []
        for work in done:
            self.channel.wait(work, host=self.device.type == "cpu")


    def _timer_start(self, stream):
        """A host clock on the CPU; a CUDA event on a GPU (read once, at the end of the run)."""
        if self.device.type == "cpu":
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream or torch.cuda.current_stream(self.device))
        return ev

    def _timer_stop(self, name: str, start, stream) -> None:
        if self.device.type == "cpu":
            self._timers[name].append(time.perf_counter() - start)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(stream or torch.cuda.current_stream(self.device))
        self._timers[name].append((start, end))

    def _timer_total(self, name: str) -> float:
        marks, self._timers[name] = self._timers[name], []
        if not marks or self.device.type == "cpu":
            return float(sum(marks))
        marks[-1][1].synchronize()
        return sum(s.elapsed_time(e) for s, e in marks) / 1e3

    def _collect_times(self) -> None:
        """Stage 0 and module timings, and each worker's compute time (one TIMES command)."""
        self._flush()
        n, times = self.num_stages, self.times
        if len(times.stage_s) < n:
            times.stage_s, times.stage_cycles = [0.0] * n, [0] * n
        times.stage_cycles[0] += len(self._timers["stage0"])
        times.stage_s[0] += self._timer_total("stage0")
        times.module_s += self._timer_total("module")
        self.channel.command([TIMES])
        for rank in range(1, n):
            compute_s, active = self.channel.small_from(2, rank).tolist()
            times.stage_s[rank] += compute_s
            times.stage_cycles[rank] += int(active)

    def stage_kv_caches(self) -> list[torch.Tensor]:
        """Every stage's KV cache (``[layers of the stage, 2, blocks, block_size, kv heads, D]``),
        copied to rank 0; with ``last_block_tables`` it shows what each stage holds."""
        self.channel.command([KV])
        caches = [self.stage.kv_cache.clone()]
        shape = list(self.stage.kv_cache.shape)
        for rank in range(1, self.num_stages):
            shape[0] = self.bounds[rank + 1] - self.bounds[rank]
            buf, work = self.channel.recv(tuple(shape), self.dtype, rank)
            self.channel.wait(work, host=self.device.type == "cpu")
            caches.append(buf)
        return caches

    def reset_stats(self) -> None:
        self.stats = SpecStats()
        self.times = PipelineTimes()


def _rank0_device(cfg: EngineConfig) -> torch.device:
    device = cfg.resolved_device()
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if launched_by_torchrun() else 0)
    return device


def _resolve_dtype(dtype: str, model_cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        return parse_dtype(dtype)
    if device.type == "cpu":
        return torch.float32
    return parse_dtype(model_cfg.torch_dtype) if model_cfg.torch_dtype in ("bfloat16", "float16") else torch.bfloat16


def _check_module_dir(path: str, n: int, bounds: list[int]) -> None:
    """The SPD module's config.json must be for n stages split as this target splits (its
    features are per stage depth)."""
    if not path:
        raise ConfigError("speculative method 'spd' needs \"model\": the SPD module's directory")
    cfg = read_json(os.path.join(path, "config.json"), "SPD module config.json")
    stages = cfg.get("num_stages")
    if stages != n:
        raise ConfigError(f"the SPD module in {path} was built for num_stages={stages!r}, but "
                          f"pipeline_parallel_size={n}")
    if cfg.get("stage_bounds", bounds) != bounds:
        raise ConfigError(f"the SPD module in {path} reads features at stage bounds {cfg['stage_bounds']}, but "
                          f"this target's {n} stages start at layers {bounds}")


def _weight_files(model_dir: str) -> list[str]:
    from parspec.loader import safetensors_files
    return safetensors_files(model_dir)
