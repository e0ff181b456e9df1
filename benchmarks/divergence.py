"""Explain a speculative output that differs from no-spec: for one method and K, decode the
prompts both ways with the acceptance benchmark's settings, and for each completion that differs
print the first differing position and the target's top-3 logits there, from HF transformers
(fp32, the whole sequence in one forward).

    python benchmarks/divergence.py --method p-eagle -k 2 [--prompts ... --num-prompts 164]

A margin of a few float32 ulps between the top two logits is a near-tie that matrix shapes
decide. The verification pass multiplies more rows at once than a decode step does, and CPU
GEMMs round a row differently depending on how many rows they are given. A clear margin at a
differing token would be a bug."""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from acceptance import FIX, REPO, methods, read_prompts  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="p-eagle", choices=["ngram", "draft_model", "eagle3", "p-eagle"])
    ap.add_argument("-k", type=int, default=2)
    ap.add_argument("--prompts", default=os.path.join(REPO, "..", "shared", "data", "humaneval.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=164)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from parspec import LLM, SamplingParams

    prompts = read_prompts(args.prompts, args.num_prompts)
    target = os.path.join(FIX, "target")
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    common = dict(dtype="float32", device="cpu", max_num_seqs=args.max_num_seqs, max_model_len=2048)
    base = LLM(target, **common)
    reference = [o.outputs[0].token_ids for o in base.generate(prompts, params, use_tqdm=False)]
    spec = methods(argparse.Namespace(methods=[args.method]))[args.method](args.k)
    got = [o.outputs[0].token_ids for o in LLM(target, speculative_config=spec, **common).generate(
        prompts, params, use_tqdm=False)]
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    differing = [i for i, (a, b) in enumerate(zip(reference, got)) if a != b]
    print(f"{args.method} K={args.k}: {len(prompts) - len(differing)}/{len(prompts)} identical to no-spec")
    for i in differing:
        a, b = reference[i], got[i]
        j = next((p for p in range(min(len(a), len(b))) if a[p] != b[p]), min(len(a), len(b)))
        ids = base.engine.tokenizer.encode(prompts[i]) + a[:j]
        with torch.no_grad():
            top = torch.topk(hf(torch.tensor([ids])).logits[0, -1], 3)
        values = top.values.tolist()
        ulp = torch.finfo(torch.float32).eps * abs(values[0])
        print(f"prompt {i}: output position {j}: no-spec {a[j] if j < len(a) else 'end'}, "
              f"speculative {b[j] if j < len(b) else 'end'}; target top-3 {top.indices.tolist()} "
              f"logits {[f'{v:.7f}' for v in values]}; top-2 margin {values[0] - values[1]:.3e} "
              f"(~{(values[0] - values[1]) / ulp:.1f} ulp)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
