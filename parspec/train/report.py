"""The trained head's loss curves (PNG) and its card (README.md), from metrics.json."""

from __future__ import annotations

import json
import sys


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_metrics(metrics: dict, path: str) -> bool:
    """An EAGLE-3 / P-EAGLE head's curves: weighted loss and KL per depth, held-out top-1 per depth."""
    return plot_curves(metrics, path, loss_label="weighted loss", series=lambda d: f"depth {d}",
                       title=f"{metrics.get('method', '')} training loss (moving average)", acc_key="acc",
                       acc_title="held-out top-1 accuracy (vs the target's argmax)")


def plot_curves(metrics: dict, path: str, *, loss_label: str, series, title: str, acc_key: str,
                acc_title: str) -> bool:
    """Training loss (smoothed, log scale) and its per-series KL on the left, held-out top-1
    per series on the right; ``series(i)`` names series i (a depth, a window size)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss plot", file=sys.stderr)
        return False
    train, evals = metrics["train"], metrics["eval"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["step"] for r in train]
        window = max(1, len(train) // 50)
        left.plot(steps, _smooth([r["loss"] for r in train], window), color="black", label=loss_label)
        for d in range(len(train[0]["kl"])):
            left.plot(steps, _smooth([r["kl"][d] for r in train], window), lw=0.8, label=f"KL, {series(d)}")
        left.set_yscale("log")
    left.set_xlabel("step")
    left.set_title(title)
    left.legend(fontsize=7)
    if evals:
        steps = [r["step"] for r in evals]
        for d in range(len(evals[0][acc_key])):
            right.plot(steps, [r[acc_key][d] for r in evals], marker="o", ms=3, label=series(d))
    right.set_xlabel("step")
    right.set_ylim(0, 1)
    right.set_title(acc_title)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render_card(m: dict) -> str:
    ev = m["final_eval"]
    cfg, drafter, data = m["config"], m["drafter"], m["data"]
    method = "P-EAGLE (parallel drafting)" if m["method"] == "p-eagle" else "EAGLE-3 (sequential drafting)"
    acc_rows = "\n".join(f"| {d} | {a:.3f} | {kl:.3f} | {n} |"
                         for d, (a, kl, n) in enumerate(zip(ev["acc"], ev["kl"], ev["count"])))
    tau = ev.get("acceptance_length")
    tau_text = (f"{tau:.2f} tokens per target step (K={cfg['num_speculative_tokens']}, greedy, over "
                f"{ev['anchors']} held-out response positions)" if tau else "n/a (no greedy held-out response)")
    spec = {"method": "eagle3", "model": "<this directory>", "num_speculative_tokens": cfg["num_speculative_tokens"]}
    if m["method"] == "p-eagle":
        spec["parallel_drafting"] = True
        mask_line = f"- mask token id {drafter.get('mask_token_id')} (P-EAGLE's mask slots; mask_hidden learned)"
        depths = (f"Depth d >= 1 keeps {cfg['deep_keep']}^d of the anchors (at least {cfg['deep_min_keep']}), "
                  "nested, seeded per step."
                  + (" Depths d >= 1 train only at anchors whose skipped tokens are the target's greedy output "
                     "(`--deep-greedy-only`)." if cfg.get("deep_greedy_only") else "")
                  + (f" Depth d's loss is scaled by {1 - cfg['chain_weight']:g} + {cfg['chain_weight']:g} x the head's "
                     "own probability (no gradient) of the target's token at every shallower depth of the anchor "
                     "(`--chain-weight`)." if cfg.get("chain_weight") else "")
                  + (f" A share {cfg['refine_share']:g} of the anchors feed their depths d >= 1 the real token "
                     "instead of the mask (`--refine-share`), for the engine's `draft_refine_passes`."
                     if cfg.get("refine_share") else ""))
    else:
        mask_line = ""
        depths = "Training-time test: step i feeds the step i-1 output back in, over the K steps."
    stopped = " (stopped at the time budget)" if m.get("stopped_early") else ""
    refine_text = "".join(f" After {mode.split()[1]} refinement pass(es): {r['acceptance_length']:.2f}."
                          if mode.startswith("refine")
                          else f" Teacher-forced (every slot fed the real token): {r['acceptance_length']:.2f}."
                          for mode, r in ev.get("refine", {}).items() if r["acceptance_length"])
    picked = f"the most frequent\n  in the training {'responses' if cfg.get('vocab_from') == 'responses' else 'sequences'}"
    if cfg.get("init_from"):
        vocab_from = (f"{picked}, rebuilt from the warm start `{cfg['init_from']}`" if cfg.get("rebuild_vocab")
                      else f"kept from the warm start, `{cfg['init_from']}`")
        kept = "its weights and mask token" if cfg.get("rebuild_vocab") else "its weights, draft vocabulary and mask token"
        warm = (f"\nWarm-started from `{cfg['init_from']}` ({kept}); the "
                "steps, time and figures here are this run's alone.\n")
    else:
        vocab_from, warm = picked, ""
    share = data.get("function_prompt_share") or 0
    functions = (f"; for a share of {share:g} of the files, a documented function's imports, `def` line and "
                 "docstring instead" if share else "")
    return f"""# {method} drafter head

Trained with `parspec train-drafter` on the target's own outputs.

```
{m.get('command') or '(called from Python)'}
```

Load it with parspec:

```python
from parspec import LLM
llm = LLM("<target>", speculative_config={json.dumps(spec)})
```

## Head

- layout: vLLM's `LlamaForCausalLMEagle3` (config.json + model.safetensors, {cfg['save_dtype']}),
  embedding shared with the target and not stored; {m['head_bytes'] / 2**20:.2f} MiB
- hidden {drafter['hidden_size']}, {drafter['num_hidden_layers']} layer(s), intermediate {drafter['intermediate_size']},
  {drafter['num_attention_heads']} heads / {drafter['num_key_value_heads']} KV heads of {drafter['head_dim']}
- draft vocabulary {drafter['draft_vocab_size']} of {drafter['vocab_size']} target tokens ({vocab_from};
  d2t / t2d in the checkpoint)
- target features: inputs of layers {drafter.get('eagle_config', {}).get('eagle_aux_hidden_state_layer_ids')}
{mask_line}

## Data

{data['sequences']} sequences ({data['tokens']} tokens): prompts are {data.get('num_prompts')} windows of
`{data.get('corpus')}` ({data.get('min_prompt_tokens')}-{data.get('max_prompt_tokens')} tokens{functions}), responses of up to
{data.get('max_new_tokens')} tokens generated by the target itself ({data.get('greedy_fraction')} greedy, the rest
sampled at temperature {data.get('temperature_range')}). {data['heldout_sequences']} sequences held out.

## Training
{warm}
{m['steps_done']} steps of {cfg['batch_size']} sequences, AdamW lr {cfg['lr']} (warm-up, cosine), grad clip
{cfg['grad_clip']}, depth weight {cfg['depth_decay']}^d, KL to the target's distribution over the draft
vocabulary, all positions (prompt included). {depths}
Sequence partition: {cfg['segment_len'] or 'whole sequences'} anchors per segment. Training time
{m.get('train_seconds', 0):.0f} s{stopped}.

## Held-out results

| depth | top-1 accuracy | KL (nats) | entries |
|---|---|---|---|
{acc_rows}

Estimated acceptance length: {tau_text}.{refine_text} The estimate counts, at each held-out position of
a greedy response, the leading depths whose top-1 equals the target's token; the engine's
measured value (`parspec bench`) is the one to quote.

![loss](loss.png)
"""


def write_card(metrics: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_card(metrics))
