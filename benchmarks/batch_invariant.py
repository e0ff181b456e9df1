"""What the batch-invariant mode costs and what it buys: tokens/s with and without it at
concurrency 1 and 32, and the share of greedy speculative completions that differ from no-spec
with and without it, per method, on the reference pair expanded to Llama-3.1-8B shape.

    python benchmarks/batch_invariant.py --out benchmarks/results/batch_invariant_8b_h200.json \\
        --prompts .device/humaneval.jsonl [--pair-dir /tmp/parspec-8b] [--num-prompts 32 --max-tokens 128]

For each mode (default, batch-invariant) one engine per method (no-spec first) decodes the
prompts greedily at each concurrency: at concurrency c, c prompts are in flight at a time
(one generate() call per group of c). The engine is warmed up first (Triton compiles, CUDA
graphs are captured), then the timed pass runs; tokens/s counts output tokens over the wall
time of the pass. A completion "differs" when its tokens are not exactly no-spec's (same mode,
same concurrency). Writes the JSON record (device, commit, every parameter, every cell) and a
PNG beside it."""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere, without installing the package
from parspec.bench.harness import REFERENCE_PAIR, ModelPair, expanded_pair, read_prompts, spec_config  # noqa: E402
from parspec.bench.report import device_name, git_commit, library_versions, save_result  # noqa: E402

MODES = {"default": False, "batch-invariant": True}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _decode(llm, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy completions with ``concurrency`` prompts in flight, and the wall time."""
    from parspec import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    _sync()
    start = time.perf_counter()
    out = []
    for i in range(0, len(prompts), concurrency):
        out += [o.outputs[0].token_ids for o in llm.generate(prompts[i:i + concurrency], params, use_tqdm=False)]
    _sync()
    return out, time.perf_counter() - start


def run_method(args, pair: ModelPair, prompts: list[str], method: str, invariant: bool,
               reference: dict[int, list[list[int]]] | None) -> list[dict]:
    """One engine, every concurrency: the cells of one (mode, method)."""
    from parspec import LLM

    spec = spec_config(method, args.k, pair)
    llm = LLM(pair.target, dtype=args.dtype, device=args.device, speculative_config=spec,
              batch_invariant=invariant, max_num_seqs=max(args.concurrency), max_model_len=args.max_model_len,
              enforce_eager=args.enforce_eager)
    cells = []
    for c in args.concurrency:
        _decode(llm, prompts[:c], c, min(16, args.max_tokens))  # warm-up: compile, capture this bucket
        llm.engine.reset_stats()
        out, seconds = _decode(llm, prompts, c, args.max_tokens)
        tokens = sum(len(t) for t in out)
        cell = {"mode": "batch-invariant" if invariant else "default", "method": method,
                "k": None if spec is None else args.k, "concurrency": c, "tokens": tokens,
                "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
        if spec is not None:
            cell["acceptance_length"] = round(llm.engine.stats.acceptance_length, 3)
            ref = reference[c]
            differ = [i for i, (a, b) in enumerate(zip(out, ref)) if a != b]
            cell.update(differing=len(differ), completions=len(out), mismatch_rate=round(len(differ) / len(out), 4),
                        differing_prompts=differ)
        else:
            reference[c] = out
        cells.append(cell)
        extra = (f", acceptance {cell['acceptance_length']:.2f}, {cell['differing']}/{len(out)} differ from no-spec"
                 if spec is not None else "")
        print(f"{cell['mode']:15s} {method:11s} c={c:<3d} {cell['tokens_per_s']:8.1f} tok/s{extra}", flush=True)
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return cells


def summarise(cells: list[dict]) -> dict:
    """Per method and concurrency: the mode's tokens/s as a fraction of the default's, and the
    mismatch rate in each mode."""
    by = {(c["mode"], c["method"], c["concurrency"]): c for c in cells}
    out = {}
    for (mode, method, conc), cell in by.items():
        if mode != "batch-invariant" or ("default", method, conc) not in by:
            continue
        base = by[("default", method, conc)]
        out[f"{method} c={conc}"] = {
            "tokens_per_s_default": base["tokens_per_s"], "tokens_per_s_invariant": cell["tokens_per_s"],
            "invariant_over_default": round(cell["tokens_per_s"] / base["tokens_per_s"], 3),
            "mismatch_rate_default": base.get("mismatch_rate"), "mismatch_rate_invariant": cell.get("mismatch_rate"),
        }
    return out


def plot(record: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["summary"]
    names = list(rows)
    x = range(len(names))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(6.5, 0.9 * len(names) + 2), 7))
    for off, mode, key in ((-0.2, "default", "tokens_per_s_default"), (0.2, "batch-invariant", "tokens_per_s_invariant")):
        ax1.bar([i + off for i in x], [rows[n][key] for n in names], width=0.4, label=mode)
    ax1.set_ylabel("output tokens/s")
    ax1.set_title(f"batch-invariant mode: cost and mismatches ({record['model_label']}, {record['parameters']['dtype']}, "
                  f"{record['device']}, {record['commit'][:10]})", fontsize=8)
    for off, mode, key in ((-0.2, "default", "mismatch_rate_default"), (0.2, "batch-invariant", "mismatch_rate_invariant")):
        ax2.bar([i + off for i in x], [100 * (rows[n][key] or 0) for n in names], width=0.4, label=mode)
    ax2.set_ylabel("completions differing from no-spec (%)")
    for ax in (ax1, ax2):
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON record; the PNG goes beside it")
    ap.add_argument("--pair-dir", default=None,
                    help="an expanded pair (target/, draft/, eagle3/, p-eagle/); default: --expand it")
    ap.add_argument("--expand", default="8b", help="preset to expand the reference pair to, when no --pair-dir")
    ap.add_argument("--expand-dir", default="/tmp/parspec-8b", help="where the expansion is written or reused")
    ap.add_argument("--prompts", default=os.path.join(REPO, ".device", "humaneval.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--methods", nargs="+", default=["p-eagle", "eagle3", "draft_model", "ngram"])
    ap.add_argument("-k", type=int, default=3, help="num_speculative_tokens of every method")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args(argv)
    commit = git_commit()  # the code that runs is the code checked out now

    if args.pair_dir:
        pair, label = ModelPair.under(args.pair_dir), f"expanded pair in {args.pair_dir}"
    else:
        pair, _ = expanded_pair(REFERENCE_PAIR, args.expand_dir, args.expand, args.dtype)
        label = f"reference pair expanded to {args.expand} shape"
    prompts = read_prompts(args.prompts, args.num_prompts)
    cells = []
    for mode, invariant in MODES.items():
        reference: dict[int, list[list[int]]] = {}
        for method in ["no-spec", *args.methods]:
            cells += run_method(args, pair, prompts, method, invariant, reference)
    record = {
        "benchmark": "batch-invariant mode: tokens/s and greedy mismatch vs no-spec, with and without it",
        "device": device_name(args.device), "commit": commit, "versions": library_versions(),
        "model_label": label, "models": pair.as_dict(),
        "parameters": {**vars(args), "num_prompts_read": len(prompts)},
        "cells": cells, "summary": summarise(cells),
    }
    save_result(record, args.out, plot)
    for name, row in record["summary"].items():
        print(f"{name:20s} invariant/default {row['invariant_over_default']:.3f}; mismatch default "
              f"{row['mismatch_rate_default']}, invariant {row['mismatch_rate_invariant']}")
    print(f"-- wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
