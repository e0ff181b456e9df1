"""Where one engine decode step's time goes, at steady state.

    python3 benchmarks/profile_step.py --target DIR [--spec JSON] --batch 1 --context 128 \
        --out benchmarks/results/profile_<name>.json [--enforce-eager]

Fills ``batch`` sequences with ``context`` random prompt tokens, runs the prefill and a few
decode steps (Triton compiles, CUDA graphs are captured), then measures over ``--steps``
steps: the step time with CUDA events (what a user waits for), the host time of one step,
the kernels launched and GPU time per step (torch.profiler), host synchronisations per
step (torch.cuda.set_sync_debug_mode), and the memory roofline of the step (bytes of the
target's weights / device-to-device copy bandwidth measured in the same run). The host time of a
step is split into launching work (drafting, the target forward and verification queued on the
device), waiting for a step's result (``StepOutput.fetch``'s synchronisation) and the rest
(scheduling, bookkeeping): a wait near zero means the host, not the GPU, sets the pace."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from contextlib import contextmanager

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from parspec import LLM, SamplingParams
    from parspec.bench.harness import measure_copy_bandwidth
    from parspec.bench.report import streamed_weight_bytes

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--spec", default=None, help="speculative config JSON")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--no-async", action="store_true", help="read each step before launching the next")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    spec = json.loads(args.spec) if args.spec else None
    llm = LLM(args.target, dtype="bfloat16", device="cuda", max_num_seqs=args.batch, max_model_len=2048,
              speculative_config=spec, enforce_eager=args.enforce_eager, skip_tokenizer_init=True,
              async_scheduling=False if args.no_async else None)
    engine = llm.engine
    vocab = engine.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
    for _ in range(args.batch):
        ids = torch.randint(1, vocab, (args.context,), generator=gen).tolist()
        engine.add_request({"prompt_token_ids": ids}, params)
    for _ in range(6):  # prefill, graph capture, warm-up
        engine.step()
    torch.cuda.synchronize()

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(args.steps + 1)]
    host = []
    with host_parts_timed(engine) as totals:
        starts[0].record()
        for i in range(args.steps):
            t = time.perf_counter()
            engine.step()
            host.append(time.perf_counter() - t)
            starts[i + 1].record()
        torch.cuda.synchronize()
    step_ms = [starts[i].elapsed_time(starts[i + 1]) for i in range(args.steps)]
    host_parts = {f"{name}_ms": 1e3 * total / args.steps for name, total in totals.items()}
    host_parts["other_ms"] = 1e3 * sum(host) / args.steps - host_parts["launch_ms"] - host_parts["wait_ms"]

    prof_steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(prof_steps):
            engine.step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels) / prof_steps
    by_name: dict[str, list] = {}
    for e in kernels:
        entry = by_name.setdefault(e.name[:90], [0, 0.0])
        entry[0] += 1
        entry[1] += e.device_time
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:15]

    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(prof_steps):
            engine.step()
    torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message)[:120] for w in caught if "synchroniz" in str(w.message).lower()]

    bandwidth = measure_copy_bandwidth(engine.device)["bytes_per_s"]
    wbytes = streamed_weight_bytes(engine.model)
    roof_ms = wbytes / bandwidth * 1e3
    med = statistics.median(step_ms)
    s = engine.stats
    record = {
        "target": args.target, "spec": spec, "batch": args.batch, "context": args.context,
        "enforce_eager": args.enforce_eager, "async_scheduling": engine.async_scheduling, "device": torch.cuda.get_device_name(),
        "commit": os.environ.get("PARSPEC_COMMIT"), "torch": torch.__version__,
        "step_ms_median": med, "step_ms_all": step_ms, "host_ms_median": statistics.median(host) * 1e3,
        "host_ms_per_step": host_parts,
        "kernels_per_step": len(kernels) / prof_steps, "gpu_ms_per_step": gpu_us / 1e3,
        "host_syncs_per_step": len(syncs) / prof_steps, "sync_messages": sorted(set(syncs)),
        "weight_bytes": wbytes, "copy_bandwidth_GBps": bandwidth / 1e9, "roofline_ms": roof_ms,
        "percent_of_roofline": 100 * roof_ms / med,
        "acceptance_length": s.acceptance_length if spec else 1.0,
        "top_kernels": [{"name": n, "calls_per_step": c / prof_steps, "us_per_step": t / prof_steps}
                        for n, (c, t) in top],
    }
    print(f"step {med:.3f} ms (host {record['host_ms_median']:.3f} ms), GPU {record['gpu_ms_per_step']:.3f} ms in "
          f"{record['kernels_per_step']:.0f} kernels, {record['host_syncs_per_step']:.1f} syncs/step, roofline "
          f"{roof_ms:.3f} ms ({record['percent_of_roofline']:.1f}%), acceptance {record['acceptance_length']:.2f}")
    print("host per step: " + ", ".join(f"{k[:-3]} {v:.3f} ms" for k, v in host_parts.items()))
    for t in record["top_kernels"]:
        print(f"  {t['us_per_step']:9.1f} us {t['calls_per_step']:6.1f}x  {t['name']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
    return 0


@contextmanager
def host_parts_timed(engine):
    """Yields a dict that adds up the host seconds the engine spends in ``_launch`` ("launch")
    and in ``StepOutput.fetch``, the step's one synchronisation ("wait"), until the block ends;
    both methods are restored then."""
    from parspec.step import StepOutput

    totals = {"launch": 0.0, "wait": 0.0}

    def timed(fn, name):
        def run(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - t
        return run

    fetch = StepOutput.fetch
    engine._launch = timed(engine._launch, "launch")  # an instance attribute over the method
    StepOutput.fetch = timed(fetch, "wait")
    try:
        yield totals
    finally:
        del engine._launch
        StepOutput.fetch = fetch


if __name__ == "__main__":
    sys.exit(main())
