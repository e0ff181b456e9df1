"""`parspec bench`: the benchmark matrix (method x K x concurrency) in one process.

Every cell builds one engine, runs the whole workload once as a warm-up (Triton compiles
and CUDA-graph captures stay out of the timing), then times ``repeats`` identical runs and
reports the median and the spread. The workload of a cell at concurrency c is the first
max(num_prompts, c) prompts, greedy, ``max_tokens`` new tokens each with eos ignored, with
max_num_seqs = c. Every method at one concurrency sees the same token ids, and the
no-speculation cell runs first: it is the baseline of speed-ups and of the greedy mismatch
rate. Draft and verify time come from CUDA events marked by the engine (StepEvents), the
roofline from a copy bandwidth measured in the same run (report.py has the maths).

A failing cell or peer is recorded with its error and the run goes on; the JSON is
rewritten after every cell, so a run cut short keeps what it measured."""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from parspec.bench import report
from parspec.config import ConfigError

REPO = report.REPO
REFERENCE_PAIR = os.path.join(REPO, "fixtures", "reference")
DEFAULT_PROMPTS = os.path.normpath(os.path.join(REPO, "..", "shared", "data", "humaneval.jsonl"))
METHODS = ("no-spec", "ngram", "draft_model", "eagle3", "p-eagle", "p-eagle-r1", "p-eagle-r2")
DEFAULT_METHODS = METHODS[:5]  # P-EAGLE's refinement variants only when asked for
PEERS = ("hf", "gpt-fast")
BANDWIDTH_BYTES = 1 << 30  # far above any L2, so the copy runs at HBM speed


@dataclass(frozen=True)
class ModelPair:
    """The target and its drafters: a directory holding target/, draft/, eagle3/, p-eagle/."""

    target: str
    draft: str
    eagle3: str
    p_eagle: str

    @classmethod
    def under(cls, root: str) -> ModelPair:
        return cls(*(os.path.join(root, name) for name in ("target", "draft", "eagle3", "p-eagle")))

    def as_dict(self) -> dict:
        return {"target": self.target, "draft": self.draft, "eagle3": self.eagle3, "p-eagle": self.p_eagle}


def _per_position(stats, k: int) -> list[float]:
    """vLLM's per-position acceptance (accepted at i / drafts), one entry per draft slot."""
    rates = list(stats.acceptance_rate_per_position)
    return rates + [0.0] * (k - len(rates))


def spec_config(method: str, k: int, pair: ModelPair) -> dict | None:
    """vLLM-style speculative config of one method at K drafts (None for no-spec)."""
    if method == "no-spec":
        return None
    if method == "ngram":  # the 1..4-token window the committed results used (vLLM's default is 5..5)
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1, "prompt_lookup_max": 4}
    if method == "draft_model":
        return {"method": "draft_model", "model": pair.draft, "num_speculative_tokens": k}
    if method == "eagle3":
        return {"method": "eagle3", "model": pair.eagle3, "num_speculative_tokens": k}
    if method == "p-eagle":
        return {"method": "eagle3", "model": pair.p_eagle, "num_speculative_tokens": k, "parallel_drafting": True}
    if method in ("p-eagle-r1", "p-eagle-r2"):  # with 1 or 2 refinement passes
        return {"method": "eagle3", "model": pair.p_eagle, "num_speculative_tokens": k, "parallel_drafting": True,
                "draft_refine_passes": int(method[-1])}
    raise ConfigError(f"unknown benchmark method {method!r}; choose from {', '.join(METHODS)}")


def read_prompts(path: str, num: int | None = None) -> list[str]:
    """The first ``num`` prompts (all when None) of a JSONL file of {"prompt": ...} objects."""
    if not os.path.isfile(path):
        raise ConfigError(f"prompts file not found: {path}")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                prompts.append(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConfigError(f"{path}:{i}: expected a JSON object with \"prompt\": {e}") from e
            if num is not None and len(prompts) == num:
                break
    if not prompts:
        raise ConfigError(f"no prompts in {path}")
    return prompts


@dataclass
class BenchConfig:
    pair: ModelPair = field(default_factory=lambda: ModelPair.under(REFERENCE_PAIR))
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    ks: list[int] = field(default_factory=lambda: list(range(1, 9)))
    concurrency: list[int] = field(default_factory=lambda: [1, 8, 64])
    prompts: str = DEFAULT_PROMPTS
    num_prompts: int = 16
    max_tokens: int = 256
    repeats: int = 3
    dtype: str = "auto"
    device: str = "auto"
    enforce_eager: bool = False
    max_model_len: int | None = None  # None: the longest prompt + max_tokens
    peers: list[str] = field(default_factory=list)
    peer_prompts: int = 4  # peers decode at batch 1, one prompt after another: the first few only
    peer_k: int = 5  # drafts per step for HF assisted / prompt lookup and gpt-fast speculative
    gpt_fast_dir: str | None = None
    gpt_fast_compile: bool = True
    model_label: str = "reference pair (fixtures/reference)"
    expansion: dict | None = None  # expansion.json of an expanded pair, recorded as given

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown benchmark method(s) {unknown}; choose from {', '.join(METHODS)}")
        if "no-spec" not in self.methods:
            self.methods = ["no-spec", *self.methods]  # the baseline of every ratio
        self.methods = sorted(dict.fromkeys(self.methods), key=METHODS.index)
        for name, values in (("ks", self.ks), ("concurrency", self.concurrency)):
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise ConfigError(f"{name} must be a non-empty list of integers >= 1, got {values!r}")
        self.ks = sorted(set(self.ks))
        self.concurrency = sorted(set(self.concurrency))
        for name in ("num_prompts", "max_tokens", "repeats", "peer_prompts", "peer_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        bad = [p for p in self.peers if p not in PEERS]
        if bad:
            raise ConfigError(f"unknown peer(s) {bad}; choose from {', '.join(PEERS)}")
        for method in self.methods:
            if method != "no-spec":
                spec = spec_config(method, 1, self.pair)
                if "model" in spec and not os.path.isdir(spec["model"]):
                    raise ConfigError(f"{method}: drafter directory not found: {spec['model']}")
        if not os.path.isdir(self.pair.target):
            raise ConfigError(f"target directory not found: {self.pair.target}")

    def prompts_at(self, concurrency: int) -> int:
        """Prompts fed at one concurrency: at least as many as are in flight."""
        return max(self.num_prompts, concurrency)

    def parameters(self) -> dict:
        d = asdict(self)
        d["models"] = self.pair.as_dict()
        del d["pair"]
        d["prompts_per_concurrency"] = {str(c): self.prompts_at(c) for c in self.concurrency}
        return d


# --- measurement -------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, nbytes: int = BANDWIDTH_BYTES, iters: int = 10) -> dict:
    """HBM bandwidth as a device-to-device copy sees it: (bytes read + written) / time,
    timed with CUDA events, median of ``iters`` copies after two warm-ups. On a CPU there is
    no HBM to speak of and host memcpy speed says nothing about a decode step: null."""
    if device.type != "cuda":
        return {"bytes_per_s": None, "note": "not measured on CPU; roofline fields are null"}
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(iters + 2):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    rates = [2 * nbytes / t for t in times]
    return {"bytes_per_s": statistics.median(rates), "runs_bytes_per_s": rates,
            "method": f"device-to-device copy of {nbytes} bytes, (read + written bytes) / time, CUDA events, "
                      f"median of {iters}"}


def _attach_step_events(engine):
    """Attach a StepEvents to the engine; None when this engine has no such hook."""
    try:
        from parspec.engine.timing import StepEvents
    except ImportError:
        return None
    events = StepEvents(engine.device)
    engine.step_events = events
    return events


def _phase_totals(events) -> dict | None:
    if events is None:
        return None
    totals = events.totals()
    return totals if totals.get("steps") else None  # an engine that never marks: no figures


def _ms_per_output_token(outs) -> float | None:
    """Per sequence, the time between its tokens after the first (the latency a user sees),
    averaged over sequences; host timestamps the engine takes after each step's sync."""
    per_seq = []
    for o in outs:
        m = getattr(o, "metrics", None)
        n = len(o.outputs[0].token_ids)
        if m is None or m.first_token_time is None or m.finish_time is None or n < 2:
            continue
        per_seq.append(1e3 * (m.finish_time - m.first_token_time) / (n - 1))
    return statistics.mean(per_seq) if per_seq else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Bench:
    """One benchmark run: its config, its inputs, and the record it fills in."""

    def __init__(self, cfg: BenchConfig, out: str | None = None, progress: bool = True, log=print):
        self.cfg, self.out, self.progress, self.log = cfg, out, progress, log
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                                   else "cpu" if cfg.device == "auto" else cfg.device)
        self.reference: dict[int, list[list[int]]] = {}  # concurrency -> no-spec token ids per prompt
        self.baseline_tps: dict[int, float] = {}
        self.record: dict = {}

    # --- inputs ---------------------------------------------------------------------------
    def _prompt_ids(self) -> list[list[int]]:
        """Token ids of every prompt any cell uses, tokenized once by the target's tokenizer,
        so the engine, HF and gpt-fast all read the same ids. A short file is cycled."""
        from parspec.tokenizer import Tokenizer

        needed = max(self.cfg.prompts_at(c) for c in self.cfg.concurrency)
        texts = read_prompts(self.cfg.prompts, needed)
        self.distinct_prompts = len(texts)
        tok = Tokenizer(self.cfg.pair.target)
        ids = [tok.encode(t) for t in texts]
        return [ids[i % len(ids)] for i in range(needed)]

    def _max_model_len(self, ids: list[list[int]]) -> int:
        if self.cfg.max_model_len is not None:
            return self.cfg.max_model_len
        return max(len(x) for x in ids) + self.cfg.max_tokens + 1

    def _cells(self) -> list[tuple[str, int | None, int]]:
        cells = [("no-spec", None, c) for c in self.cfg.concurrency]
        for method in self.cfg.methods:
            if method != "no-spec":
                cells += [(method, k, c) for k in self.cfg.ks for c in self.cfg.concurrency]
        return cells

    # --- one cell -------------------------------------------------------------------------
    def _run_cell(self, method: str, k: int | None, concurrency: int, prompt_ids: list[list[int]]) -> dict:
        from parspec import LLM, SamplingParams

        cfg, device = self.cfg, self.device
        spec = spec_config(method, k, cfg.pair)
        inputs = [{"prompt_token_ids": ids} for ids in prompt_ids[:cfg.prompts_at(concurrency)]]
        cell = {"method": method, "k": k, "concurrency": concurrency, "num_prompts": len(inputs),
                "speculative_config": spec}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        llm = LLM(cfg.pair.target, speculative_config=spec, dtype=cfg.dtype, device=str(device),
                  max_num_seqs=concurrency, max_model_len=self.max_model_len, enforce_eager=cfg.enforce_eager)
        engine = llm.engine
        cell["setup_s"] = time.perf_counter() - t0
        self._note_target(engine)
        params = SamplingParams(temperature=0.0, max_tokens=cfg.max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate(inputs, params, use_tqdm=False)
        sync(device)
        cell["warmup_s"] = time.perf_counter() - t0

        seconds, phases = [], []
        previous_events = getattr(engine, "step_events", None)
        for _ in range(cfg.repeats):
            engine.reset_stats()
            events = _attach_step_events(engine)
            sync(device)
            start = time.perf_counter()
            outs = llm.generate(inputs, params, use_tqdm=False)
            sync(device)
            seconds.append(time.perf_counter() - start)
            phases.append(_phase_totals(events))
        engine.step_events = previous_events

        outputs = [o.outputs[0].token_ids for o in outs]
        tokens = sum(len(x) for x in outputs)
        tps_runs = [tokens / s for s in seconds]
        elapsed = statistics.median(seconds)
        stats = engine.stats
        cell.update({
            "tokens": tokens, "seconds": elapsed, "seconds_runs": seconds,
            "tokens_per_s": tokens / elapsed, "tokens_per_s_runs": tps_runs,
            "tokens_per_s_min": min(tps_runs), "tokens_per_s_max": max(tps_runs),
            "ms_per_output_token": _ms_per_output_token(outs),
            "acceptance_length": stats.acceptance_length if spec else None,
            "acceptance_rate_per_position": _per_position(stats, engine.k) if spec else None,
            "sequence_steps": stats.num_steps,
            "engine_steps": getattr(engine, "draft_steps", None) if spec else None,
            "drafter_passes_per_step": getattr(engine, "drafter_passes_per_step", None) if spec else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        })
        cell.update(self._phase_fields(phases))
        cell.update(self._compare(method, concurrency, outputs, cell))
        del llm, engine, outs
        return cell

    @staticmethod
    def _phase_fields(phases: list[dict | None]) -> dict:
        if any(p is None for p in phases):
            return {"draft_ms": None, "verify_ms": None, "timed_steps": None,
                    "draft_ms_per_step": None, "verify_ms_per_step": None}
        draft = statistics.median(p["draft_ms"] for p in phases)
        verify = statistics.median(p["verify_ms"] for p in phases)
        steps = statistics.median(p["steps"] for p in phases)
        return {"draft_ms": draft, "verify_ms": verify, "timed_steps": steps,
                "draft_ms_runs": [p["draft_ms"] for p in phases], "verify_ms_runs": [p["verify_ms"] for p in phases],
                "draft_ms_per_step": draft / steps, "verify_ms_per_step": verify / steps}

    def _compare(self, method: str, concurrency: int, outputs: list[list[int]], cell: dict) -> dict:
        if method == "no-spec":
            self.reference[concurrency] = outputs
            self.baseline_tps[concurrency] = cell["tokens_per_s"]
        ref = self.reference.get(concurrency)
        base = self.baseline_tps.get(concurrency)
        out = {"speedup_vs_no_spec": cell["tokens_per_s"] / base if base else None,
               "mismatch_rate_vs_no_spec": None, "mismatched_prompts": None}
        if ref is not None:
            differ = [i for i, (a, b) in enumerate(zip(outputs, ref)) if a != b]
            out["mismatch_rate_vs_no_spec"] = len(differ) / len(outputs)
            out["mismatched_prompts"] = differ
        bw = self.record["bandwidth"]["bytes_per_s"]
        target = self.record.get("target")
        roof = None
        if bw and target and cell["acceptance_length"]:
            roof = report.roofline_tokens_per_s(target["weight_bytes_per_step"], target["kv_bytes_per_token"],
                                                target["mean_context_tokens"][str(concurrency)], concurrency, bw,
                                                max(1.0, cell["acceptance_length"]))
        out["roofline_tokens_per_s"] = roof
        out["percent_of_roofline"] = report.percent_of(cell["tokens_per_s"], roof)
        return out

    def _note_target(self, engine) -> None:
        """The target's bytes per step, from the first engine built (every cell loads the same)."""
        if "target" in self.record:
            return
        mc = engine.model_config
        mean_prompt = {str(c): statistics.mean(len(x) for x in self.prompt_ids[:self.cfg.prompts_at(c)])
                       for c in self.cfg.concurrency}
        self.record["parameters"]["resolved_dtype"] = str(engine.dtype).removeprefix("torch.")
        self.record["target"] = {
            "num_parameters": sum(p.numel() for p in engine.model.parameters()),
            "weight_bytes_per_step": report.streamed_weight_bytes(engine.model),
            "weight_bytes_note": "every parameter once at the run's dtype; an untied embedding table is "
                                 "gathered, not streamed, so left out; a tied one is the lm_head, counted once",
            "kv_bytes_per_token": report.kv_bytes_per_token(mc.num_hidden_layers, mc.num_key_value_heads,
                                                            mc.head_dim, engine.dtype),
            "mean_prompt_tokens": mean_prompt,
            # a sequence's decode steps read prompt + 1 .. prompt + max_tokens tokens of context
            "mean_context_tokens": {c: p + self.cfg.max_tokens / 2 for c, p in mean_prompt.items()},
            "config": {k: getattr(mc, k) for k in ("architecture", "hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "num_attention_heads",
                                                   "num_key_value_heads", "head_dim", "vocab_size",
                                                   "tie_word_embeddings")},
        }

    # --- the run --------------------------------------------------------------------------
    def run(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        started = time.time()
        self.prompt_ids = self._prompt_ids()
        self.max_model_len = self._max_model_len(self.prompt_ids)
        params = cfg.parameters()
        params.update(distinct_prompts=self.distinct_prompts, max_model_len=self.max_model_len,
                      resolved_device=str(self.device))
        self.record = {
            "benchmark": "parspec bench: decode throughput matrix (method x K x concurrency), greedy, eos ignored",
            "commit": report.git_commit(), "device": report.device_name(self.device),
            "versions": report.library_versions(), "model_label": cfg.model_label,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "parameters": params,
            "statistic": "median of the timed runs; *_runs hold each run, *_min/*_max the spread",
            "bandwidth": measure_copy_bandwidth(self.device),
            "cells": [], "peers": {},
        }
        cells = self._cells()
        with tqdm(cells, desc="bench", unit="cell", disable=not self.progress) as bar:
            for method, k, c in bar:
                bar.set_postfix_str(f"{method} K={k} c={c}")
                try:
                    cell = self._run_cell(method, k, c, self.prompt_ids)
                except Exception as e:  # a cell that fails (OOM, an engine bug) is recorded, not fatal
                    cell = {"method": method, "k": k, "concurrency": c, "error": report.error_text(e)}
                    tqdm.write(f"bench: {method} K={k} concurrency {c} failed: {cell['error']}")
                _free(self.device)
                self.record["cells"].append(cell)
                self._save()
        if cfg.peers:
            from parspec.bench.peers import run_peers

            n = min(cfg.peer_prompts, len(self.prompt_ids))
            reference = self.reference.get(1)
            self.record["peers"] = run_peers(
                cfg.peers, cfg.pair, self.prompt_ids[:n], cfg.max_tokens, cfg.peer_k,
                self.record["parameters"].get("resolved_dtype", "float32"), self.device,
                gpt_fast_dir=cfg.gpt_fast_dir, gpt_fast_compile=cfg.gpt_fast_compile,
                reference=reference[:n] if reference else None, baseline_tps=self.baseline_tps.get(1),
                log=self.log, on_result=self._save_peers)
            _free(self.device)
        self.record["wall_s"] = time.time() - started
        self._save(plots=True)
        return self.record

    def _save_peers(self, peers: dict) -> None:
        self.record["peers"] = peers
        self._save()

    def _save(self, plots: bool = False) -> None:
        if not self.out:
            return
        if plots:
            try:  # the measurements matter more than their pictures: a plotting failure is recorded
                self.record["plots"] = [os.path.basename(p) for p in report.plot_all(self.record, self.out)]
            except Exception as e:
                self.record["plots"], self.record["plots_error"] = [], report.error_text(e)
                self.log(f"bench: plots failed: {self.record['plots_error']}")
        report.save_record(self.record, self.out)


def run_bench(cfg: BenchConfig, out: str | None = None, progress: bool = True, log=print) -> dict:
    """Runs the matrix and the peers; writes ``out`` (JSON) and PNGs beside it when given."""
    return Bench(cfg, out, progress, log).run()


def expanded_pair(src_root: str, dst_root: str, scale: str, dtype: str, log=print) -> tuple[ModelPair, dict]:
    """The reference pair expanded to ``scale`` (parspec.bench.expand) in dst_root, and the
    expansion's own record. An earlier expansion there of the same scale and dtype is reused
    (writing 8B of weights takes minutes); expansion.json is written last, so it marks a
    complete one."""
    marker = os.path.join(dst_root, "expansion.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("scale") == scale and done.get("dtype") == dtype:
            log(f"bench: reusing the {scale} expansion in {dst_root}")
            return ModelPair.under(dst_root), {**done, "reused": True}
    from parspec.bench.expand import expand_reference_pair

    log(f"bench: expanding {src_root} to the {scale} shape in {dst_root} ({dtype})")
    expand_reference_pair(src_root, dst_root, scale=scale, dtype=dtype)
    with open(marker) as f:
        return ModelPair.under(dst_root), {**json.load(f), "reused": False}
