"""accumlab.train, Hugging Face's Trainer and a plain PyTorch loop, side by side in one process.

All sides train a fresh copy of the same initial GPT-2 weights on the same data (the shipped
corpus packed into fixed-length blocks, in order) for the same number of optimizer steps with
the same micro-batch x accumulation steps, AdamW (lr 3e-4 by default, no weight decay, constant
LR, fused on CUDA), clipping at 1.0 (the Trainer's default), the same collator (`pad_collate`)
and the token-normalised loss (sum of token losses over the window / its label tokens: the Trainer's
`num_items_in_batch` path, accumlab's default, and what the plain loop writes out). The sides
run one after the other, the order rotating every round. Tokens/s counts the timed steps only
(after the warm-up steps), between two `torch.cuda.synchronize()` on a GPU.

    MFU = tokens/s x (6 N + 12 x layers x width x sequence) / peak     (GPU: 989e12 on an H100)

On a CPU the table shows achieved GFLOP/s instead of MFU, and no peak memory (the process's
resident-memory peak can't be split between sides that run in one process).

    python benchmarks/bench_frameworks.py                   # GPU: GPT-2 small, 1024, 16 x 4, bf16
    python benchmarks/bench_frameworks.py --compile         # also accumlab and the loop compiled
    python benchmarks/bench_frameworks.py --cpu-ci          # tiny CPU run, a few seconds
    python benchmarks/bench_frameworks.py --size mini --seq 128 --micro 4 --accum 4 --steps 5
    python benchmarks/bench_frameworks.py --compile --sweep 64x1,32x2,16x4,8x8   # + targets

The table and the records are also written as JSON (`--json PATH`, default
`$OUT/bench_frameworks.json` when OUT is set, else `bench_frameworks.json`) after every run, so
that a timeout keeps what finished.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing accumlab
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", f"/tmp/accumlab-inductor-{os.getuid()}")

import bench_targets  # noqa: E402  (beside this script)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import accumlab  # noqa: E402
from accumlab.engine.collate import pad_collate  # noqa: E402
from accumlab.engine.models import make_model  # noqa: E402
from accumlab.lab.throughput import (  # noqa: E402
    corpus_blocks,
    flops_per_token,
    model_shape,
    peak_flops,
)

LR = 3e-4
CLIP = 1.0
PAD_ID = 1
BASELINE = "trainer"
SIDES = ("accumlab", "trainer", "plain", "accumlab-compile", "plain-compile", "trainer-compile")


@dataclass
class Spec:
    """One benchmark configuration (the same for every side)."""

    size: str
    seq: int
    micro: int
    accum: int
    warmup: int
    steps: int
    rounds: int
    precision: str
    device: str
    lr: float = LR
    backend: str = "inductor"  # torch.compile backend of the compiled sides

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def tokens_per_step(self) -> int:
        return self.micro * self.accum * self.seq

    def model(self) -> torch.nn.Module:
        return make_model("gpt2", self.size, seed=0, max_positions=max(self.seq, 64))


# ------------------------------------------------------------------------------- timing


class Clock:
    """Marks the end of the last warm-up step and of the last timed step (synchronised)."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.start: float | None = None
        self.end: float | None = None
        self.steps = 0

    def step_done(self, step: int) -> None:
        if self.spec.device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.steps = step
        if step == self.spec.warmup:
            self.start = now
        if step == self.spec.total_steps:
            self.end = now

    def seconds(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError(f"the run ended after {self.steps} steps, before the timed steps "
                               f"completed ({self.spec.total_steps} expected)")
        return self.end - self.start


# ------------------------------------------------------------------------------- the sides


def run_accumlab(spec: Spec, model, data, clock: Clock, compile: bool) -> int:
    """accumlab.train with the benchmark's settings; returns the optimizer steps taken."""
    cfg = accumlab.TrainConfig(
        micro_batch_size=spec.micro, accum_steps=spec.accum, max_steps=spec.total_steps,
        optimizer="adamw", lr=spec.lr, weight_decay=0.0, clip_grad_norm=CLIP,
        precision=spec.precision, shuffle=False, device=spec.device, compile=compile,
        progress=False, seed=0, pad_token_id=PAD_ID,
    )
    from accumlab.engine import compiled

    compiled.BACKEND = spec.backend
    result = accumlab.train(model, data, cfg, callbacks=[lambda e: clock.step_done(e["step"])])
    return result.steps


def run_trainer(spec: Spec, model, data, clock: Clock, compile: bool) -> int:
    """Hugging Face's Trainer with the same settings; returns its global_step."""
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done(state.global_step)

    cuda = spec.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="bench_trainer_") as out_dir:  # nothing is saved
        args = TrainingArguments(
            output_dir=out_dir, per_device_train_batch_size=spec.micro,
            gradient_accumulation_steps=spec.accum, max_steps=spec.total_steps,
            learning_rate=spec.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=CLIP, bf16=spec.precision == "bf16",
            optim="adamw_torch_fused" if cuda else "adamw_torch", use_cpu=not cuda,
            torch_compile=compile, dataloader_num_workers=0,
            train_sampling_strategy="sequential", remove_unused_columns=False,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
            seed=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data,
                          data_collator=lambda examples: pad_collate(examples, PAD_ID),
                          callbacks=[Timer()])
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
        trainer.train()
        steps = trainer.state.global_step
        del trainer
    return steps


def run_plain(spec: Spec, model, data, clock: Clock, compile: bool) -> int:
    """The loop a careful practitioner writes: count N first, sum of token losses / N."""
    device = torch.device(spec.device)
    model.to(device)
    model.train()
    cuda = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0,
                                  fused=True if cuda else None)
    net = torch.compile(model, backend=spec.backend) if compile else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if spec.precision == "bf16"
                else contextlib.nullcontext())
    per_step = spec.micro * spec.accum
    for step in range(spec.total_steps):
        window = [pad_collate(data[i:i + spec.micro], PAD_ID)
                  for i in range(step * per_step, (step + 1) * per_step, spec.micro)]
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        for batch in window:
            ids = batch["input_ids"].to(device, non_blocking=True)
            mask = batch["attention_mask"].to(device, non_blocking=True)
            labels = batch["labels"].to(device, non_blocking=True)
            with autocast:
                logits = net(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100,
                                   reduction="sum") / n_items
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.step_done(step + 1)
    return spec.total_steps


RUNNERS = {"accumlab": run_accumlab, "trainer": run_trainer, "plain": run_plain}


def probe_loss(model: torch.nn.Module, batch: dict, spec: Spec) -> float:
    """Mean token loss of a trained model on a held-out batch (the same for every side)."""
    model.eval()
    autocast = (torch.autocast(spec.device, dtype=torch.bfloat16) if spec.precision == "bf16"
                else contextlib.nullcontext())
    ids = batch["input_ids"].to(spec.device)
    with torch.no_grad(), autocast:
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"].to(spec.device)
                       ).logits.float()
    labels = batch["labels"].to(spec.device)
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                 labels[:, 1:].reshape(-1), ignore_index=-100))


def run_side(name: str, spec: Spec, init_state: dict, data, probe: dict) -> dict:
    """One timed run of one side from the shared initial weights."""
    base, _, variant = name.partition("-")
    gc.collect()
    if spec.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = spec.model()
    model.load_state_dict(init_state)
    clock = Clock(spec)
    wall0 = time.perf_counter()
    steps = RUNNERS[base](spec, model, data, clock, variant == "compile")
    wall = time.perf_counter() - wall0
    seconds = clock.seconds()
    peak = torch.cuda.max_memory_allocated() / 2**30 if spec.device == "cuda" else None
    loss = probe_loss(model, probe, spec)
    del model
    return {"side": name, "steps": steps, "timed_s": seconds, "run_wall_s": wall,
            "tokens_per_s": spec.steps * spec.tokens_per_step / seconds,
            "peak_mem_gib": peak, "final_loss": loss}


# ------------------------------------------------------------------------------- report


def summarise(runs: list[dict], flops_tok: float, peak: float | None) -> dict[str, dict]:
    """Per side: median tokens/s over rounds, MFU or GFLOP/s, peak memory, final loss, ratios."""
    sides: dict[str, dict] = {}
    for name in dict.fromkeys(r["side"] for r in runs):
        mine = [r for r in runs if r["side"] == name]
        tok_s = statistics.median(r["tokens_per_s"] for r in mine)
        mems = [r["peak_mem_gib"] for r in mine if r["peak_mem_gib"] is not None]
        sides[name] = {
            "rounds": len(mine), "steps": sorted({r["steps"] for r in mine}),
            "tokens_per_s": tok_s, "tokens_per_s_min": min(r["tokens_per_s"] for r in mine),
            "tokens_per_s_max": max(r["tokens_per_s"] for r in mine),
            "gflops": tok_s * flops_tok / 1e9,
            "mfu": tok_s * flops_tok / peak if peak else None,
            "peak_mem_gib": max(mems) if mems else None,
            "final_loss": mine[-1]["final_loss"],
            "final_loss_spread": max(r["final_loss"] for r in mine)
            - min(r["final_loss"] for r in mine),
        }
    ref = sides.get(BASELINE)
    for rec in sides.values():
        rec["speed_vs_trainer"] = rec["tokens_per_s"] / ref["tokens_per_s"] if ref else None
        rec["mem_vs_trainer"] = (rec["peak_mem_gib"] / ref["peak_mem_gib"]
                                 if ref and rec["peak_mem_gib"] and ref["peak_mem_gib"] else None)
        rec["loss_rel_vs_trainer"] = (abs(rec["final_loss"] - ref["final_loss"])
                                      / abs(ref["final_loss"]) if ref else None)
    return sides


def table(sides: dict[str, dict], gpu: bool) -> list[str]:
    """The printed table: one line per side, ratios against the Trainer."""
    util = "MFU" if gpu else "GFLOP/s"
    lines = [f"{'side':<17} {'steps':>5} {'tokens/s':>11} {util:>8} {'peak GiB':>9} "
             f"{'final loss':>11} {'speed/Trainer':>13} {'mem/Trainer':>11} {'loss rel diff':>13}"]
    for name, r in sides.items():
        u = f"{100 * r['mfu']:.1f}%" if gpu and r["mfu"] is not None else (
            "n/a" if gpu else f"{r['gflops']:.2f}")
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "n/a"
        speed = f"{r['speed_vs_trainer']:.3f}" if r["speed_vs_trainer"] is not None else "-"
        memr = f"{r['mem_vs_trainer']:.3f}" if r["mem_vs_trainer"] is not None else "-"
        lrel = f"{r['loss_rel_vs_trainer']:.1e}" if r["loss_rel_vs_trainer"] is not None else "-"
        steps = "/".join(str(s) for s in r["steps"])
        lines.append(f"{name:<17} {steps:>5} {r['tokens_per_s']:>11,.0f} {u:>8} {mem:>9} "
                     f"{r['final_loss']:>11.6f} {speed:>13} {memr:>11} {lrel:>13}")
    return lines


class Report:
    """Prints lines and rewrites the JSON file after every run."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {"lines": [], "runs": [], "sides": {}}

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.data["lines"].append(text)
        self.flush()

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-ci", action="store_true",
                   help="tiny model on CPU, 2 rounds of 1 + 2 steps: a few seconds")
    p.add_argument("--size", help="make_model size: tiny, mini, small, medium, gpt2-small")
    p.add_argument("--seq", type=int, help="tokens per sequence")
    p.add_argument("--micro", type=int, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, help="micro-batches per optimizer step (k)")
    p.add_argument("--steps", type=int, help="timed optimizer steps per run")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps before them")
    p.add_argument("--rounds", type=int, help="runs of every side, alternated")
    p.add_argument("--lr", type=float, help=f"AdamW learning rate (default {LR})")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 autocast or fp32")
    p.add_argument("--compile", action="store_true",
                   help="add accumlab and the plain loop under torch.compile")
    p.add_argument("--sides", help=f"comma-separated subset of {','.join(SIDES)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU (default 1)")
    p.add_argument("--backend", help="torch.compile backend (default inductor; aot_eager for a "
                   "quick dry run of the compiled sides)")
    p.add_argument("--sweep", help="micro x k configurations to run after the rounds, e.g. "
                   "64x1,32x2,16x4,8x8 (see bench_targets.py)")
    p.add_argument("--sweep-sides", default="accumlab-compile",
                   help="sides of the sweep (default accumlab-compile)")
    p.add_argument("--sweep-steps", type=int, help="timed steps per sweep run (default --steps)")
    p.add_argument("--json", help="where to write the JSON results")
    return p.parse_args(argv)


def make_spec(args: argparse.Namespace) -> Spec:
    """Defaults by mode (GPU, CPU, CPU CI), then the command-line overrides."""
    if args.cpu_ci:
        spec = Spec("tiny", seq=32, micro=2, accum=2, warmup=1, steps=2, rounds=2,
                    precision="fp32", device="cpu", lr=1e-2)  # a large LR: the loss moves
    elif torch.cuda.is_available():
        spec = Spec("gpt2-small", seq=1024, micro=16, accum=4, warmup=3, steps=10, rounds=2,
                    precision="bf16", device="cuda")
    else:
        spec = Spec("mini", seq=128, micro=4, accum=4, warmup=1, steps=4, rounds=3,
                    precision="fp32", device="cpu")
    for name in ("size", "seq", "micro", "accum", "warmup", "steps", "rounds", "precision",
                 "lr", "backend"):
        if getattr(args, name) is not None:
            setattr(spec, name, getattr(args, name))
    if spec.steps < 1 or spec.warmup < 1 or spec.rounds < 1:
        raise SystemExit("--steps, --warmup and --rounds must be >= 1 (the warm-up step starts "
                         "the clock)")
    return spec


def main(argv: list[str] | None = None) -> int:
    """Run every side `rounds` times, alternating, and print the table of ratios."""
    args = parse_args(argv)
    spec = make_spec(args)
    if spec.device == "cpu":
        torch.set_num_threads(args.threads or 1)  # OpenMP threads stall on a shared machine
    sides = ([s.strip() for s in args.sides.split(",")] if args.sides
             else ["accumlab", "trainer", "plain"] + (
                 ["accumlab-compile", "plain-compile"] if args.compile else []))
    unknown = [s for s in sides if s not in SIDES]
    if unknown:
        raise SystemExit(f"unknown sides {unknown}: choose from {list(SIDES)}")
    out = args.json or (f"{os.environ['OUT']}/bench_frameworks.json" if os.environ.get("OUT")
                        else "bench_frameworks.json")
    rep = Report(Path(out))

    import transformers

    device_name = torch.cuda.get_device_name() if spec.device == "cuda" else "CPU"
    peak = peak_flops(device_name) if spec.device == "cuda" else None
    with torch.device("meta"):  # shapes only, no initialisation
        n_params, layers, width = model_shape(spec.model())
    flops_tok = flops_per_token(n_params, layers, width, spec.seq)
    rep.data["spec"] = asdict(spec) | {"sides": sides, "flops_per_token": flops_tok,
                                       "peak_flops": peak, "device_name": device_name}
    rep.line(f"bench_frameworks on {device_name}: torch {torch.__version__}, transformers "
             f"{transformers.__version__}, accumlab {accumlab.__version__}")
    rep.line(f"gpt2 {spec.size}: {n_params / 1e6:.2f}M parameters, {layers} layers, width "
             f"{width}; sequence {spec.seq}; {spec.micro} micro x {spec.accum} steps = "
             f"{spec.tokens_per_step:,} tokens per optimizer step; {spec.precision}; "
             f"AdamW lr {spec.lr:g}; {spec.warmup} warm-up + {spec.steps} timed steps x "
             f"{spec.rounds} rounds; "
             f"{flops_tok / 1e9:.4f} GFLOP/token"
             + (f"; peak {peak / 1e12:.0f} TFLOP/s" if peak else ""))

    data = corpus_blocks(spec.seq, spec.total_steps * spec.micro * spec.accum)
    probe = pad_collate(corpus_blocks(spec.seq, spec.micro, split="validation"), PAD_ID)
    init_state = {k: v.clone() for k, v in spec.model().state_dict().items()}

    for r in range(spec.rounds):
        order = sides[r % len(sides):] + sides[:r % len(sides)]
        for name in order:
            try:
                rec = run_side(name, spec, init_state, data, probe)
            except Exception as e:  # keep the other sides' numbers
                rep.line(f"round {r + 1} {name}: FAILED {type(e).__name__}: {e}")
                rep.data["runs"].append({"side": name, "round": r + 1,
                                         "error": f"{type(e).__name__}: {e}"})
                continue
            rec["round"] = r + 1
            rep.data["runs"].append(rec)
            mem = f", peak {rec['peak_mem_gib']:.2f} GiB" if rec["peak_mem_gib"] else ""
            rep.line(f"round {r + 1} {name:<17} {rec['steps']} steps, "
                     f"{rec['tokens_per_s']:,.0f} tokens/s{mem}, final loss "
                     f"{rec['final_loss']:.6f}, run {rec['run_wall_s']:.1f} s")

    ok = [r for r in rep.data["runs"] if "error" not in r]
    if not ok:
        return 1
    rep.data["sides"] = summarise(ok, flops_tok, peak)
    rep.line()
    for text in table(rep.data["sides"], gpu=spec.device == "cuda"):
        rep.line(text)
    rep.line("(tokens/s: median over rounds; ratios against the Trainer; final loss: mean token "
             "loss of the trained model on a held-out batch)")
    sweep = []
    if args.sweep:
        sweep = bench_targets.run_sweep(
            bench_targets.parse_sweep(args.sweep), args.sweep_sides.split(","), spec,
            init_state, probe, rep, run_side, corpus_blocks, flops_tok, peak, args.sweep_steps)
    if args.compile or args.sweep:
        rep.data["targets"] = bench_targets.targets(rep.data["sides"], sweep, spec.micro,
                                                    spec.accum)
        rep.line()
        for text in bench_targets.target_lines(rep.data["targets"]):
            rep.line(text)
    failed = [r for r in rep.data["runs"] + sweep if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
