"""SPD acceptance: the cycle replayed in one process for trained speculation modules.

    python benchmarks/spd_acceptance.py --out benchmarks/results/spd_acceptance_cpu_fp32.json \
        [--modules fixtures/reference/spd-2 fixtures/reference/spd-4] [--num-prompts 32 --max-tokens 128]
    python benchmarks/spd_acceptance.py --out benchmarks/results/spd_eagle3_acceptance_cpu_fp32.json \
        --eagle3 fixtures/reference/eagle3 --stages 2 4

With ``--eagle3`` an EAGLE-3 head is SPD's drafter instead (``simulate.Eagle3Drafting``: chained
from the last exited token, the in-flight tokens fed with the head's own hidden states) for
each ``--stages`` n, the layers split by ``parspec.spd.partition.stage_bounds`` (the modules'
split); modules run too only when ``--modules`` is given.

For each module (n stages): greedy SPD over HumanEval prompts with ``parspec.spd.simulate``
(the target run stage by stage on one token, positional KV overwrite, the window rules after
prefill / acceptance / rejection), checked token for token against the engine's plain greedy
output. Reports tokens emitted per cycle, acceptance per window size (d = n is the steady
state), and the ideal speed-up over plain pipelined decoding, tokens per cycle x n (plain
pipelining of one sequence emits 1/n token per cycle; the module runs beside the stages and
transfers are ignored). Acceptance depends only on the models and prompts, not on speed."""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere, without installing the package
from parspec.bench.harness import read_prompts  # noqa: E402
from parspec.bench.report import device_name, git_commit, save_record  # noqa: E402

FIX = os.path.join(REPO, "fixtures", "reference")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--modules", nargs="+", default=None,
                    help="SPD module directories (default: spd-2 and spd-4, unless --eagle3 is given)")
    ap.add_argument("--eagle3", default=None, help="an EAGLE-3 head directory to use as SPD's drafter")
    ap.add_argument("--stages", nargs="+", type=int, default=[2, 4], help="pipeline sizes n for --eagle3")
    ap.add_argument("--target", default=os.path.join(FIX, "target"))
    ap.add_argument("--prompts", default=os.path.join(REPO, "..", "shared", "data", "humaneval.jsonl"))
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.modules is None:
        args.modules = [] if args.eagle3 else [os.path.join(FIX, "spd-2"), os.path.join(FIX, "spd-4")]
    commit = git_commit()
    torch.set_num_threads(args.threads)

    from parspec import LLM, SamplingParams
    from parspec.loader import load_model
    from parspec.spd.module import SPDModule
    from parspec.spd.partition import stage_bounds
    from parspec.spd.simulate import Eagle3Drafting, simulate_sequence, summarize
    from parspec.tokenizer import Tokenizer

    tok = Tokenizer(args.target)
    prompts = [tok.encode(p) for p in read_prompts(args.prompts, args.num_prompts)]
    llm = LLM(args.target, dtype="float32", device="cpu", max_model_len=2048, max_num_seqs=64)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    reference = [list(o.outputs[0].token_ids)
                 for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    del llm
    target, _ = load_model(args.target, torch.float32, "cpu")
    eos = tuple(tok.eos_token_ids)
    results = {}

    def run(name: str, drafter, n: int, **info) -> None:
        start = time.perf_counter()
        runs = [simulate_sequence(target, drafter, p, args.max_tokens, eos) for p in prompts]
        same = sum(r.tokens == ref for r, ref in zip(runs, reference))
        s = summarize(runs, n)
        s.update(identical_to_greedy=f"{same}/{len(prompts)}", seconds=round(time.perf_counter() - start, 1), **info)
        results[name] = s
        acc = " ".join("-" if a is None else f"{a:.3f}" for a in s["acceptance_by_window"])
        print(f"{name}: n={n} tokens/cycle {s['tokens_per_cycle']:.3f}, steady-state acceptance "
              f"{s['steady_state_acceptance']:.3f}, acceptance by window d=1..{n}: {acc}, ideal speed-up "
              f"{s['ideal_speedup_vs_plain_pipeline']:.2f}x, drafter passes/cycle "
              f"{s['drafter_passes_per_cycle']:.2f}, identical {same}/{len(prompts)}", flush=True)
        if same != len(prompts):
            print(f"  WARNING: {len(prompts) - same} sequences differ from plain greedy decoding", flush=True)

    for path in args.modules:
        module = SPDModule.from_pretrained(path, target.model.embed_tokens, target.model.norm, target.lm_head,
                                           dtype=torch.float32)
        run(os.path.basename(os.path.normpath(path)), module, module.config.num_stages,
            module=os.path.relpath(path, REPO), mixer=module.config.mixer)
    for n in args.stages if args.eagle3 else []:
        bounds = stage_bounds(target.config.num_hidden_layers, n)
        drafter = Eagle3Drafting.load(args.eagle3, target, bounds)
        run(f"eagle3-{n}", drafter, n, head=os.path.relpath(args.eagle3, REPO), stage_bounds=bounds,
            aux_layers=list(drafter.aux_layers),
            scheme="EAGLE-3 chained from the last exited token: its real entry (target aux features), then "
                   "one chained step per further in-flight token (the head's own hidden state)")
    save_record({
        "benchmark": "SPD acceptance (cycle simulator), greedy" + (", EAGLE-3 drafter" if args.eagle3 else ""),
        "device": device_name("cpu"), "dtype": "float32",
        "commit": commit, "python": sys.version.split()[0], "torch": torch.__version__,
        "prompts": os.path.basename(args.prompts), "num_prompts": len(prompts), "max_tokens": args.max_tokens,
        "target": os.path.relpath(args.target, REPO), "results": results,
    }, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
