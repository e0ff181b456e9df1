"""Pipeline-parallel stages over torch.distributed: one process per stage.

Rank 0 is the driver (the caller's process): it owns stage 0, the sequences, sampling,
verification and the SPD module. Ranks 1..n-1 are workers that own only their layers and
their layers' slice of the paged KV cache, and do what rank 0 tells them, command by
command, over a small CPU (gloo) control group:

* ``INIT``     sizes of the cache; the worker loads its stage and reports ready.
* ``PHASE``    the block tables of the micro-batches that follow (the same tables index
               every stage's cache, so no worker runs a block allocator of its own).
* ``PREFILL``  ragged attention metadata of whole prompts; activations flow through.
* ``CYCLE``    for every stage: active or not, which micro-batch, the rows' positions.
               An active stage receives the (hidden, residual) pair from the stage before,
               runs its layers and sends the pair on (the last stage back to rank 0; with
               ``features`` set every stage also sends it to rank 0, for the SPD module).
* ``TIMES``    each worker sends rank 0 its summed compute time; ``STOP`` ends the loop.
* ``KV``       each worker sends rank 0 its KV cache (inspection and tests).
* ``AUX``      (EAGLE-3 drafting only, once after INIT) the target layers whose input residual
               stream rank 0's drafter reads: from then on the activation a stage receives and
               sends is [rows, 2 + A, H], the pair followed by the A aux features gathered so
               far (each stage fills the slots of the aux layers it owns), so the exit brings
               rank 0 all of them. Without AUX the activation stays the [rows, 2, H] pair.

Activations move with non-blocking point-to-point ops (NCCL on GPUs, gloo on CPU) in
fixed shapes. A row whose position is -1 writes no KV (padding, finished sequences).
Workers started by parspec (fresh interpreters, ``python -m parspec.spd.pipeline``, so the
user's script is never re-imported) report an exception to rank 0 through a file; rank 0
polls for that (and for dead processes) whenever it waits, so a
worker's failure surfaces in the caller as a PipelineError instead of a hang. Under
torchrun (env RANK / WORLD_SIZE) every rank runs the user's script and ranks > 0 serve
their stage when they build the LLM."""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch import nn

from parspec.attention import AttentionMetadata
from parspec.config import ModelConfig
from parspec.cuda_graphs import GraphCache, shared_pool
from parspec.kv_cache import allocate_kv_cache, bind_kv_cache
from parspec.loader import LoadError, load_weights, safetensors_files
from parspec.metadata import decode_metadata
from parspec.spd.features import _stream

# Multicast over NVLink (NVLS) is off on the lent GPU machines; every process sets these.
ENV_FLAGS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEADER = 8
INIT, PHASE, PREFILL, CYCLE, TIMES, STOP, KV, AUX = range(1, 9)
TIMEOUT = datetime.timedelta(minutes=10)


class PipelineError(RuntimeError):
    """A pipeline stage failed (in a worker process) or the pipeline is unusable after one."""


def set_env_flags() -> None:
    for key, value in ENV_FLAGS.items():
        os.environ[key] = value


# --------------------------------------------------------------------------------------
# one stage: its layers and its slice of the KV cache
# --------------------------------------------------------------------------------------

def _stage_tensor(name: str, start: int, stop: int, with_head: bool) -> bool:
    """Whether a checkpoint tensor belongs to the stage of layers [start, stop)."""
    if name.startswith("model.layers."):
        return start <= int(name.split(".")[2]) < stop
    if name.startswith(("model.embed_tokens.", "model.norm.", "lm_head.")):
        return with_head
    return True  # anything else: load_weights names it if it fits nowhere


def _stage_weights(files: list[str], start: int, stop: int, with_head: bool):
    """(name, tensor) of this stage only: other stages' tensors are never read from disk."""
    for path in files:
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if _stage_tensor(name, start, stop, with_head):
                        yield name, f.get_tensor(name)
        except (OSError, RuntimeError) as e:
            raise LoadError(f"cannot read safetensors file {path}: {e}") from e


def load_stage(model_dir: str, cfg: ModelConfig, start: int, stop: int, with_head: bool, dtype: torch.dtype,
               device: torch.device, max_positions: int) -> nn.Module:
    """The target with only layers [start, stop) materialised (and, ``with_head``, the embedding,
    final norm and lm_head); the other layers are empty placeholders that hold no weights."""
    from parspec.models import model_class

    model_cls = model_class(cfg.architecture)
    with torch.device("meta"):
        model = model_cls(cfg, max_positions=max_positions)
        for i in range(cfg.num_hidden_layers):
            if not start <= i < stop:
                model.model.layers[i] = nn.Module()
        if not with_head:
            model.model.embed_tokens, model.model.norm, model.lm_head = nn.Module(), nn.Module(), nn.Module()
    model = model.to_empty(device=device).to(dtype)
    if with_head:
        model.tie_weights()
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    load_weights(model, _stage_weights(safetensors_files(model_dir), start, stop, with_head))
    return model.eval()


class Stage:
    """One stage's layers, its KV cache (same block ids as every other stage) and the block
    tables of the current phase.

    A cycle's forward (``cycle``) reads static buffers (input pair or token ids, positions,
    the micro-batch's block tables) and is captured as a CUDA graph per row count on a GPU;
    on the CPU, or with ``use_graphs`` off, the same function runs eagerly over the same
    buffers."""

    def __init__(self, model_dir: str, cfg: ModelConfig, bounds: list[int], index: int, dtype: torch.dtype,
                 device: torch.device, num_blocks: int, block_size: int, max_positions: int,
                 max_rows: int = 1, use_graphs: bool = False):
        self.index, self.start, self.stop = index, bounds[index], bounds[index + 1]
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.block_size, self.max_positions = block_size, max_positions
        self.model = load_stage(model_dir, cfg, self.start, self.stop, index == 0, dtype, device, max_positions)
        layers = [self.model.model.layers[i].self_attn for i in range(self.start, self.stop)]
        # one spare block past the manager's (num_blocks): padding rows may point there
        self.kv_cache = allocate_kv_cache(len(layers), num_blocks + 1, block_size, cfg.num_key_value_heads,
                                          cfg.head_dim, dtype, device)
        bind_kv_cache(layers, self.kv_cache)
        self.tables: torch.Tensor | None = None  # [M, Bm, W] int32 for the current phase
        width = -(-max_positions // block_size)
        self.max_rows, self.use_graphs = max_rows, use_graphs and device.type == "cuda"
        self.in_ids = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.in_pos = torch.full((max_rows,), -1, dtype=torch.int64, device=device)
        self.in_tables = torch.zeros(max_rows, width, dtype=torch.int32, device=device)
        self.set_aux(())

    @property
    def width(self) -> int:
        """Slots of the activation between stages: the (hidden, residual) pair, then the aux features."""
        return 2 + len(self.aux_layers)

    def set_aux(self, aux_layers: tuple[int, ...]) -> None:
        """The target layers whose input residual stream travels with the activation (EAGLE-3's
        aux layers, in the head's order); before any cycle, since the graphs read ``in_pair``."""
        self.aux_layers = tuple(int(i) for i in aux_layers)
        self.in_pair = torch.zeros(self.max_rows, self.width, self.cfg.hidden_size, dtype=self.dtype,
                                   device=self.device)
        self.graphs = StageGraphs(self._cycle_forward, enabled=self.use_graphs, pool=shared_pool(self.device))

    @torch.inference_mode()
    def run(self, pair: torch.Tensor | None, input_ids: torch.Tensor | None, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """Stage 0 embeds ``input_ids``; later stages take ``pair`` [T, 2(+A), H] (hidden, residual
        and, with aux layers, the aux features so far). Returns the same after this stage's layers."""
        if self.index == 0:
            hidden, residual = self.model.embed(input_ids), None
        else:
            hidden, residual = pair[:, 0], pair[:, 1]
        if not self.aux_layers:
            hidden, residual = self.model.forward_layers(hidden, residual, positions, meta, self.start, self.stop)
            return torch.stack([hidden, residual], dim=1)
        aux = list(pair[:, 2:].unbind(1)) if self.index else [torch.zeros_like(hidden)] * len(self.aux_layers)
        for i in range(self.start, self.stop):
            for j, layer in enumerate(self.aux_layers):
                if layer == i:  # the residual stream entering layer i, as forward(aux_layers=...) captures it
                    aux[j] = _stream(hidden, residual)
            hidden, residual = self.model.forward_layers(hidden, residual, positions, meta, i, i + 1)
        return torch.stack([hidden, residual] + aux, dim=1)

    def cycle(self, micro_batch: int, positions: torch.Tensor, pair: torch.Tensor | None = None,
              input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row of ``micro_batch`` at ``positions`` [Bm] (rows at -1 write nothing):
        the inputs go into the static buffers, the (captured) forward runs, and the output pair
        comes back as a tensor of its own (the next replay overwrites the graph's)."""
        rows = positions.shape[0]
        tables = self.tables[micro_batch]
        self.in_pos[:rows].copy_(positions, non_blocking=True)
        self.in_tables[:rows, :tables.shape[1]].copy_(tables)
        if pair is not None:
            self.in_pair[:rows].copy_(pair)
        if input_ids is not None:
            self.in_ids[:rows].copy_(input_ids, non_blocking=True)
        out = self.graphs.run(rows)
        return out.clone() if self.graphs.enabled else out

    @torch.inference_mode()
    def _cycle_forward(self, rows: int) -> torch.Tensor:
        pos, meta = cycle_metadata(self.in_pos[:rows], self.in_tables[:rows], self.block_size, self.max_positions)
        return self.run(self.in_pair[:rows], self.in_ids[:rows], pos, meta)


class StageGraphs(GraphCache):
    """GraphCache whose capture tolerates the NCCL watchdog's queries from its own thread
    (thread-local capture mode), and that falls back to eager runs if a capture fails."""

    def __init__(self, fn, enabled: bool, pool=None):
        super().__init__(fn, enabled, pool, capture_error_mode="thread_local")

    def run(self, key):
        try:
            return super().run(key)
        except RuntimeError as e:
            if not self.enabled or key in self.graphs:
                raise
            import warnings
            warnings.warn(f"parspec pipeline stage: CUDA graph capture failed ({e}); running eagerly")
            self.enabled = False
            return self.fn(key)


def cycle_metadata(positions: torch.Tensor, tables: torch.Tensor, block_size: int,
                   max_positions: int) -> tuple[torch.Tensor, AttentionMetadata]:
    """Decode metadata for one query per row, built on the device; a row at position -1 reads
    slot 0 of its table and writes nothing (slot -1), so idle rows cost no cache corruption."""
    positions_in = positions.clamp(min=0)
    pos, meta = decode_metadata(positions_in.contiguous(), tables, 1, block_size, max_positions)
    meta.slot_mapping = torch.where(positions < 0, -1, meta.slot_mapping)
    return pos, meta


def cycle_command_size(world: int, rows_per_mb: int) -> int:
    """Int64s of a CYCLE command: the header, then per stage [active, micro-batch, positions]."""
    return HEADER + world * (2 + rows_per_mb)


def prefill_payload(positions: list[int], slots: list[int], cu: list[int], seq_lens: list[int],
                    tables: list[list[int]]) -> tuple[list[int], torch.Tensor]:
    """Header and int64 payload of a PREFILL command (ragged metadata, built on the host)."""
    width = max(len(t) for t in tables)
    flat = [b for t in tables for b in t + [0] * (width - len(t))]
    header = [PREFILL, len(positions), len(seq_lens), width, max(b - a for a, b in zip(cu, cu[1:])), max(seq_lens)]
    return header, torch.tensor(positions + slots + cu + seq_lens + flat, dtype=torch.int64)


def unpack_prefill(header: list[int], payload: torch.Tensor, device) -> tuple[torch.Tensor, AttentionMetadata]:
    _, t, b, width, max_q, max_seq = header[:6]
    parts = payload.split([t, t, b + 1, b, b * width])
    to = lambda x, dt: x.to(dt).to(device, non_blocking=True)  # noqa: E731
    meta = AttentionMetadata(slot_mapping=to(parts[1], torch.int64), query_start_loc=to(parts[2], torch.int32),
                             seq_lens=to(parts[3], torch.int32), block_tables=to(parts[4].view(b, width), torch.int32),
                             max_query_len=max_q, max_seq_len=max_seq)
    return to(parts[0], torch.int64), meta


# --------------------------------------------------------------------------------------
# the process group
# --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


class Channel:
    """Rank-to-rank traffic of one pipeline: commands over the gloo control group, activations
    point to point over the default group (NCCL on GPUs, gloo on CPU)."""

    def __init__(self, rank: int, world: int, device: torch.device, watch=None):
        self.rank, self.world, self.device = rank, world, device
        # A group of its own even on the CPU: with 4+ ranks gloo relays a broadcast through
        # other ranks, and on the activations' group a relay could wait behind a stage's recv.
        self.ctrl = dist.new_group(backend="gloo")
        self.watch = watch or (lambda after_failure=False: None)  # rank 0: raises if a worker failed

    def wait(self, work, host: bool = True) -> None:
        """Wait for a Work. A gloo op fails when its peer's process dies (the socket closes);
        rank 0 then names the worker's own error (``watch``) instead of gloo's."""
        try:
            work.wait()
        except RuntimeError as e:
            if self.rank != 0:
                raise
            self.watch(after_failure=True)
            raise PipelineError(f"pipeline communication failed: {e}") from e

    # --- commands (rank 0 -> all) ------------------------------------------------------
    # A command is one broadcast of ``size`` int64s: the header, and within a phase of cycles
    # the cycle's plan behind it (``set_command_size`` at PHASE, on every rank alike), so a
    # cycle costs one control message. Rank 0 does not wait for it on the host: its Work is
    # returned and completes with the cycle's sends (``wait`` at the next flush).
    size: int = HEADER

    def set_command_size(self, size: int) -> None:
        self.size = max(HEADER, size)

    def command(self, header: list[int], payload: torch.Tensor | None = None, wait: bool = True):
        head = torch.zeros(self.size, dtype=torch.int64)
        head[:len(header)] = torch.tensor(header, dtype=torch.int64)
        work = dist.broadcast(head, src=0, group=self.ctrl, async_op=True)
        if payload is not None:
            self.wait(work)
            work = dist.broadcast(payload.contiguous(), src=0, group=self.ctrl, async_op=True)
        if wait:
            self.wait(work)
            return None
        return work

    def receive_command(self) -> list[int]:
        head = torch.zeros(self.size, dtype=torch.int64)
        dist.broadcast(head, src=0, group=self.ctrl)
        return head.tolist()

    def receive_payload(self, size: int) -> torch.Tensor:
        payload = torch.empty(size, dtype=torch.int64)
        dist.broadcast(payload, src=0, group=self.ctrl)
        return payload

    # --- activations ----------------------------------------------------------------------
    def send(self, tensor: torch.Tensor, dst: int):
        return dist.isend(tensor.contiguous(), dst)

    def recv(self, shape, dtype: torch.dtype, src: int) -> tuple[torch.Tensor, object]:
        buf = torch.empty(shape, dtype=dtype, device=self.device)
        return buf, dist.irecv(buf, src)

    def small_to_zero(self, values: torch.Tensor):
        """A worker's small float64 host tensor to rank 0, over the gloo control group: rank 0
        waits for it on the host, where a dead worker shows as an error, not a hang."""
        return dist.isend(values.to(torch.float64), 0, group=self.ctrl)

    def small_from(self, size: int, src: int) -> torch.Tensor:
        """Rank 0's side of small_to_zero."""
        buf = torch.zeros(size, dtype=torch.float64)
        self.wait(dist.irecv(buf, src, group=self.ctrl))
        return buf


def init_group(rank: int, world: int, device: torch.device, port: int | None) -> None:
    """Join the default process group: spawned ranks at a TCP address, torchrun ranks by env."""
    set_env_flags()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = dict(backend=backend, timeout=TIMEOUT)
    if device.type == "cuda":
        kwargs["device_id"] = device
    if port is None:
        dist.init_process_group(init_method="env://", **kwargs)
    else:
        dist.init_process_group(init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, **kwargs)


def stage_device(device_type: str, rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")


# --------------------------------------------------------------------------------------
# the worker loop (ranks 1..n-1)
# --------------------------------------------------------------------------------------

class Worker:
    """Serves one stage until STOP: every command's work is queued without host syncs on a GPU
    (the positions arrive on the host with the command and go down in one small copy)."""

    def __init__(self, channel: Channel, model_dir: str):
        self.ch, self.model_dir = channel, model_dir
        self.stage: Stage | None = None
        self.hidden = 0
        self.pending: list = []  # sends in flight (their tensors stay alive until done)
        self.compute_s = 0.0
        self.cycles = 0
        self.events: list = []  # (start, end) CUDA events, read at TIMES

    def serve(self) -> None:
        while True:
            header = self.ch.receive_command()
            cmd = header[0]
            if cmd == STOP:
                break
            if cmd == INIT:
                self._init(header)
            elif cmd == PHASE:
                _, m, bm, width = header[:4]
                tables = self.ch.receive_payload(m * bm * width).view(m, bm, width)
                self.stage.tables = tables.to(torch.int32).to(self.stage.device)
                self.ch.set_command_size(cycle_command_size(self.ch.world, bm))
            elif cmd == PREFILL:
                _, t, b, width = header[:4]
                payload = self.ch.receive_payload(2 * t + (b + 1) + b + b * width)
                positions, meta = unpack_prefill(header, payload, self.stage.device)
                self._step(t, positions, meta, features=False)
            elif cmd == CYCLE:
                self._cycle(header)
            elif cmd == TIMES:
                self._send_times()
            elif cmd == KV:
                self.pending.append(self.ch.send(self.stage.kv_cache, 0))
            elif cmd == AUX:
                self.stage.set_aux(tuple(self.ch.receive_payload(header[1]).tolist()))
            else:
                raise PipelineError(f"stage {self.ch.rank}: unknown command {cmd}")
        self._flush()

    def _init(self, header: list[int]) -> None:
        _, num_blocks, block_size, max_positions, dtype_idx, world, max_rows, graphs = header[:8]
        if world != self.ch.world:
            raise PipelineError(f"rank {self.ch.rank}: pipeline of {world} stages but {self.ch.world} processes")
        cfg = ModelConfig.from_pretrained(self.model_dir)
        from parspec.spd.partition import stage_bounds
        bounds = stage_bounds(cfg.num_hidden_layers, world)
        self.stage = Stage(self.model_dir, cfg, bounds, self.ch.rank, DTYPES[dtype_idx], self.ch.device,
                           num_blocks, block_size, max_positions, max_rows, bool(graphs))
        self.hidden = cfg.hidden_size
        self.pending.append(self.ch.small_to_zero(torch.ones(1)))  # ready

    def _cycle(self, header: list[int]) -> None:
        _, bm, features = header[:3]
        row = HEADER + self.ch.rank * (2 + bm)
        active, micro_batch = header[row], header[row + 1]
        if not active:
            return
        positions = torch.tensor(header[row + 2:row + 2 + bm], dtype=torch.int64)
        self._step(bm, None, None, features=bool(features), cycle=(micro_batch, positions))
        self.cycles += 1

    def _step(self, rows: int, positions: torch.Tensor | None, meta: AttentionMetadata | None, features: bool,
              cycle: tuple[int, torch.Tensor] | None = None) -> None:
        """Receive the pair from the stage before, run this stage (a prefill's ragged metadata,
        or ``cycle``: a micro-batch and its rows' positions), send the pair on."""
        rank, world = self.ch.rank, self.ch.world
        # The last step's sends complete here, after this command's payload arrived: a rank
        # that waited on them before reading the payload could hold up the payload's broadcast
        # (gloo relays it through other ranks when there are 4 or more), whose receivers are
        # the ranks those sends wait for.
        self._flush()
        buf, work = self.ch.recv((rows, self.stage.width, self.hidden), self.stage.dtype, rank - 1)
        work.wait()
        if cycle is None:  # a prefill: not a cycle, so not in the per-cycle times
            out = self.stage.run(buf, None, positions, meta)
        else:
            timer = self._start_timer()
            out = self.stage.cycle(cycle[0], cycle[1], pair=buf)
            self._stop_timer(timer)
        last = rank == world - 1
        self.pending.append(self.ch.send(out, 0 if last else rank + 1))
        if features and not last:
            self.pending.append(self.ch.send(out, 0))

    def _start_timer(self):
        if self.stage.device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return start
        return time.perf_counter()

    def _stop_timer(self, start) -> None:
        if self.stage.device.type == "cuda":
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.events.append((start, end))
        else:
            self.compute_s += time.perf_counter() - start

    def _send_times(self) -> None:
        if self.events:
            self.events[-1][1].synchronize()
            self.compute_s += sum(s.elapsed_time(e) for s, e in self.events) / 1e3
            self.events = []
        self.pending.append(self.ch.small_to_zero(torch.tensor([self.compute_s, float(self.cycles)],
                                                               dtype=torch.float64)))
        self.compute_s, self.cycles = 0.0, 0

    def _flush(self) -> None:
        for work in self.pending:
            work.wait()
        self.pending = []


def serve_stage(rank: int, world: int, model_dir: str, device_type: str, port: int | None, errors=None) -> None:
    """Entry point of a worker process (spawned by parspec, or a torchrun rank > 0)."""
    if device_type == "cpu":  # stages share the host's cores with rank 0 and each other
        torch.set_num_threads(int(os.environ.get("PARSPEC_STAGE_THREADS", "1")))
    try:
        device = stage_device(device_type, rank) if port is not None else _torchrun_device(device_type)
        init_group(rank, world, device, port)
        Worker(Channel(rank, world, device), model_dir).serve()
        dist.destroy_process_group()
    except BaseException as e:
        if errors is None:
            raise
        errors.put(f"stage {rank} (pid {os.getpid()}): {type(e).__name__}: {e}\n{traceback.format_exc()}")
        os._exit(1)  # the process group may be half-open: do not run its destructors


class ErrorFile:
    """Where a worker started by parspec reports why it failed (rank 0 reads it)."""

    def __init__(self, path: str):
        self.path = path

    def put(self, message: str) -> None:
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(message)

    def get(self) -> str | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                return f.read() or None
        except FileNotFoundError:
            return None


def main(argv: list[str] | None = None) -> None:
    """``python -m parspec.spd.pipeline RANK WORLD MODEL_DIR DEVICE_TYPE PORT ERROR_FILE``: a
    stage worker started by parspec. A fresh interpreter rather than a multiprocessing child,
    so the user's script is never re-imported (it needs no ``if __name__ == "__main__"``)."""
    rank, world, model_dir, device_type, port, error_file = argv if argv is not None else sys.argv[1:]
    if os.environ.get("PARSPEC_DEBUG_HANG"):
        import faulthandler
        faulthandler.dump_traceback_later(float(os.environ["PARSPEC_DEBUG_HANG"]), exit=True)
    serve_stage(int(rank), int(world), model_dir, device_type, int(port), ErrorFile(error_file))


def _torchrun_device(device_type: str) -> torch.device:
    if device_type == "cuda":
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', os.environ['RANK']))}")
    return torch.device("cpu")


# --------------------------------------------------------------------------------------
# rank 0's handle on the pipeline's processes
# --------------------------------------------------------------------------------------

class StageProcesses:
    """Starts ranks 1..n-1 (spawned here, or already running under torchrun), joins the group
    as rank 0, and ends everything cleanly on shutdown() or after a failure."""

    def __init__(self, world: int, model_dir: str, device: torch.device):
        self.world, self.device = world, device
        self.procs: list = []
        self.errors = None
        self.failure: str | None = None
        self.closed = False
        set_env_flags()
        if launched_by_torchrun():
            if int(os.environ["WORLD_SIZE"]) != world:
                raise PipelineError(f"torchrun started {os.environ['WORLD_SIZE']} processes but "
                                    f"pipeline_parallel_size={world}")
            init_group(0, world, device, None)
        else:
            if dist.is_initialized():
                raise PipelineError("torch.distributed is already initialised in this process (another pipelined "
                                    "LLM still running?): shut it down first (llm.engine.shutdown())")
            port = free_port()
            self.error_dir = tempfile.mkdtemp(prefix="parspec-stages-")
            self.errors = [ErrorFile(os.path.join(self.error_dir, f"stage-{rank}.err")) for rank in range(1, world)]
            for rank in range(1, world):
                cmd = [sys.executable, "-m", "parspec.spd.pipeline", str(rank), str(world), model_dir, device.type,
                       str(port), self.errors[rank - 1].path]
                self.procs.append(subprocess.Popen(cmd, env=dict(os.environ)))
            atexit.register(self.kill_quietly)  # never leave workers behind the caller
            self._init_watched(port)
        self.channel = Channel(0, world, device, watch=self.check)

    def _init_watched(self, port: int) -> None:
        """init_process_group blocks until every rank joins: run it while watching the workers."""
        import threading
        result: list = []

        def join():
            try:
                init_group(0, self.world, self.device, port)
                result.append(None)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                result.append(e)

        t = threading.Thread(target=join, daemon=True)
        t.start()
        while t.is_alive():
            self.check()
            t.join(0.05)
        if result and result[0] is not None:
            raise PipelineError(f"could not start the pipeline's process group: {result[0]}") from result[0]

    def check(self, after_failure: bool = False) -> None:
        """Raise PipelineError if a worker reported an error or died. ``after_failure``: a
        communication op just failed, so give a dying worker a moment to be seen."""
        if self.failure is not None:
            raise PipelineError(self.failure)
        deadline = time.monotonic() + (2.0 if after_failure else 0.0)
        while True:
            message = self._worker_failure()
            if message is not None or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if message is not None:
            self.failure = message
            self.kill()
            raise PipelineError(message)

    def _reported(self) -> str | None:
        for errors in self.errors or ():
            message = errors.get()
            if message is not None:
                return f"a pipeline stage failed in its worker process: {message}"
        return None

    def _worker_failure(self) -> str | None:
        message = self._reported()
        if message is not None:
            return message
        dead = [(i + 1, p.poll()) for i, p in enumerate(self.procs) if p.poll() is not None]
        if dead and not self.closed:
            time.sleep(0.2)  # let its report reach the file
            return self._reported() or f"pipeline stage {dead[0][0]} exited with code {dead[0][1]}"
        return None

    def kill(self) -> None:
        """After a failure: end our own worker processes (by their handles) and leave the group."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            _wait(p, 5)
        self.closed = True
        _leave_group()

    def kill_quietly(self) -> None:
        """At interpreter exit: workers still running are ended (a clean shutdown() already joined them)."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.channel.command([STOP])
        except Exception:  # noqa: BLE001 - the workers are ended below either way
            pass
        for p in self.procs:
            if not _wait(p, 30):
                p.terminate()
                _wait(p, 5)
        _leave_group()


def _wait(proc: subprocess.Popen, seconds: float) -> bool:
    """Whether ``proc`` ended within ``seconds``."""
    try:
        proc.wait(seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def _leave_group() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a half-open group after a failure
            pass


if __name__ == "__main__":
    main()
