"""Pretrain the small checkpoint in data/pretrained/ from the shipped corpus, reproducibly.

    python data/pretrain.py                     # the shipped one: GPT-style causal LM, "mini"
    python data/pretrain.py --arch bert --epochs 3   # BERT-style masked LM (accumlab.data.mlm)
    python data/pretrain.py --out /tmp/ckpt --epochs 1   # a quick try elsewhere

It trains with `accumlab.train` (exact accumulation, AdamW, linear warmup then cosine decay,
clipping) on `lm_examples(tok, "train", max_length=128)`, for the causal LM packed into blocks
of 128 tokens (no padding, so about twice the useful tokens per second). It prints the train and
validation loss curves and timings, and writes `config.json`, `model.safetensors` and the
tokenizer (with an added `[MASK]` token, id 4096, for the masked LM) with `save_pretrained`, so that
`AutoModelForSequenceClassification.from_pretrained(out, num_labels=4)` starts fine-tuning from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import accumlab  # noqa: E402
from accumlab.data.corpus import lm_examples  # noqa: E402
from accumlab.data.mlm import MASK_ID, MaskedLMDataset, add_mask_token  # noqa: E402
from accumlab.data.packing import pack_examples  # noqa: E402
from accumlab.data.tokenizer import load_tokenizer  # noqa: E402
from accumlab.engine.evaluation import evaluate  # noqa: E402
from accumlab.engine.models import count_parameters, make_model  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=("bert", "gpt2"), default="gpt2")
    p.add_argument("--size", default="mini")
    p.add_argument("--epochs", type=int, default=6, help="passes over the corpus")
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--accum-steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=40, help="linear warmup, optimizer steps")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr x this")
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="causal LM: one padded document chunk per row instead of packed blocks")
    p.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    p.add_argument("--out", default=str(HERE / "pretrained"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    tok = load_tokenizer()
    train_ex = lm_examples(tok, "train", max_length=args.max_length)
    packed = args.arch == "gpt2" and args.pack
    val_ex = lm_examples(tok, "validation", max_length=args.max_length)
    if args.arch == "bert":
        add_mask_token(tok)
        vocab = MASK_ID + 1
        # one trainer epoch over `epochs` copies of the corpus, each copy with its own masks
        train_data = MaskedLMDataset(train_ex, seed=args.seed, repeats=args.epochs)
        val_data = [MaskedLMDataset(val_ex, seed=10_000 + args.seed)[i]
                    for i in range(len(val_ex))]
        model = make_model("bert", args.size, task="masked_lm", seed=args.seed,
                           vocab_size=vocab, max_positions=args.max_length)
        epochs = 1
    else:
        train_data, val_data, epochs = train_ex, val_ex, args.epochs
        if packed:  # documents end with EOS; blocks of exactly max_length tokens
            train_data = pack_examples(train_ex, args.max_length, tok.eos_token_id)
        model = make_model("gpt2", args.size, seed=args.seed, max_positions=args.max_length)
    task = accumlab.engine.losses.detect_task(model)
    n_tokens = sum(len(e["input_ids"]) for e in train_ex)
    print(f"pretrain: {args.arch}-{args.size} ({task}), {count_parameters(model):,} parameters; "
          f"corpus train {len(train_ex)} sequences / {n_tokens:,} tokens, validation "
          f"{len(val_ex)}; {args.epochs} epoch(s); torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {torch.get_num_threads()} thread(s)")

    before = evaluate(model, val_data, task=task, pad_token_id=tok.pad_token_id)
    cfg = accumlab.TrainConfig(
        micro_batch_size=args.micro_batch, accum_steps=args.accum_steps, epochs=epochs,
        lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01, warmup_steps=args.warmup,
        schedule="cosine", min_lr_ratio=args.min_lr_ratio, clip_grad_norm=1.0, seed=args.seed,
        device="cpu", progress=False, pad_token_id=tok.pad_token_id,
        eval_every=args.eval_every, eval_batch_size=64,
    )
    print(f"training on {len(train_data)} rows"
          + (f" (packed blocks of {args.max_length} tokens)" if packed else ""), flush=True)
    t0 = time.perf_counter()
    result = accumlab.train(model, train_data, cfg, eval_data=val_data,
                            callbacks=[_print_evals(t0)])
    train_s = time.perf_counter() - t0
    after = evaluate(model, val_data, task=task, pad_token_id=tok.pad_token_id)

    losses = result.losses
    every = max(1, len(losses) // 10)
    curve = {r["step"]: round(r["loss"], 3) for r in result.history[::every]}
    curve[result.history[-1]["step"]] = round(losses[-1], 3)
    val_curve = {e["step"]: round(e["loss"], 3) for e in result.evals}
    print(f"train loss by optimizer step: {curve}")
    print(f"validation loss by optimizer step: {val_curve}")
    print(f"validation loss {before['loss']:.3f} -> {after['loss']:.3f} "
          f"(perplexity {before['perplexity']:.0f} -> {after['perplexity']:.1f})")
    print(f"training: {result.steps} optimizer steps of {args.micro_batch}x{args.accum_steps} "
          f"sequences in {train_s:.0f} s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for extra in ("generation_config.json",):
        (out / extra).unlink(missing_ok=True)
    info = {
        "arch": args.arch, "size": args.size, "task": task,
        "parameters": count_parameters(model), "epochs": args.epochs,
        "micro_batch_size": args.micro_batch, "accum_steps": args.accum_steps, "lr": args.lr,
        "warmup_steps": args.warmup, "schedule": "cosine", "min_lr_ratio": args.min_lr_ratio,
        "betas": [0.9, 0.95], "weight_decay": 0.01, "clip_grad_norm": 1.0,
        "packed": packed, "train_rows": len(train_data),
        "max_length": args.max_length, "seed": args.seed, "optimizer_steps": result.steps,
        "train_loss_curve": curve, "validation_loss_curve": val_curve,
        "validation_loss_before": before["loss"],
        "validation_loss_after": after["loss"], "train_seconds": round(train_s, 1),
        "corpus_train_sequences": len(train_ex), "corpus_train_tokens": n_tokens,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
    }
    (out / "pretrain_info.json").write_text(json.dumps(info, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"saved to {out} ({size:.1f} MiB) in {time.perf_counter() - t_start:.0f} s total")


def _print_evals(t0: float):
    """An on-step-end callback that prints each validation loss as it comes (a long run's pulse)."""
    def callback(entry: dict) -> None:
        if "eval" in entry:
            print(f"  step {entry['step']}: train loss {entry['loss']:.3f}, validation loss "
                  f"{entry['eval']['loss']:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return callback


if __name__ == "__main__":
    main()
