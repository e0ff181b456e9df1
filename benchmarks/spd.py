"""SPD against its baselines, in wall-clock time, in one run on one machine:

* ``spd``        speculative pipeline decoding over n stages (one GPU each), drafting with the
                 SPD module (``--drafter module``, default) or the pair's EAGLE-3 head chained
                 from the last exited token (``--drafter eagle3``: <pair>/eagle3, which the 8B
                 expansion expands too)
* ``pipelined``  plain pipelined decoding over the same n stages (micro-batches round robin)
* ``single``     the existing single-GPU engine without speculation
* ``p-eagle``    the single-GPU engine with P-EAGLE (parallel drafting, K drafts per step)

On nvidia-h200-x2 (the lead runs it; the model is the reference pair expanded to the
Llama-3.1-8B shape, the SPD module expanded with it):

    python3 benchmarks/spd.py --expand-dir /tmp/pair-8b --out benchmarks/results/spd_8b_h200.json
    python3 benchmarks/spd.py --expand-dir /tmp/pair-8b --drafter eagle3 --methods pipelined spd \
        --out benchmarks/results/spd_eagle3_8b_h200.json

CPU smoke test (the fixture pair itself, fp32):

    python3 benchmarks/spd.py --device cpu --max-tokens 8 --prompts 2

HumanEval prompts, greedy, ``--max-tokens`` new tokens with eos ignored, concurrency c =
max_num_seqs (the first max(--prompts, c) prompts). Each cell runs the workload once to
warm up (Triton compiles, CUDA-graph captures) and then ``--repeats`` timed runs (median).
Reported per cell: output tokens/s, acceptance (drafts accepted / drafted), greedy
agreement with ``single`` (and per prompt the first differing position), and for the
pipelined cells the per-cycle breakdown (cycle time, slowest stage, SPD module, transfer +
host = cycle - slowest stage, rank 0's host time). The JSON holds device, commit and
parameters; a PNG plot is written beside it."""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from parspec.bench import report  # noqa: E402
from parspec.bench.harness import DEFAULT_PROMPTS, REFERENCE_PAIR, expanded_pair, read_prompts  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--pair", default=REFERENCE_PAIR, help="directory holding target/, p-eagle/, spd-N/")
    p.add_argument("--expand", choices=("8b", "none"), default=None, help="default: 8b on a GPU, none on the CPU")
    p.add_argument("--expand-dir", default=None, help="where the expanded pair is written (reused when there)")
    p.add_argument("--prompts-file", default=DEFAULT_PROMPTS)
    p.add_argument("--prompts", type=int, default=8, help="number of prompts (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--stages", type=int, default=2, help="pipeline stages n (= GPUs)")
    p.add_argument("--peagle-k", type=int, default=7)
    p.add_argument("--drafter", choices=("module", "eagle3"), default="module",
                   help="SPD's drafter: the SPD module, or the EAGLE-3 head (chained from the last exited token)")
    p.add_argument("--spd-module", default=None,
                   help="the SPD drafter's directory (default: <pair>/spd-<stages>, with --drafter eagle3 <pair>/eagle3)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (any engine)")
    p.add_argument("--methods", nargs="+", default=["single", "p-eagle", "pipelined", "spd"],
                   choices=["single", "p-eagle", "pipelined", "spd"])
    p.add_argument("--out", default=None, help="JSON record; the PNG is written beside it")
    return p.parse_args(argv)


def _sync() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def _release(llm) -> None:
    if hasattr(llm.engine, "shutdown"):
        llm.engine.shutdown()
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build(method: str, target: str, pair_root: str, args, device: str, c: int, max_len: int):
    from parspec import LLM

    common = dict(dtype=args.dtype, device=device, max_num_seqs=c, max_model_len=max_len,
                  enforce_eager=args.enforce_eager)
    if method == "single":
        return LLM(target, **common)
    if method == "p-eagle":
        return LLM(target, speculative_config={"method": "eagle3", "model": os.path.join(pair_root, "p-eagle"),
                                               "num_speculative_tokens": args.peagle_k, "parallel_drafting": True},
                   **common)
    if method == "pipelined":
        return LLM(target, pipeline_parallel_size=args.stages, **common)
    return LLM(target, pipeline_parallel_size=args.stages,
               speculative_config={"method": "spd", "model": args.spd_module}, **common)


def run_cell(method, target, pair_root, args, device, c, prompt_ids, baseline) -> dict:
    from parspec import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    max_len = max(len(p) for p in prompt_ids) + args.max_tokens + 8
    inputs = [{"prompt_token_ids": p} for p in prompt_ids]
    llm = build(method, target, pair_root, args, device, c, max_len)
    try:
        llm.generate(inputs, params, use_tqdm=False)  # warm-up: the timed workload once
        engine = llm.engine
        times, outs = [], None
        for _ in range(args.repeats):
            if hasattr(engine, "reset_stats"):
                engine.reset_stats()
            _sync()
            start = time.perf_counter()
            outs = llm.generate(inputs, params, use_tqdm=False)
            _sync()
            times.append(time.perf_counter() - start)
        tokens = [o.outputs[0].token_ids for o in outs]
        n_out = sum(len(t) for t in tokens)
        wall = statistics.median(times)
        cell = {"method": method, "concurrency": c, "tokens_per_s": n_out / wall, "wall_s": wall,
                "wall_s_runs": times, "output_tokens": n_out}
        stats = getattr(engine, "stats", None)
        if stats is not None and stats.num_draft_tokens:
            cell["acceptance_rate"] = stats.acceptance_rate
            cell["acceptance_length"] = stats.acceptance_length
        if getattr(engine, "times", None) is not None:
            cell["per_cycle"] = engine.times.as_dict()
            cell["per_cycle"]["cycles_per_run"] = engine.times.cycles  # reset before each run: the last one
        if baseline is not None:
            same = sum(a == b for a, b in zip(tokens, baseline))
            cell["greedy_equal_to_single"] = f"{same}/{len(tokens)}"
            # per prompt, the first output position that differs (None: equal): a bf16 near-tie
            # diverges late and rarely, a bug early and everywhere
            cell["first_divergence"] = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                                             None if len(a) == len(b) else min(len(a), len(b)))
                                        for a, b in zip(tokens, baseline)]
        return cell, tokens
    finally:
        _release(llm)


def plot(record: dict, path: str) -> None:
    plt = report._pyplot()
    cells = [c for c in record["cells"] if "tokens_per_s" in c]
    methods = list(dict.fromkeys(c["method"] for c in cells))
    conc = sorted({c["concurrency"] for c in cells})
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        ys = [next((c["tokens_per_s"] for c in cells if c["method"] == m and c["concurrency"] == k), 0) for k in conc]
        ax.bar([j + i * width for j in range(len(conc))], ys, width, label=m)
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(conc))], [f"c={k}" for k in conc])
    ax.set_ylabel("output tokens/s")
    ax.legend()
    piped = [c for c in cells if "per_cycle" in c]
    labels = [f"{c['method']}\nc={c['concurrency']}" for c in piped]
    stage = [c["per_cycle"]["slowest_stage_ms"] for c in piped]
    rest = [c["per_cycle"]["transfer_and_host_ms"] for c in piped]
    module = [c["per_cycle"]["module_ms"] for c in piped]
    bx.bar(labels, stage, label="slowest stage")
    bx.bar(labels, rest, bottom=stage, label="transfer + host")
    drafter = "EAGLE-3 head" if record["parameters"].get("spd_drafter") == "eagle3" else "SPD module"
    bx.scatter(labels, module, color="black", zorder=3, label=f"{drafter} (beside stage 0)")
    bx.set_ylabel("ms per cycle")
    bx.legend()
    p = record["parameters"]
    fig.suptitle(f"SPD vs baselines: {record['model_label']}, {p['stages']} stages, {p['max_tokens']} tokens, "
                 f"{record['device']}, commit {record['commit'][:8]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(args.stages, 1)))
    expand = args.expand or ("8b" if device.startswith("cuda") else "none")
    pair_root, label, expansion = args.pair, f"reference pair ({args.pair})", None
    if expand != "none":
        if not args.expand_dir:
            raise SystemExit("--expand needs --expand-dir (where the expanded pair is written)")
        dtype = "bfloat16" if args.dtype == "auto" else args.dtype
        _, expansion = expanded_pair(args.pair, args.expand_dir, expand, dtype)
        pair_root, label = args.expand_dir, f"reference pair expanded to {expand} shape"
    target = os.path.join(pair_root, "target")
    methods = list(args.methods)
    default_dir = "eagle3" if args.drafter == "eagle3" else f"spd-{args.stages}"
    module_dir = args.spd_module = args.spd_module or os.path.join(pair_root, default_dir)
    skipped = {}
    if "spd" in methods and not os.path.isfile(os.path.join(module_dir, "config.json")):
        skipped["spd"] = f"no SPD drafter ({args.drafter}) for {args.stages} stages at {module_dir}"
        print(f"spd: skipped, {skipped['spd']}", file=sys.stderr)
        methods.remove("spd")
    from parspec.tokenizer import Tokenizer
    tok = Tokenizer(target)
    record = {"what": "SPD vs plain pipelined vs single-GPU decoding vs single-GPU P-EAGLE",
              "model_label": label, "device": report.device_name(device),
              "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
              if device.startswith("cuda") else [report.device_name(device)],
              "commit": report.git_commit(), "versions": report.library_versions(),
              "parameters": {"pair": pair_root, "stages": args.stages, "max_tokens": args.max_tokens,
                             "prompts": args.prompts, "prompts_file": args.prompts_file, "dtype": args.dtype,
                             "concurrency": args.concurrency, "peagle_k": args.peagle_k, "repeats": args.repeats,
                             "enforce_eager": args.enforce_eager,
                             "spd_module": module_dir if "spd" in methods else None,
                             "spd_drafter": args.drafter,
                             "greedy": True, "ignore_eos": True},
              "expansion": expansion, "skipped": skipped, "cells": []}
    for c in args.concurrency:
        prompt_ids = [tok.encode(p) for p in read_prompts(args.prompts_file, max(args.prompts, c))]
        baseline = None
        for method in methods:
            print(f"{method} c={c} ...", file=sys.stderr, flush=True)
            try:
                cell, tokens = run_cell(method, target, pair_root, args, device, c, prompt_ids, baseline)
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                cell, tokens = {"method": method, "concurrency": c, "error": report.error_text(e)}, None
            if method == "single" and tokens is not None:
                baseline = tokens
            record["cells"].append(cell)
            print(f"  {cell}", file=sys.stderr, flush=True)
            if args.out:
                report.save_record(record, args.out)
    by = {(x["method"], x["concurrency"]): x for x in record["cells"] if "tokens_per_s" in x}
    for c in args.concurrency:
        spd, piped = by.get(("spd", c)), by.get(("pipelined", c))
        if spd and piped:
            record.setdefault("spd_over_pipelined", {})[str(c)] = spd["tokens_per_s"] / piped["tokens_per_s"]
    print(f"{'method':>10} {'c':>3} {'tok/s':>9} {'accept':>7} {'cycle ms':>9} {'stage ms':>9} {'module ms':>9}")
    for x in record["cells"]:
        if "error" in x:
            print(f"{x['method']:>10} {x['concurrency']:>3} error: {x['error'][:80]}")
            continue
        pc = x.get("per_cycle", {})
        acc = x.get("acceptance_rate")
        print(f"{x['method']:>10} {x['concurrency']:>3} {x['tokens_per_s']:9.1f} "
              f"{'' if acc is None else f'{acc:.2f}':>7} {pc.get('cycle_ms', float('nan')):9.2f} "
              f"{pc.get('slowest_stage_ms', float('nan')):9.2f} {pc.get('module_ms', float('nan')):9.2f}")
    if record.get("spd_over_pipelined"):
        print(f"SPD / plain pipelined tokens/s: {record['spd_over_pipelined']}")
    if args.out:
        report.save_result(record, args.out, plot)
        print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.png")
    return 1 if any("error" in x for x in record["cells"]) else 0


if __name__ == "__main__":
    sys.exit(main())
