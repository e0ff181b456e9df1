"""Where a speculative step's time goes: torch.profiler tables for P-EAGLE at several K.

    python3 benchmarks/profile_steps.py --prompts humaneval.jsonl [--ks 3 5 7 --batch 8]

For each K: one untimed warm-up generation, then one profiled generation of the same prompts.
Prints wall seconds and engine steps, then the operators sorted by GPU time and by CPU time.
Used to see whether a slow configuration does more work per step or runs the same work slower
on the host (benchmarks/README.md, throughput notes)."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acceptance import FIX, read_prompts  # noqa: E402


def main(argv=None) -> int:
    from parspec import LLM, SamplingParams

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 5, 7])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args(argv)
    prompts = read_prompts(args.prompts, args.num_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    for k in args.ks:
        spec = {"method": "eagle3", "model": os.path.join(FIX, "p-eagle"), "num_speculative_tokens": k,
                "parallel_drafting": True}
        llm = LLM(os.path.join(FIX, "target"), dtype="bfloat16", device="cuda", max_num_seqs=args.batch,
                  max_model_len=1024, speculative_config=spec)
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            llm.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
        print(f"=== K={k} {time.perf_counter() - start:.2f}s steps={llm.engine.draft_steps}", flush=True)
        for key in ("cuda_time_total", "cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
