"""Served throughput and latency of `parspec serve` against concurrency.

For each server configuration (no speculation, and each --spec given) it starts `parspec serve`,
warms it up, then for each concurrency sends streamed greedy completions with at most that many
in flight and records, per request, the time to first token (TTFT), the time per output token
after it (TPOT) and the end-to-end latency; per cell, output tokens/s over the wall time and
the speculation counters read from /metrics (mean acceptance length) and the server's count of
compiled Triton kernel variants before and after the cell (a rise is a request that waited for a
compile the warm-up missed). Writes a JSON record and a PNG (tokens/s, TTFT p50 and TPOT p50
against concurrency) beside it.

    python benchmarks/serve_bench.py --model /tmp/parspec-8b/target --dtype bfloat16 --device cuda \\
        --spec 'p-eagle-k7={"method":"eagle3","model":"/tmp/parspec-8b/p-eagle","num_speculative_tokens":7,
                "parallel_drafting":true}' --prompts humaneval.jsonl --concurrency 1 8 64 \\
        --out benchmarks/results/serve_8b_h200.json

`--url URL` benchmarks a server that is already running instead (one configuration)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "bench"


def _prompts(path: str | None, n: int) -> list[str]:
    if path is None:
        path = os.path.join(REPO, "fixtures", "demo_prompts.jsonl")
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line)["prompt"] for line in f if line.strip()]
    return [rows[i % len(rows)] for i in range(n)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, spec: str | None, log_path: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "parspec.cli", "serve", "--model", args.model, "--served-model-name", NAME,
           "--port", str(port), "--dtype", args.dtype, "--device", args.device, "--uvicorn-log-level", "warning",
           "--max-num-seqs", str(max(args.concurrency))]
    if args.max_model_len:
        cmd += ["--max-model-len", str(args.max_model_len)]
    if spec:
        cmd += ["--speculative-config", spec]
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}; see {log_path}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise RuntimeError(f"the server did not come up; see {log_path}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def one_request(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> dict:
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = None
    usage = None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"error": chunk["error"]["message"]}
            if chunk.get("choices") and first is None and chunk["choices"][0]["text"]:
                first = time.perf_counter()
            if chunk.get("usage"):
                usage = chunk["usage"]
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else 0
    first = first or end
    return {"ttft": first - start, "e2e": end - start, "output_tokens": n,
            "tpot": (end - first) / (n - 1) if n > 1 else None}


async def run_cell(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        async def bounded(p):
            async with gate:
                return await one_request(client, p, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    out_tokens = sum(r["output_tokens"] for r in ok)
    return {"concurrency": concurrency, "requests": len(prompts), "failed": len(results) - len(ok),
            "errors": sorted({r["error"] for r in results if "error" in r})[:3], "wall_s": wall,
            "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / wall if wall else 0.0,
            "requests_per_s": len(ok) / wall if wall else 0.0,
            "ttft_s": _percentiles([r["ttft"] for r in ok]),
            "tpot_s": _percentiles([r["tpot"] for r in ok if r["tpot"] is not None]),
            "e2e_s": _percentiles([r["e2e"] for r in ok])}


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    v = sorted(values)

    def q(p):
        return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]

    return {"p50": q(50), "p90": q(90), "p99": q(99), "mean": sum(v) / len(v)}


def server_counters(url: str) -> dict:
    """The speculation counters and the compiled-kernel gauge, read from /metrics."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("parspec:triton_kernel_variants{"):
            out["kernel variants"] = int(float(line.rsplit(" ", 1)[1]))
        for name in ("vllm:spec_decode_num_drafts_total", "vllm:spec_decode_num_accepted_tokens_total",
                     "vllm:spec_decode_num_draft_tokens_total"):
            if line.startswith(name + "{"):
                out[name] = float(line.rsplit(" ", 1)[1])
        if line.startswith("parspec:spec_decode_depth_steps_total{"):
            depth = line.split('depth="', 1)[1].split('"', 1)[0]
            out[f"depth {depth}"] = float(line.rsplit(" ", 1)[1])
    return out


def depth_steps(before: dict, after: dict) -> dict:
    """Steps per verified depth in a cell (what an adaptive depth chose)."""
    return {k.split()[1]: int(v - before.get(k, 0)) for k, v in after.items()
            if k.startswith("depth ") and v - before.get(k, 0) > 0}


def acceptance_length(before: dict, after: dict) -> float | None:
    drafts = after.get("vllm:spec_decode_num_drafts_total", 0) - before.get("vllm:spec_decode_num_drafts_total", 0)
    accepted = (after.get("vllm:spec_decode_num_accepted_tokens_total", 0)
                - before.get("vllm:spec_decode_num_accepted_tokens_total", 0))
    return 1 + accepted / drafts if drafts else None


def bench_config(url: str, args) -> list[dict]:
    warm = _prompts(args.prompts, max(args.concurrency))  # every batch size the cells reach
    at_start = server_counters(url).get("kernel variants")  # what the server's own warm-up compiled
    asyncio.run(run_cell(url, warm, len(warm), min(16, args.max_tokens)))
    cells = []
    for c in args.concurrency:
        prompts = _prompts(args.prompts, max(args.num_prompts, 2 * c))
        before = server_counters(url)
        cell = asyncio.run(run_cell(url, prompts, c, args.max_tokens))
        after = server_counters(url)
        cell["acceptance_length"] = acceptance_length(before, after)
        cell["depth_steps"] = depth_steps(before, after)
        # None against a server without the gauge (--url to an older parspec)
        cell["triton_kernel_variants"] = {"after_server_warm_up": at_start, "before": before.get("kernel variants"),
                                          "after": after.get("kernel variants")}
        cells.append(cell)
        ttft, tpot = cell["ttft_s"].get("p50", 0) * 1e3, cell["tpot_s"].get("p50", 0) * 1e3
        compiled = (after.get("kernel variants") or 0) - (before.get("kernel variants") or 0)
        print(f"  c={c:<4} {cell['output_tokens_per_s']:9.1f} tok/s  TTFT p50 {ttft:8.1f} ms"
              f"  TPOT p50 {tpot:7.2f} ms  acceptance "
              f"{cell['acceptance_length'] or '-'}  failed {cell['failed']}  depths {cell['depth_steps']}"
              f"  kernels compiled {compiled}", flush=True)
    return cells


def plot(record: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, cells in record["configs"].items():
        cs = [c["concurrency"] for c in cells]
        axes[0].plot(cs, [c["output_tokens_per_s"] for c in cells], marker="o", label=name)
        axes[1].plot(cs, [c["ttft_s"].get("p50", 0) * 1e3 for c in cells], marker="o", label=name)
        axes[2].plot(cs, [c["tpot_s"].get("p50", 0) * 1e3 for c in cells], marker="o", label=name)
    for ax, title in zip(axes, ("output tokens/s", "TTFT p50 (ms)", "TPOT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"parspec serve: {record['model']} ({record['dtype']}, {record['device_name']}, "
                 f"commit {record['commit'][:10]})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _commit() -> str:
    if os.environ.get("PARSPEC_COMMIT"):  # a snapshot without .git (the device runs one)
        return os.environ["PARSPEC_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    except OSError:
        return "unknown"


def _device_name(device: str) -> str:
    try:
        import torch

        if device != "cpu" and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return platform.processor() or "cpu"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="target directory (the script starts `parspec serve` on it)")
    p.add_argument("--url", help="benchmark this running server instead (served model name must be 'bench')")
    p.add_argument("--spec", action="append", default=[], help="NAME=JSON speculative config (repeatable)")
    p.add_argument("--no-baseline", action="store_true", help="skip the server without speculation")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--prompts", default=None, help='JSONL of {"prompt": ...} (default: fixtures/demo_prompts)')
    p.add_argument("--num-prompts", type=int, default=64, help="requests per cell (at least 2 x concurrency)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens per request (eos ignored)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--out", required=True, help="JSON record; the PNG is written beside it")
    args = p.parse_args(argv)
    if not args.model and not args.url:
        p.error("give --model (start servers) or --url (a running server)")
    record = {"model": args.model or args.url, "dtype": args.dtype, "device": args.device,
              "device_name": _device_name(args.device), "commit": _commit(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "parameters": {k: v for k, v in vars(args).items() if k != "out"}, "configs": {}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.url:
        record["configs"]["server"] = bench_config(args.url, args)
    else:
        configs = ([] if args.no_baseline else [("no-spec", None)]) + [tuple(s.split("=", 1)) for s in args.spec]
        for name, spec in configs:
            print(f"{name}: starting parspec serve", flush=True)
            proc, url = start_server(args, spec, os.path.splitext(args.out)[0] + f"_{name}.log")
            try:
                record["configs"][name] = bench_config(url, args)
            finally:
                stop_server(proc)
            _save(record, args.out)  # each configuration as it ends: a long run may be cut short
    png = _save(record, args.out)
    print(f"wrote {args.out} and {png}")
    return 0


def _save(record: dict, path: str) -> str:
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    png = os.path.splitext(path)[0] + ".png"
    plot(record, png)
    return png


if __name__ == "__main__":
    sys.exit(main())
