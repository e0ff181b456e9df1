"""Acceptance table: mean acceptance length per target step (accepted drafts + 1) on
HumanEval prompts, greedy, K = 1..8, for each proposer on the reference pair.

    python benchmarks/acceptance.py --out benchmarks/results/acceptance.json \
        --prompts ../shared/data/humaneval.jsonl [--device cuda --dtype bfloat16]

Writes the JSON (device, commit, every parameter, per-method per-K results) and a PNG
of acceptance length against K beside it. Acceptance depends only on the models and
the prompts, not on speed; on GPU in bf16 near-ties of the target may flip a few
tokens, so the dtype is recorded."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere, without installing the package
from parspec.bench.harness import REFERENCE_PAIR as FIX, ModelPair, read_prompts, spec_config  # noqa: E402
from parspec.bench.report import device_name, git_commit, save_result  # noqa: E402,F401

# The reference result this project aims at (P-EAGLE paper, Llama-3.1-8B, HumanEval).
SEED_REFERENCE = {"K=3": 3.02, "K=7": 3.94}


def methods(args) -> dict:
    pair = ModelPair.under(args.pair)
    return {name: (lambda k, name=name: spec_config(name, k, pair)) for name in args.methods}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--prompts", default=os.path.join(REPO, "..", "shared", "data", "humaneval.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=164)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ks", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--methods", nargs="+", default=["ngram", "draft_model", "eagle3", "p-eagle"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--pair", default=FIX, help="a directory holding target/, draft/, eagle3/ and p-eagle/ "
                    "(default: the reference pair in fixtures/; e.g. candidate heads beside its target)")
    args = ap.parse_args(argv)
    commit = git_commit()  # the code that runs is the code checked out now, not at the end

    from parspec import LLM, SamplingParams

    prompts = read_prompts(args.prompts, args.num_prompts)
    ks = [int(k) for k in args.ks.split(",")]
    target = os.path.join(args.pair, "target")
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    common = dict(dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs, max_model_len=2048)
    base = LLM(target, **common)
    reference = [o.outputs[0].token_ids for o in base.generate(prompts, params, use_tqdm=False)]
    device = str(base.engine.device)
    results = {}
    for name, make in methods(args).items():
        results[name] = {}
        for k in ks:
            llm = LLM(target, speculative_config=make(k), **common)
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            s = llm.engine.stats
            same = sum(o.outputs[0].token_ids == r for o, r in zip(outs, reference))
            results[name][str(k)] = {
                "acceptance_length": round(s.acceptance_length, 4),
                "acceptance_rate_per_position": [round(r, 4) for r in s.acceptance_rate_per_position],
                "sequence_steps": s.num_steps, "batch_steps": llm.engine.draft_steps,
                "drafter_passes_per_step": llm.engine.drafter_passes_per_step,
                "identical_to_no_spec": f"{same}/{len(prompts)}", "seconds": round(elapsed, 2),
            }
            print(f"{name:12s} K={k}: acceptance length {s.acceptance_length:.3f}, identical {same}/{len(prompts)}, "
                  f"{elapsed:.1f}s", flush=True)
            del llm
    record = {
        "benchmark": "acceptance length per target step, greedy",
        "device": device_name(device), "dtype": args.dtype, "commit": commit,
        "python": sys.version.split()[0], "torch": torch.__version__,
        "prompts": os.path.basename(args.prompts), "num_prompts": len(prompts), "max_tokens": args.max_tokens,
        "pair": os.path.relpath(args.pair, REPO) if args.pair == FIX else args.pair,
        "target": "fixtures/reference/target", "ks": ks, "results": results,
        "seed_reference_llama31_8b_humaneval_p_eagle": SEED_REFERENCE,
    }
    save_result(record, args.out, plot)
    return 0


def plot(record: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, per_k in record["results"].items():
        ks = sorted(int(k) for k in per_k)
        line, = ax.plot(ks, [per_k[str(k)]["acceptance_length"] for k in ks], marker="o", label=name)
        # Per depth at the deepest K: the share of drafts accepted at position i (vLLM's measure).
        rates = per_k[str(ks[-1])]["acceptance_rate_per_position"]
        bx.plot(range(1, len(rates) + 1), rates, marker="o", color=line.get_color(), label=f"{name}, K={ks[-1]}")
    ax.scatter([3, 7], [3.02, 3.94], marker="*", s=120, color="black", label="P-EAGLE paper (Llama-3.1-8B)")
    ax.set_xlabel("K (num_speculative_tokens)")
    ax.set_ylabel("acceptance length (tokens / target step)")
    ax.set_title(f"HumanEval, greedy, reference pair ({record['dtype']}, {record['device']})", fontsize=9)
    bx.set_xlabel("draft position (depth)")
    bx.set_ylabel("drafts accepted at the position / drafted there")
    bx.set_title("Per-depth acceptance", fontsize=9)
    bx.set_ylim(0, 1)
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
