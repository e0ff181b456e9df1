"""`parspec train-drafter`: data from the target's own outputs, then EAGLE-3 / P-EAGLE training.

Defaults suit the reference target (hidden 512, 5 layers, vocabulary 6144) on one H100:
a head of about 7.8 MiB in bf16 (1 layer, intermediate 768, draft vocabulary 2048)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from parspec.config import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="the target model directory (HF layout)")
    p.add_argument("--out", required=True, help="where the head (config.json + model.safetensors), "
                   "metrics.json, loss.png and README.md go")
    p.add_argument("--method", choices=("eagle3", "p-eagle", "spd"), default="p-eagle",
                   help="spd: the speculation module of speculative pipeline decoding (--num-stages)")
    p.add_argument("--num-stages", type=int, default=2, help="spd: pipeline stages n the module is trained for")
    p.add_argument("--module-hidden-size", type=int, default=256, help="spd: the module's width")
    p.add_argument("--mixer", choices=("attention", "mlp"), default="mlp",
                   help="spd: how the module mixes its window's slots (the fixtures' study favoured mlp)")
    p.add_argument("--context", type=int, default=0, help="spd: verified tokens before x_j in the module's window "
                   "(their final features); a module of fewer may warm-start it (--init-from)")
    p.add_argument("--max-windows", type=int, default=0, help="spd: windows scored per step, sampled (0: all)")
    p.add_argument("--lookahead", type=int, default=1, help="spd: 2 trains the module to predict the token after "
                   "next (the experiment on drafting two in-flight positions in one pass)")
    p.add_argument("--num-speculative-tokens", "-k", type=int, default=7,
                   help="K: draft depths (P-EAGLE) or training-time-test steps (EAGLE-3) trained")
    p.add_argument("--draft-vocab-size", type=int, default=2048)
    p.add_argument("--draft-vocab-from", choices=("sequences", "responses"), default="sequences",
                   help="pick the draft vocabulary as the most frequent tokens of whole training sequences, or "
                        "of the target's responses alone (what decoding asks the drafter for)")
    p.add_argument("--rebuild-vocab", action="store_true",
                   help="with --init-from: pick a new draft vocabulary (and size) from this data instead of keeping "
                        "the head's; kept tokens keep their output rows, new ones start from the target's")
    p.add_argument("--intermediate-size", type=int, default=None, help="default 1.5 x the target's hidden size")
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--num-heads", type=int, default=None, help="attention heads of the head's layers "
                   "(default: the target's)")
    p.add_argument("--num-kv-heads", type=int, default=None, help="KV heads (default: the target's)")
    p.add_argument("--head-dim", type=int, default=None, help="default: the target's")
    p.add_argument("--init-from", default=None, help="warm start from a saved head of the same shape "
                   "(p-eagle: also an EAGLE-3 head; only the mask slot starts fresh)")
    p.add_argument("--aux-layers", default=None, help="target layers whose inputs feed the head, e.g. 1,2,4")
    p.add_argument("--mask-token-id", type=int, default=None,
                   help="P-EAGLE's mask token (default: a spare special token such as <|pad|>)")
    p.add_argument("--max-bytes", type=int, default=8 << 20, help="budget for the saved head (default 8 MiB)")
    g = p.add_argument_group("data")
    g.add_argument("--corpus", default="site-packages",
                   help="directory of .py files, a JSONL of {\"prompt\"}, or 'site-packages' (this Python's)")
    g.add_argument("--data", default=None, help="safetensors cache of the generated sequences: read if it "
                   "exists, else written (share it between runs)")
    g.add_argument("--data-only", action="store_true", help="generate --data and stop")
    g.add_argument("--num-prompts", type=int, default=6000)
    g.add_argument("--min-prompt-tokens", type=int, default=64)
    g.add_argument("--max-prompt-tokens", type=int, default=256)
    g.add_argument("--max-new-tokens", type=int, default=192)
    g.add_argument("--function-prompts", type=float, default=0.0,
                   help="share of the .py files that give a documented function's header (imports, def, docstring) "
                        "as the prompt instead of a window, so the target writes function bodies (default 0)")
    g.add_argument("--greedy-fraction", type=float, default=0.5)
    g.add_argument("--min-temperature", type=float, default=0.7)
    g.add_argument("--max-temperature", type=float, default=1.0)
    g.add_argument("--gen-max-num-seqs", type=int, default=256, help="engine batch while generating")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup-steps", type=int, default=None)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--depth-decay", type=float, default=0.8)
    t.add_argument("--deep-keep", type=float, default=0.7)
    t.add_argument("--deep-min-keep", type=float, default=0.2)
    t.add_argument("--deep-greedy-only", action="store_true",
                   help="p-eagle: train depths >= 1 only at anchors whose skipped tokens the target generated "
                        "greedily (not on prompt text or sampled responses)")
    t.add_argument("--chain-weight", type=float, default=0.0,
                   help="p-eagle: weight depth d's loss by 1 - w + w * the drafter's probability of being right "
                        "at every shallower depth (what greedy acceptance counts); 0 = off")
    t.add_argument("--refine-share", type=float, default=0.0,
                   help="p-eagle: share of anchors whose depths >= 1 take the real token instead of the mask "
                        "(teacher forcing), training the slots for draft_refine_passes; 0 = off")
    t.add_argument("--segment-len", type=int, default=256, help="anchors per segment (0: whole sequences)")
    t.add_argument("--heldout", type=int, default=128)
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--checkpoint-every", type=int, default=1000)
    t.add_argument("--max-train-seconds", type=float, default=None,
                   help="time budget for the training loop; the LR schedule completes within it")
    t.add_argument("--save-dtype", default="bfloat16")
    t.add_argument("--device", default="auto")
    t.add_argument("--dtype", default="auto", help="the target's dtype (auto: bf16 on CUDA, fp32 on CPU)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if it exists")
    t.add_argument("--overwrite", action="store_true", help="replace the head or checkpoint an earlier run "
                   "left in OUT (without --resume or --overwrite such a run is refused)")
    t.add_argument("--keep-checkpoint", action="store_true")


# Options of --method spd alone, at their defaults: other methods refuse them, and their cards leave them out.
SPD_ONLY = {"num_stages": 2, "module_hidden_size": 256, "mixer": "mlp", "context": 0, "max_windows": 0,
            "lookahead": 1}


def command_line(args) -> str:
    parts = ["parspec", "train-drafter"]
    for key, value in sorted(vars(args).items()):
        if key in ("func", "command") or value is None or value is False:
            continue
        if key in SPD_ONLY and getattr(args, "method", "spd") != "spd":
            continue
        flag = "--" + key.replace("_", "-")
        parts += [flag] if value is True else [flag, str(value)]
    return shlex.join(parts)


def run(args) -> int:
    from parspec.config import ModelConfig
    from parspec.loader import check_model_dir
    from parspec.train.trainer import (MiB, TrainConfig, TrainingInterrupted, check_head_size, check_out_dir,
                                       drafter_config, refine_summary, train_drafter)

    if args.data_only and not args.data:
        raise ConfigError("--data-only needs --data PATH")
    check_model_dir(args.target)
    target_cfg = ModelConfig.from_pretrained(args.target)
    if args.method == "spd":
        from parspec.train.spd import spd_config

        tc = spd_config(args, target_cfg)  # checks the module's size before any data is generated
        if not args.data_only:
            check_out_dir(args.out, False, args.overwrite)
        return _train_spd(args, tc, _prepare_data(args, target_cfg))
    given = [k for k, default in SPD_ONLY.items() if getattr(args, k, default) != default]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(f"--method {args.method} does not take {flags} (options of --method spd)")
    aux = tuple(int(x) for x in args.aux_layers.split(",")) if args.aux_layers else None
    tc = TrainConfig(
        method=args.method, num_speculative_tokens=args.num_speculative_tokens,
        draft_vocab_size=args.draft_vocab_size, intermediate_size=args.intermediate_size,
        num_layers=args.num_layers, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
        head_dim=args.head_dim, init_from=args.init_from, vocab_from=args.draft_vocab_from,
        rebuild_vocab=args.rebuild_vocab, aux_layers=aux, mask_token_id=args.mask_token_id, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, depth_decay=args.depth_decay, deep_keep=args.deep_keep,
        deep_min_keep=args.deep_min_keep, deep_greedy_only=args.deep_greedy_only, chain_weight=args.chain_weight,
        refine_share=args.refine_share, segment_len=args.segment_len, heldout=args.heldout,
        eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device,
        target_dtype=args.dtype, save_dtype=args.save_dtype, max_bytes=args.max_bytes,
        max_train_seconds=args.max_train_seconds, keep_checkpoint=args.keep_checkpoint)
    size = check_head_size(drafter_config(target_cfg, tc, args.mask_token_id), tc)
    print(f"head size: {size / MiB:.2f} MiB in {tc.save_dtype} (budget {tc.max_bytes / MiB:.2f} MiB)")
    if not args.data_only:  # before hours of generation and training, not when saving
        check_out_dir(args.out, args.resume, args.overwrite)
    data = _prepare_data(args, target_cfg)
    if args.data_only:
        return 0
    try:
        metrics = train_drafter(args.target, args.out, data, tc, resume=args.resume, command=command_line(args),
                                overwrite=args.overwrite)
    except TrainingInterrupted as e:
        again = command_line(argparse.Namespace(**{**vars(args), "resume": True, "overwrite": False}))
        print(f"\ninterrupted at step {e.step} of {tc.steps}: checkpoint saved in {e.checkpoint_dir}\n"
              f"resume with: {again}", file=sys.stderr)
        return 130
    ev = metrics["final_eval"]
    tau = ev["acceptance_length"]
    print(f"saved {args.out}: held-out top-1 per depth " + " ".join(f"{a:.3f}" for a in ev["acc"])
          + (f"; estimated acceptance length {tau:.2f}" if tau else "") + refine_summary(ev))
    return 0


def _train_spd(args, tc, data) -> int:
    from parspec.train.spd import train_spd

    if args.data_only:
        return 0
    metrics = train_spd(args.target, args.out, data, tc, command=command_line(args))
    ev = metrics["final_eval"]
    print(f"saved {args.out}: held-out top-1 by window size d=1..{tc.num_stages} (responses) "
          + " ".join(f"{a:.3f}" for a in ev["response_acc"]))
    return 0


def _prepare_data(args, target_cfg):
    """The training sequences: read from --data, or generated by the target (and saved there)."""
    from parspec.train.data import DrafterData, GenerationConfig, build_data, check_corpus

    if args.data and os.path.isfile(args.data):
        data = DrafterData.load(args.data)
        top = max(int(s.max()) for s in data.sequences)
        if top >= target_cfg.vocab_size:
            raise ConfigError(f"{args.data} holds token id {top}, outside the target's vocabulary "
                              f"({target_cfg.vocab_size}): made for another tokenizer")
        print(f"data: {len(data)} sequences, {data.num_tokens} tokens from {args.data}")
    else:
        check_corpus(args.corpus)
        if args.num_prompts < 5:
            raise ConfigError(f"num_prompts must be >= 5 (a held-out split is taken), got {args.num_prompts}")
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens, greedy_fraction=args.greedy_fraction,
                               min_temperature=args.min_temperature, max_temperature=args.max_temperature,
                               max_num_seqs=args.gen_max_num_seqs, dtype=args.dtype, device=args.device,
                               seed=args.seed)
        data = build_data(args.target, args.corpus, args.num_prompts, args.min_prompt_tokens,
                          args.max_prompt_tokens, gen, target_cfg.max_position_embeddings, args.function_prompts)
        print(f"data: {len(data)} sequences, {data.num_tokens} tokens "
              f"({data.meta['response_tokens']} generated by the target)")
        if args.data:
            data.save(args.data)
            print(f"data saved to {args.data}")
    return data
