"""GPU throughput of `accumlab.train` (eager and torch.compile) against Hugging Face's Trainer.

GPT-2 small (124M, vocabulary 50257, 1024 positions), sequences of 1024 random token ids, bf16
autocast with float32 weights, 64 sequences per optimizer step as micro-batch 16 x 4 accumulation
steps, fused AdamW, gradient clipping at 1.0 (the Trainer's default) on both sides, the same
collator (`pad_collate`) and no DataLoader workers. Each run starts from the same initial weights
and data; a few warm-up steps (CUDA init, cuBLAS heuristics, compilation) are followed by timed
steps. Tokens/s counts only the timed steps, between two `torch.cuda.synchronize()`.

    MFU = tokens/s x (6 N + 12 layers x width x sequence) / 989e12

with N the total parameter count (tied embeddings counted once) and 989 TFLOP/s the H100 SXM
dense bf16 peak. Peak memory is `torch.cuda.max_memory_allocated`, reset before each run.

    python benchmarks/gpu_bench.py                 # H100: about 3-4 minutes (compile ~1 min)
    python benchmarks/gpu_bench.py --cpu-smoke     # same code path, tiny model, 2 steps, CPU
    python benchmarks/gpu_bench.py --no-compile    # skip the torch.compile run

Results are also written to $OUT/gpu_bench.txt and $OUT/gpu_bench.json when OUT is set (after
each run, so a timeout keeps what finished).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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

import torch  # noqa: E402
import transformers  # noqa: E402

import accumlab  # noqa: E402
from accumlab.collate import pad_collate  # noqa: E402
from accumlab.models import count_parameters, make_model  # noqa: E402

PEAK_FLOPS = 989e12  # H100 SXM, dense bf16
LR = 3e-4
CLIP = 1.0


@dataclass
class Spec:
    size: str
    seq: int
    micro: int
    accum: int
    warmup: int
    steps: int
    device: str
    vocab: int | None = None  # None: make_model's default for the size

    @property
    def sequences(self) -> int:
        return (self.warmup + self.steps) * self.micro * self.accum

    def model(self) -> torch.nn.Module:
        kwargs = {"max_positions": max(self.seq, 64)}
        if self.vocab is not None:
            kwargs["vocab_size"] = self.vocab
        return make_model("gpt2", self.size, seed=0, **kwargs)


class RandomTokens(torch.utils.data.Dataset):
    """Fixed-length sequences of random token ids (ids 2.. vocab-1), labels = input_ids."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(2, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        row = self.ids[i]
        return {"input_ids": row, "labels": row}


class Report:
    """Prints lines and mirrors them (and the records) to $OUT when it is set."""

    def __init__(self):
        self.lines: list[str] = []
        self.records: list[dict] = []
        out = os.environ.get("OUT")
        self.dir = Path(out) if out else None

    def line(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)
        self.flush()

    def record(self, rec: dict) -> None:
        self.records.append(rec)
        self.flush()

    def flush(self) -> None:
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "gpu_bench.txt").write_text("\n".join(self.lines) + "\n")
        (self.dir / "gpu_bench.json").write_text(json.dumps(self.records, indent=1) + "\n")


class Clock:
    """Marks the end of the warm-up step and of the last timed step (synchronised)."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.cuda = spec.device == "cuda"
        self.start: float | None = None
        self.end: float | None = None
        self.step_times: list[float] = []
        self._last: float | None = None

    def step_done(self, step: int) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if step > self.spec.warmup and self._last is not None:
            self.step_times.append(now - self._last)
        self._last = now
        if step == self.spec.warmup:
            self.start = now
        if step == self.spec.warmup + self.spec.steps:
            self.end = now

    def seconds(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError("the run ended before the timed steps completed")
        return self.end - self.start


def probe_loss(model: torch.nn.Module, data: RandomTokens, spec: Spec) -> float:
    """Mean token loss of the trained model on the first micro-batch (both sides alike)."""
    batch = pad_collate([data[i] for i in range(spec.micro)], 1)
    model.eval()
    with torch.no_grad(), torch.autocast(spec.device, dtype=torch.bfloat16):
        ids = batch["input_ids"].to(spec.device)
        logits = model(input_ids=ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             ids[:, 1:].reshape(-1))
    return float(loss)


def run_accumlab(spec: Spec, data: RandomTokens, compile: bool) -> dict:
    model = spec.model()
    clock = Clock(spec)
    cfg = accumlab.TrainConfig(
        micro_batch_size=spec.micro, accum_steps=spec.accum, max_steps=spec.warmup + spec.steps,
        optimizer="adamw", lr=LR, weight_decay=0.0, clip_grad_norm=CLIP, precision="bf16",
        shuffle=False, device=spec.device, compile=compile, progress=False, seed=0,
    )
    result = accumlab.train(model, data, cfg, callbacks=[lambda e: clock.step_done(e["step"])])
    assert result.steps == spec.warmup + spec.steps, result.steps
    return {"seconds": clock.seconds(), "step_times": clock.step_times,
            "loss": probe_loss(model, data, spec), "model": model}


def run_trainer(spec: Spec, data: RandomTokens, out_dir: Path) -> dict:
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    model = spec.model()
    clock = Clock(spec)

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_done(state.global_step)

    cuda = spec.device == "cuda"
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=spec.micro,
        gradient_accumulation_steps=spec.accum, max_steps=spec.warmup + spec.steps,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=CLIP, bf16=True, optim="adamw_torch_fused" if cuda else "adamw_torch",
        use_cpu=not cuda, dataloader_num_workers=0, train_sampling_strategy="sequential",
        remove_unused_columns=False, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=lambda examples: pad_collate(examples, 1),
                      callbacks=[Timer()])
    trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
    trainer.train()
    assert trainer.state.global_step == spec.warmup + spec.steps, trainer.state.global_step
    out = {"seconds": clock.seconds(), "step_times": clock.step_times,
           "loss": probe_loss(model, data, spec), "model": model}
    del trainer
    return out


def free_memory(spec: Spec) -> None:
    gc.collect()
    if spec.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true",
                   help="tiny model, 2 timed steps on CPU: checks the code path, not speed")
    p.add_argument("--no-compile", action="store_true", help="skip accumlab compile=True")
    p.add_argument("--no-trainer", action="store_true", help="skip the Hugging Face Trainer")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 3)")
    p.add_argument("--micro", type=int, default=None, help="micro-batch size (default 16)")
    p.add_argument("--accum", type=int, default=None, help="accumulation steps (default 4)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 1024)")
    args = p.parse_args(argv)

    if args.cpu_smoke:
        spec = Spec("tiny", seq=32, micro=2, accum=2, warmup=1, steps=2, device="cpu")
        torch.set_num_threads(1)  # OpenMP threads stall on a busy 2-core machine
    else:
        if not torch.cuda.is_available():
            print("gpu_bench: no CUDA device; use --cpu-smoke to check the code path on CPU")
            return 2
        spec = Spec("gpt2-small", seq=1024, micro=16, accum=4, warmup=3, steps=10,
                    device="cuda")
    for name in ("steps", "warmup", "micro", "accum", "seq"):
        if getattr(args, name) is not None:
            setattr(spec, name, getattr(args, name))

    rep = Report()
    device_name = torch.cuda.get_device_name() if spec.device == "cuda" else "CPU"
    try:
        import accelerate

        accel = accelerate.__version__
    except ImportError:
        accel = None
    rep.line(f"gpu_bench on {device_name}: torch {torch.__version__}, transformers "
             f"{transformers.__version__}, accelerate {accel or 'missing'}, accumlab "
             f"{accumlab.__version__}")

    with torch.device("meta"):  # shapes only: no 124M-parameter initialisation
        probe = spec.model()
    n_params = count_parameters(probe)
    cfg = probe.config
    layers, width, vocab = cfg.n_layer, cfg.n_embd, cfg.vocab_size
    del probe
    flops_per_token = 6 * n_params + 12 * layers * width * spec.seq
    tokens_per_step = spec.micro * spec.accum * spec.seq
    rep.line(f"model gpt2 {spec.size}: {n_params / 1e6:.1f}M parameters, {layers} layers, "
             f"width {width}, vocab {vocab}; sequence {spec.seq}; {spec.micro} micro x "
             f"{spec.accum} steps = {spec.micro * spec.accum} sequences = {tokens_per_step:,} "
             f"tokens per optimizer step; bf16 autocast, AdamW (fused on CUDA), clip {CLIP}; "
             f"{spec.warmup} warm-up + {spec.steps} timed steps; "
             f"{flops_per_token / 1e9:.3f} GFLOP/token")
    data = RandomTokens(spec.sequences, spec.seq, vocab)

    runs: list[tuple[str, object]] = [("accumlab eager", lambda: run_accumlab(spec, data, False))]
    if args.no_trainer:
        rep.line("HF Trainer: skipped (--no-trainer)")
    elif accel is None:
        rep.line("HF Trainer: skipped, `import accelerate` failed (the Trainer needs it); "
                 "carry an accelerate wheel to run it")
    else:
        out_dir = Path(tempfile.mkdtemp(prefix="gpu_bench_trainer_"))  # nothing is saved
        runs.append(("HF Trainer", lambda: run_trainer(spec, data, out_dir)))
    if not args.no_compile:
        runs.append(("accumlab compile", lambda: run_accumlab(spec, data, True)))

    results: dict[str, dict] = {}
    for name, fn in runs:
        free_memory(spec)
        base = torch.cuda.memory_allocated() if spec.device == "cuda" else 0
        wall0 = time.perf_counter()
        try:
            got = fn()
        except Exception as e:  # keep the other runs' numbers
            rep.line(f"{name}: FAILED {type(e).__name__}: {e}")
            rep.record({"name": name, "error": f"{type(e).__name__}: {e}"})
            continue
        got.pop("model", None)
        tok_s = spec.steps * tokens_per_step / got["seconds"]
        rec = {
            "name": name, "tokens_per_s": tok_s,
            "mfu": tok_s * flops_per_token / PEAK_FLOPS,
            "peak_mem_gib": (torch.cuda.max_memory_allocated() / 2**30
                             if spec.device == "cuda" else None),
            "mem_before_gib": base / 2**30,
            "step_s_median": sorted(got["step_times"])[len(got["step_times"]) // 2],
            "step_s_min": min(got["step_times"]), "timed_s": got["seconds"],
            "run_wall_s": time.perf_counter() - wall0, "probe_loss": got["loss"],
            "spec": asdict(spec),
        }
        results[name] = rec
        rep.record(rec)
        mem = f"{rec['peak_mem_gib']:.2f} GiB" if rec["peak_mem_gib"] is not None else "n/a"
        rep.line(f"{name}: {tok_s:,.0f} tokens/s, MFU {100 * rec['mfu']:.1f}%, peak memory "
                 f"{mem}, step median {rec['step_s_median'] * 1e3:.1f} ms, whole run "
                 f"{rec['run_wall_s']:.1f} s, loss after training {rec['probe_loss']:.4f}")
        del got
    free_memory(spec)

    rep.line()
    rep.line(f"{'run':<18} {'tokens/s':>11} {'MFU':>7} {'peak GiB':>9} {'step ms':>8} "
             f"{'vs Trainer':>10} {'mem vs Tr':>9}")
    ref = results.get("HF Trainer")
    for name, rec in results.items():
        mem = f"{rec['peak_mem_gib']:.2f}" if rec["peak_mem_gib"] is not None else "n/a"
        speed = f"{rec['tokens_per_s'] / ref['tokens_per_s']:.3f}" if ref else "-"
        mem_ratio = ("-" if not ref or ref["peak_mem_gib"] is None
                     else f"{rec['peak_mem_gib'] / ref['peak_mem_gib']:.3f}")
        rep.line(f"{name:<18} {rec['tokens_per_s']:>11,.0f} {100 * rec['mfu']:>6.1f}% "
                 f"{mem:>9} {rec['step_s_median'] * 1e3:>8.1f} {speed:>10} {mem_ratio:>9}")
    if spec.device == "cpu":
        rep.line("(cpu smoke: numbers check the code path only; MFU is against the H100 peak)")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
