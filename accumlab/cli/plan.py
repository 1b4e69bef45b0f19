"""`accumlab plan`: micro-batch x accumulation steps (x checkpointing) for a GPU, and why."""

from __future__ import annotations

from pathlib import Path

from accumlab.cli.args import EXIT_OK, UsageError, fraction, none_or, positive_int
from accumlab.engine.config import TrainConfig

MODELS = ("gpt2-small, gpt2-medium, bert-base, llama-3.2-1b, llama-3.1-8b, tinyllama-1.1b, "
          "accumlab's tiny..medium")


def add_parser(sub) -> None:
    """The `plan` subcommand and its options."""
    p = sub.add_parser("plan", help="recommend micro-batch x accumulation steps for a GPU "
                                    "from the memory model, and say why",
                       description="Recommend micro-batch x accumulation steps (x activation "
                                   "checkpointing) for one GPU from accumlab's memory model, "
                                   "and say why the next micro-batch up does not fit.")
    p.add_argument("--gpu-memory", required=True, metavar="SIZE",
                   help="memory of one GPU: 16GB (10^9 bytes), 16GiB or 80G (2^30 bytes)")
    p.add_argument("--model", default="gpt2-small",
                   help=f"a model name ({MODELS}) or a local config.json / model folder "
                        "(default: gpt2-small)")
    p.add_argument("--seq-len", type=positive_int, required=True, metavar="N",
                   help="tokens per sequence")
    p.add_argument("--global-batch-tokens", type=positive_int, required=True, metavar="N",
                   help="tokens per optimizer step over all ranks")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16", "fp64"),
                   help="training precision (default: bf16)")
    p.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"),
                   help="attention kernel (default: sdpa)")
    p.add_argument("--checkpointing", default="auto", choices=("auto", "on", "off"),
                   help="activation checkpointing; auto = only when needed (default: auto)")
    chunk = TrainConfig.__dataclass_fields__["loss_chunk_size"].default
    p.add_argument("--loss-chunk-size", type=none_or(positive_int), default=chunk, metavar="N",
                   help="positions per cross-entropy chunk, or none for one piece (default: "
                        f"TrainConfig.loss_chunk_size = {chunk})")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd", "sgd_momentum"),
                   help="optimizer, for the size of its state (default: adamw)")
    p.add_argument("--ranks", type=positive_int, default=1, metavar="N",
                   help="data-parallel GPUs (default: 1)")
    p.add_argument("--headroom", type=fraction, default=0.10, metavar="X",
                   help="fraction of the GPU kept free for the CUDA context and allocator, in "
                        "[0, 1) (default: 0.1)")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args) -> int:
    """Print the plan and the reasons."""
    from accumlab.lab.memory import ModelShape
    from accumlab.lab.planner import parse_bytes, plan_training

    if Path(args.model).exists():  # a local config.json or model folder
        from accumlab.engine.models import load_config

        shape = ModelShape.from_config(load_config(args.model))
    else:
        shape = ModelShape.named(args.model)
    if args.seq_len > shape.positions:
        raise UsageError(f"--seq-len {args.seq_len} is longer than {args.model}'s "
                         f"{shape.positions} positions")
    gpu = parse_bytes(args.gpu_memory)
    plan = plan_training(gpu, shape, args.seq_len, args.global_batch_tokens, args.precision,
                         attention=args.attention, checkpointing=args.checkpointing,
                         loss_chunk_size=args.loss_chunk_size, ranks=args.ranks,
                         headroom=args.headroom, optimizer=args.optimizer)
    print(f"{args.model} on {args.gpu_memory} ({gpu / 2**30:.2f} GiB) per GPU, "
          f"{args.precision}, {args.attention} attention, checkpointing {args.checkpointing}")
    print(plan)
    return EXIT_OK
