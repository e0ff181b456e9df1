"""`parspec demo`: the same prompts with and without speculation on CPU; checks the
greedy texts are identical and shows acceptance length, drafter passes and speed-up."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures" / "reference"
PROMPTS = REPO / "fixtures" / "demo_prompts.jsonl"


def _tiny_random_model(path: str) -> None:
    """Fallback while the trained pair is absent: a random tiny Llama (says so loudly)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 50, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))


def _prompts(n: int) -> list[str]:
    with open(PROMPTS, encoding="utf-8") as f:
        return [json.loads(line)["prompt"] for line in f if line.strip()][:n]


def _speculative_configs() -> list[tuple[str, dict]]:
    configs = [("n-gram (prompt lookup)", {"method": "ngram", "num_speculative_tokens": 4})]
    if (FIXTURES / "draft").is_dir():
        configs.append(("draft LM", {"method": "draft_model", "model": str(FIXTURES / "draft"),
                                     "num_speculative_tokens": 4}))
    if (FIXTURES / "eagle3").is_dir():
        configs.append(("EAGLE-3, sequential", {"method": "eagle3", "model": str(FIXTURES / "eagle3"),
                                                "num_speculative_tokens": 5}))
    if (FIXTURES / "p-eagle").is_dir():
        configs.append(("P-EAGLE, parallel", {"method": "eagle3", "model": str(FIXTURES / "p-eagle"),
                                              "num_speculative_tokens": 7, "parallel_drafting": True}))
    return configs


def run_demo(args) -> int:
    from parspec import LLM, SamplingParams

    target = FIXTURES / "target"
    if target.is_dir():
        model = str(target)
        print(f"target: the bundled reference model, {target.relative_to(REPO)}")
    else:
        model = tempfile.mkdtemp(prefix="parspec-demo-")
        print("NOTE: the reference pair is not in fixtures/ yet; generating from a tiny RANDOM model "
              f"created now in {model}. Its text is noise and its acceptance rates mean nothing.")
        _tiny_random_model(model)
    prompts = _prompts(args.num_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    common = dict(dtype="float32", device=args.device, max_model_len=1024)

    def timed(llm):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return outs, time.perf_counter() - start

    base_llm = LLM(model, **common)
    timed(base_llm)  # warm-up
    base, base_time = timed(base_llm)
    base_tokens = sum(len(o.outputs[0].token_ids) for o in base)
    print(f"\nno speculation: {base_tokens} tokens in {base_time:.2f}s ({base_tokens / base_time:.1f} tok/s)")
    print(f"--- first completion ---\n{prompts[0]}{base[0].outputs[0].text}\n---")
    all_identical = True
    for name, spec in _speculative_configs():
        llm = LLM(model, speculative_config=spec, **common)
        timed(llm)
        llm.engine.reset_stats()
        outs, elapsed = timed(llm)
        identical = [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in base]
        all_identical &= identical
        stats = llm.engine.stats
        passes = llm.engine.drafter_passes_per_step
        print(f"{name:24s} K={spec['num_speculative_tokens']}: greedy text identical: {'yes' if identical else 'NO'}; "
              f"acceptance length {stats.acceptance_length:.2f} tokens/step; "
              f"drafter passes/step {passes:.1f}; {elapsed:.2f}s, speed-up {base_time / elapsed:.2f}x")
    return 0 if all_identical else 1
