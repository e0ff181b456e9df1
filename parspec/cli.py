"""`parspec generate | demo | bench | ...`: argparse front end over the offline API."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from parspec.config import ConfigError
from parspec.loader import LoadError
from parspec.sampling import SamplingError


def add_engine_args(p: argparse.ArgumentParser, model_required: bool = True,
                    seed_help: str = "sampling seed per request") -> None:
    p.add_argument("--model", required=model_required, help="HF model directory (config.json + safetensors)")
    p.add_argument("--speculative-config", default=None,
                   help='vLLM-style JSON, e.g. \'{"method":"ngram","num_speculative_tokens":4}\'')
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192,
                   help="tokens one step may feed: decodes first (K+1 each), prompt chunks in the rest")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="prefill prompts in chunks beside running decodes (vLLM's default); "
                        "--no-enable-chunked-prefill: whole prompts in prefill-only steps")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--pipeline-parallel-size", type=int, default=1,
                   help="split the target into this many pipeline stages, one process (GPU) each; with "
                        '--speculative-config \'{"method":"spd","model":DIR}\' speculative pipeline decoding')
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="fraction of the GPU's memory the engine may use (weights, KV cache, activations)")
    p.add_argument("--seed", type=int, default=None, help=seed_help)
    p.add_argument("--batch-invariant", action="store_true",
                   help="the target computes each row the same way whatever the batch: greedy speculative "
                        "output equals no-spec bit for bit in any dtype (slower; see README)")
    add_enforce_eager_arg(p)


def add_enforce_eager_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enforce-eager", action="store_true", help="run eagerly: no CUDA graphs")


def engine_kwargs(args) -> dict:
    return dict(dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, block_size=args.block_size, enforce_eager=args.enforce_eager,
                max_num_batched_tokens=args.max_num_batched_tokens, enable_chunked_prefill=args.enable_chunked_prefill,
                gpu_memory_utilization=args.gpu_memory_utilization, batch_invariant=args.batch_invariant,
                pipeline_parallel_size=getattr(args, "pipeline_parallel_size", 1))


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


def sampling_params(args):
    from parspec.sampling import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos, seed=args.seed)


def print_stats(llm, outputs, elapsed: float, file=sys.stdout) -> None:
    n_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"-- {len(outputs)} request(s), {n_out} tokens in {elapsed:.2f}s: {n_out / elapsed:.1f} tok/s", file=file)
    engine = llm.engine
    if getattr(engine, "times", None) is not None and engine.times.cycles:  # pipelined (parspec.spd)
        t = engine.times.as_dict()
        print(f"-- pipeline: {engine.num_stages} stages, {t['cycles']} cycles of {t['cycle_ms']:.2f} ms (slowest "
              f"stage {t['slowest_stage_ms']:.2f} ms, module {t['module_ms']:.2f} ms)", file=file)
    if getattr(engine, "proposer", None) is not None or getattr(engine, "spd", False):
        s = engine.stats
        rates = ", ".join(f"{r:.2f}" for r in s.acceptance_rate_per_position)
        print(f"-- speculation ({engine.spec_config.method}, K={engine.spec_config.num_speculative_tokens}): "
              f"acceptance length {s.acceptance_length:.2f} tokens/step over {s.num_drafts} drafts; "
              f"acceptance rate per draft position [{rates}]", file=file)
        phases = engine.step_events.totals() if getattr(engine, "step_events", None) is not None else None
        if phases and phases["steps"]:
            print(f"-- draft time {phases['draft_ms'] / 1e3:.2f}s, target+verify time "
                  f"{phases['verify_ms'] / 1e3:.2f}s over {phases['steps']} steps", file=file)


def cmd_generate(args) -> int:
    from parspec import LLM

    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        prompts.append(json.loads(line)["prompt"])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ConfigError(f"{args.prompts_file}:{i}: expected a JSON object with \"prompt\": {e}")
    if not prompts:
        raise ConfigError("give at least one --prompt or --prompts-file")
    llm = LLM(args.model, speculative_config=args.speculative_config, **engine_kwargs(args))
    if args.chat:
        tok = llm.get_tokenizer()
        prompts = [tok.apply_chat_template([{"role": "user", "content": p}]) for p in prompts]
    params = sampling_params(args)
    if getattr(llm.engine, "proposer", None) is not None:
        from parspec.engine.timing import StepEvents

        llm.engine.step_events = StepEvents(llm.engine.device)  # draft vs verify time, on the device
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=len(prompts) > 1)
    elapsed = time.perf_counter() - start
    for out in outputs:
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": out.outputs[0].text,
                              "token_ids": out.outputs[0].token_ids,
                              "finish_reason": out.outputs[0].finish_reason, "spec_stats": out.spec_stats}))
        else:
            print(f"{out.prompt}\033[1m{out.outputs[0].text}\033[0m" if sys.stdout.isatty()
                  else out.prompt + out.outputs[0].text)
            print()
    print_stats(llm, outputs, elapsed, file=sys.stderr if args.json else sys.stdout)
    if hasattr(llm.engine, "shutdown"):  # a pipeline's stage processes
        llm.engine.shutdown()
    return 0


def cmd_demo(args) -> int:
    from parspec.demo import run_demo

    return run_demo(args)


def cmd_bench(args) -> int:
    from parspec.bench import harness, report

    pair_root = args.pair
    expansion = None
    if args.expand:
        if not args.expand_dir:
            raise ConfigError("--expand needs --expand-dir, the directory to write the expanded pair to")
        dtype = "bfloat16" if args.dtype == "auto" else args.dtype
        pair, expansion = harness.expanded_pair(pair_root, args.expand_dir, args.expand, dtype)
        label = f"reference pair expanded to {args.expand} shape ({args.expand_dir})"
    else:
        pair = harness.ModelPair.under(pair_root)
        label = f"model pair in {pair_root}"
    peers = [p for p in (args.peers or "").split(",") if p]
    cfg = harness.BenchConfig(
        pair=pair, methods=args.methods, ks=args.ks, concurrency=args.concurrency, prompts=args.prompts,
        num_prompts=args.num_prompts, max_tokens=args.max_tokens, repeats=args.repeats, dtype=args.dtype,
        device=args.device, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len, peers=peers,
        peer_prompts=args.peer_prompts, peer_k=args.peer_k, gpt_fast_dir=args.gpt_fast,
        gpt_fast_compile=args.gpt_fast_compile, model_label=label, expansion=expansion)
    record = harness.run_bench(cfg, out=args.out, progress=not args.no_progress)
    bw = record["bandwidth"]["bytes_per_s"]
    print(f"parspec bench: {record['model_label']}, {record['parameters'].get('resolved_dtype')}, "
          f"{record['device']}, commit {record['commit'][:12]}, copy bandwidth "
          f"{f'{bw / 1e12:.2f} TB/s' if bw else 'not measured'}")
    print(report.summary_table(record))
    if args.out:
        print(f"-- wrote {args.out} and {', '.join(record.get('plots', []))}")
    failed = [c for c in record["cells"] if c.get("error")]
    return 1 if failed else 0


def cmd_serve(args) -> int:
    from parspec.config import EngineConfig
    from parspec.server.app import build_server_app, run_server

    if args.max_queue_len < 0:
        raise ConfigError(f"--max-queue-len must be >= 0, got {args.max_queue_len}")
    if args.max_request_body < 1:
        raise ConfigError(f"--max-request-body must be >= 1 byte, got {args.max_request_body}")
    # vLLM's --seed is the engine's seed (0 unless given), not a per-request one.
    seed = 0 if args.seed is None else args.seed
    if args.pipeline_parallel_size != 1:
        raise ConfigError(f"parspec serve runs the target on one device; --pipeline-parallel-size="
                          f"{args.pipeline_parallel_size} is available in generate and the LLM API")
    cfg = EngineConfig(model=args.model, seed=seed, **engine_kwargs(args))
    app = build_server_app(cfg, args.speculative_config, args.served_model_name, args.max_queue_len,
                           args.max_request_body)
    llm = app.state.engine.engine
    spec = (f"{llm.spec_config.method}, K={llm.spec_config.num_speculative_tokens}" if llm.spec_config
            else "off")
    name = (args.served_model_name or [args.model])[0]
    print(f"parspec serve: {args.model} as {name!r} "
          f"on {llm.device} ({llm.dtype}), max_model_len {llm.max_model_len}, speculation {spec}; "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    run_server(app, args.host, args.port, args.uvicorn_log_level)
    return 0


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from parspec.server import DEFAULT_MAX_REQUEST_BODY

    add_engine_args(p, seed_help="the engine's seed (vLLM's --seed; 0 when not given); "
                                 "a request's own \"seed\" makes it reproducible")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) the API answers to (default: --model); responses carry the first")
    p.add_argument("--max-queue-len", type=int, default=1024,
                   help="completions that may wait beyond --max-num-seqs; past it the server answers 503")
    p.add_argument("--max-request-body", type=int, default=DEFAULT_MAX_REQUEST_BODY,
                   help="largest request body in bytes; larger ones get 413")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=("critical", "error", "warning", "info", "debug", "trace"))
    p.set_defaults(func=cmd_serve)


def cmd_train_drafter(args) -> int:
    from parspec.train.cli import run

    return run(args)


def cmd_export_head(args) -> int:
    from parspec.models.head_formats import export_head

    export_head(args.head, args.out, args.format, verifier=args.verifier,
                num_speculative_tokens=args.num_speculative_tokens)
    print(f"-- wrote {args.out} ({args.format} layout) from {args.head}")
    return 0


def add_bench_args(b: argparse.ArgumentParser) -> None:
    from parspec.bench.harness import DEFAULT_METHODS, DEFAULT_PROMPTS, METHODS, PEERS, REFERENCE_PAIR, REPO

    b.add_argument("--pair", default=REFERENCE_PAIR, help="directory holding target/, draft/, eagle3/, p-eagle/")
    b.add_argument("--expand", choices=("8b", "tiny"), default=None,
                   help="benchmark the pair expanded to this shape (written to --expand-dir, reused if there)")
    b.add_argument("--expand-dir", default=None)
    b.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS,
                   help="no-spec always runs first: it is the baseline")
    b.add_argument("--ks", type=int, nargs="+", default=list(range(1, 9)), help="num_speculative_tokens values")
    b.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64],
                   help="max_num_seqs values; each feeds max(--num-prompts, concurrency) prompts")
    b.add_argument("--prompts", default=DEFAULT_PROMPTS, help='JSONL file of {"prompt": ...} objects')
    b.add_argument("--num-prompts", type=int, default=16)
    b.add_argument("--max-tokens", type=int, default=256)
    b.add_argument("--repeats", type=int, default=3, help="timed runs per cell after the warm-up (median reported)")
    b.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    b.add_argument("--max-model-len", type=int, default=None, help="default: longest prompt + max tokens")
    add_enforce_eager_arg(b)
    b.add_argument("--peers", default="", help=f"comma-separated: {','.join(PEERS)} (batch 1, --peer-prompts)")
    b.add_argument("--peer-prompts", type=int, default=4)
    b.add_argument("--peer-k", type=int, default=5, help="drafts per step of the speculative peers")
    b.add_argument("--gpt-fast", default=os.path.join(REPO, ".peers", "gpt-fast"),
                   help="a gpt-fast source checkout (model.py, generate.py)")
    b.add_argument("--gpt-fast-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile gpt-fast's decode step as its main() does")
    b.add_argument("--out", default=None, help="JSON record; PNG plots are written beside it")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parspec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from prompts")
    add_engine_args(g)
    add_sampling_args(g)
    g.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    g.add_argument("--prompts-file", help='JSONL file of {"prompt": ...} objects')
    g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="one JSON object per output line")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="speculative generation on the bundled reference pair (CPU)")
    d.add_argument("--max-tokens", type=int, default=96)
    d.add_argument("--num-prompts", type=int, default=3)
    d.add_argument("--device", default="cpu")
    d.set_defaults(func=cmd_demo)

    add_serve_args(sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, /metrics)"))

    add_bench_args(sub.add_parser("bench", help="benchmark matrix: methods x K x concurrency, peers, roofline"))

    from parspec.train.cli import add_arguments as add_train_drafter_args

    t = sub.add_parser("train-drafter", help="train an EAGLE-3 / P-EAGLE head on the target's own outputs")
    add_train_drafter_args(t)
    t.set_defaults(func=cmd_train_drafter)

    x = sub.add_parser("export-head", help="re-write an EAGLE-3 / P-EAGLE head for vLLM, speculators or SafeAILab")
    x.add_argument("--head", required=True, help="head directory in any layout parspec reads")
    x.add_argument("--out", required=True, help="directory to write config.json + model.safetensors to")
    x.add_argument("--format", choices=("vllm", "speculators", "eagle"), default="vllm",
                   help="vllm: LlamaForCausalLMEagle3 (layers.N.*); speculators: the speculators library's; "
                        "eagle: SafeAILab's EAGLE-3 (midlayer.*)")
    x.add_argument("--verifier", default=None, help="speculators only: the target's name or path to record")
    x.add_argument("--num-speculative-tokens", type=int, default=3, help="speculators only: the proposal's K")
    x.set_defaults(func=cmd_export_head)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, LoadError, SamplingError, ValueError) as e:
        print(f"parspec: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
