"""What a benchmark run leaves behind: the JSON record (which code, which device, every
parameter), PNG plots beside it, the summary table, and the roofline maths.

Roofline of one decode step. A step is memory-bound: it streams every weight once and the
KV cache of every sequence in the batch, so

    bytes_per_step = weight_bytes + kv_bytes_per_token * mean_context * concurrency
    roofline tokens/s (no speculation) = concurrency * bandwidth / bytes_per_step
    roofline tokens/s (speculation)    = acceptance_length * the above

The speculative figure counts the target's bytes only (not the drafter's, nor the K extra
query positions), as the P-EAGLE and EAGLE papers do: it is the ceiling speculation could
reach if drafting were free. ``weight_bytes`` is ``streamed_weight_bytes`` below."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import traceback

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# --- provenance --------------------------------------------------------------------------
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


def device_name(device: str | torch.device) -> str:
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def library_versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def error_text(e: BaseException) -> str:
    """One line for the record: the exception and the last frames it passed through."""
    tail = traceback.extract_tb(e.__traceback__)[-3:]
    where = "; ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in tail)
    return f"{type(e).__name__}: {e} (at {where})"


# --- roofline ----------------------------------------------------------------------------
def streamed_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once, except an embedding
    table that is only gathered (a few rows per step, ~nothing). A tied table IS read in full,
    as the lm_head, so it counts, once. Buffers (rotary tables) are gathered too: not counted."""
    used_densely: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not isinstance(module, nn.Embedding):
                used_densely[id(p)] = p
    return sum(p.numel() * p.element_size() for p in used_densely.values())


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """K and V of one token in every layer."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def bytes_per_step(weight_bytes: float, kv_per_token: float, mean_context: float, concurrency: int) -> float:
    return weight_bytes + kv_per_token * mean_context * concurrency


def roofline_tokens_per_s(weight_bytes: float, kv_per_token: float, mean_context: float, concurrency: int,
                          bandwidth: float, acceptance_length: float = 1.0) -> float:
    """Output tokens/s if every step ran at ``bandwidth`` bytes/s (module docstring)."""
    if bandwidth <= 0 or acceptance_length < 1:
        raise ValueError(f"bandwidth must be > 0 and acceptance_length >= 1, got {bandwidth}, {acceptance_length}")
    step = bytes_per_step(weight_bytes, kv_per_token, mean_context, concurrency)
    return acceptance_length * concurrency * bandwidth / step


def percent_of(measured: float | None, ceiling: float | None) -> float | None:
    if measured is None or not ceiling:
        return None
    return 100.0 * measured / ceiling


# --- the record --------------------------------------------------------------------------
def _finite(x):
    # JSON has no NaN/inf; a figure that cannot be computed is null.
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def save_record(record: dict, out: str) -> None:
    """Writes the JSON atomically, so a run killed mid-write leaves the previous version."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(_finite(record), f, indent=2)
    os.replace(tmp, out)


def save_result(record: dict, out: str, plot_fn) -> None:
    """The JSON record, and its plot as a PNG beside it (the single-plot scripts' layout)."""
    save_record(record, out)
    plot_fn(record, os.path.splitext(out)[0] + ".png")


# --- plots -------------------------------------------------------------------------------
def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _ok_cells(record: dict) -> list[dict]:
    return [c for c in record["cells"] if not c.get("error") and c.get("tokens_per_s")]


def _spec_methods(cells: list[dict]) -> list[str]:
    return list(dict.fromkeys(c["method"] for c in cells if c["k"] is not None))


def _title(record: dict, what: str) -> str:
    p = record["parameters"]
    return (f"{what}\n{record['model_label']}, {p.get('resolved_dtype') or p['dtype']}, {record['device']}, "
            f"{p['max_tokens']} tokens, commit {record['commit'][:8]}")


def plot_throughput(record: dict, path: str) -> None:
    """Tokens/s against concurrency: no-spec, each method at its best K there, batch-1 peers."""
    plt = _pyplot()
    cells = _ok_cells(record)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    base = sorted((c["concurrency"], c["tokens_per_s"]) for c in cells if c["k"] is None)
    if base:
        ax.plot(*zip(*base), marker="o", color="black", label="no-spec")
    for method in _spec_methods(cells):
        best = {}
        for c in cells:
            if c["method"] == method and c["tokens_per_s"] > best.get(c["concurrency"], {}).get("tokens_per_s", 0):
                best[c["concurrency"]] = c
        xs = sorted(best)
        ax.plot(xs, [best[x]["tokens_per_s"] for x in xs], marker="o", label=f"{method} (best K)")
        for x in xs:
            ax.annotate(f"K={best[x]['k']}", (x, best[x]["tokens_per_s"]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3))
    peer_colors = iter(["tab:gray", "tab:brown", "tab:olive", "tab:cyan", "tab:pink", "tab:purple"])
    for name, peer in record.get("peers", {}).items():
        if peer.get("tokens_per_s"):
            ax.scatter([1], [peer["tokens_per_s"]], marker="x", s=50, color=next(peer_colors, "gray"),
                       label=f"{name} (batch 1)")
    ax.set_xscale("log", base=2)
    ticks = sorted({c["concurrency"] for c in cells} | {1})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("concurrency (max_num_seqs = prompts in flight)")
    ax.set_ylabel("output tokens/s (median run)")
    ax.set_title(_title(record, "Throughput against concurrency"), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _per_concurrency_vs_k(record: dict, path: str, field: str, ylabel: str, what: str,
                          baseline_field: str | None) -> None:
    plt = _pyplot()
    cells = _ok_cells(record)
    conc = sorted({c["concurrency"] for c in cells}) or [1]
    fig, axes = plt.subplots(1, len(conc), figsize=(5 * len(conc), 4), squeeze=False)
    for ax, n in zip(axes[0], conc):
        for method in _spec_methods(cells):
            pts = sorted((c["k"], c[field]) for c in cells
                         if c["method"] == method and c["concurrency"] == n and c.get(field) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        base = [c for c in cells if c["k"] is None and c["concurrency"] == n]
        if baseline_field and base and base[0].get(baseline_field) is not None:
            ax.axhline(base[0][baseline_field], color="black", lw=1, ls="--", label="no-spec")
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {field} in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("K (num_speculative_tokens)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylabel(ylabel)
        ax.set_title(f"concurrency {n}", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(_title(record, what), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_all(record: dict, out: str) -> list[str]:
    """The PNGs beside ``out`` (its stem + suffix); returns their paths."""
    stem = os.path.splitext(out)[0]
    paths = {"throughput": stem + "_throughput.png", "speedup": stem + "_speedup.png",
             "roofline": stem + "_roofline.png", "acceptance": stem + "_acceptance.png"}
    plot_throughput(record, paths["throughput"])
    _per_concurrency_vs_k(record, paths["speedup"], "speedup_vs_no_spec", "speed-up over no-spec (x)",
                          "Speed-up over no speculation against K", "speedup_vs_no_spec")
    _per_concurrency_vs_k(record, paths["roofline"], "percent_of_roofline", "% of bandwidth roofline",
                          "Measured tokens/s as % of the roofline (acceptance x bandwidth / bytes per step)",
                          "percent_of_roofline")
    _per_concurrency_vs_k(record, paths["acceptance"], "acceptance_length", "acceptance length (tokens/step)",
                          "Acceptance length against K", None)
    return list(paths.values())


# --- the table ---------------------------------------------------------------------------
def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def summary_table(record: dict) -> str:
    """One row per cell and peer; errors are listed in full below the table."""
    rows = [("method", "K", "conc", "tok/s", "x no-spec", "accept", "% roofline", "mismatch")]
    errors = []
    entries = [(c["method"], c["k"], c["concurrency"], c) for c in record["cells"]]
    entries += [(name, p.get("k"), 1, p) for name, p in record.get("peers", {}).items()]
    for name, k, conc, e in entries:
        if e.get("error"):
            errors.append(f"{name} K={k} concurrency {conc}: {e['error']}")
            rows.append((name, _fmt(k, "d"), str(conc), "error", "", "", "", ""))
            continue
        rows.append((name, _fmt(k, "d"), str(conc), _fmt(e["tokens_per_s"], ".1f"),
                     _fmt(e.get("speedup_vs_no_spec"), ".2f"), _fmt(e.get("acceptance_length"), ".2f"),
                     _fmt(e.get("percent_of_roofline"), ".1f"), _fmt(e.get("mismatch_rate_vs_no_spec"), ".3f")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines + [f"error: {e}" for e in errors])
