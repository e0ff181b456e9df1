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
import json
import os
import platform
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere, without installing the package
FIX = os.path.join(REPO, "fixtures", "reference")
# The reference result this project aims at (P-EAGLE paper, Llama-3.1-8B, HumanEval).
SEED_REFERENCE = {"K=3": 3.02, "K=7": 3.94}


def git_commit() -> str:
    # PARSPEC_COMMIT first: on the device the tree is re-sent each call while a .git there can
    # be stale (a warm machine kept the first call's), so git would name the wrong commit.
    if os.environ.get("PARSPEC_COMMIT"):
        return os.environ["PARSPEC_COMMIT"]
    try:
        return subprocess.check_output(["git", "-C", REPO, "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_prompts(path: str, num: int) -> list[str]:
    """The first ``num`` prompts of a JSONL file of {"prompt": ...} objects."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()][:num]


def device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def methods(args) -> dict:
    out = {
        "ngram": lambda k: {"method": "ngram", "num_speculative_tokens": k},
        "draft_model": lambda k: {"method": "draft_model", "model": os.path.join(FIX, "draft"),
                                  "num_speculative_tokens": k},
        "eagle3": lambda k: {"method": "eagle3", "model": os.path.join(FIX, "eagle3"), "num_speculative_tokens": k},
        "p-eagle": lambda k: {"method": "eagle3", "model": os.path.join(FIX, "p-eagle"),
                              "num_speculative_tokens": k, "parallel_drafting": True},
    }
    return {name: out[name] for name in args.methods}


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
    args = ap.parse_args(argv)
    commit = git_commit()  # the code that runs is the code checked out now, not at the end

    from parspec import LLM, SamplingParams

    prompts = read_prompts(args.prompts, args.num_prompts)
    ks = [int(k) for k in args.ks.split(",")]
    target = os.path.join(FIX, "target")
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
        "target": "fixtures/reference/target", "ks": ks, "results": results,
        "seed_reference_llama31_8b_humaneval_p_eagle": SEED_REFERENCE,
    }
    save_result(record, args.out, plot)
    return 0


def save_result(record: dict, out: str, plot_fn) -> None:
    """The JSON record, and its plot as a PNG beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=2)
    plot_fn(record, os.path.splitext(out)[0] + ".png")


def plot(record: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, per_k in record["results"].items():
        ks = sorted(int(k) for k in per_k)
        ax.plot(ks, [per_k[str(k)]["acceptance_length"] for k in ks], marker="o", label=name)
    ax.scatter([3, 7], [3.02, 3.94], marker="*", s=120, color="black", label="P-EAGLE paper (Llama-3.1-8B)")
    ax.set_xlabel("K (num_speculative_tokens)")
    ax.set_ylabel("acceptance length (tokens / target step)")
    ax.set_title(f"HumanEval, greedy, reference pair ({record['dtype']}, {record['device']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
