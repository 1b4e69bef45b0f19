"""CPU overhead of `accumlab.train` against a minimal hand-written accumulation loop.

Both sides do the same work: the same model initialisation, the same examples in the same order,
the same micro-batches (`pad_collate`, dynamic padding), AdamW, micro-batch 4 x 4 accumulation
steps, loss = sum of token cross-entropies over the window / N (tokens after the causal shift),
no clipping. They alternate in one process (hand, accumlab, hand, accumlab, ...) after a warm-up
round, and the ratio accumlab / hand loop is taken per round, so that slow drifts of a shared
machine hit both sides alike. The script also checks that both end with the same parameters.

    python benchmarks/bench_overhead.py --quick     # CI size, < 60 s on 2 cores
    python benchmarks/bench_overhead.py             # default, about 2-3 minutes
    python benchmarks/bench_overhead.py --profile   # cProfile of one accumlab run, top entries
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import accumlab  # noqa: E402
from accumlab.engine.collate import pad_collate  # noqa: E402
from accumlab.engine.models import make_model  # noqa: E402

MICRO, K, LR = 4, 4, 1e-3


def make_data(n: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[dict]:
    """Variable-length causal-LM examples of random token ids (labels = input_ids)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(2, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def hand_loop(model: torch.nn.Module, data: list[dict], steps: int, pad_id: int) -> int:
    """The minimal exact loop: read a window ahead, count N, sum-CE / N, one AdamW step.

    Returns the number of (non-padding) tokens processed.
    """
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    tokens = 0
    per_window = MICRO * K
    for step in range(steps):
        chunk = data[step * per_window:(step + 1) * per_window]
        batches = [pad_collate(chunk[i:i + MICRO], pad_id) for i in range(0, per_window, MICRO)]
        n_items = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
        loss_sum = 0.0
        for b in batches:
            tokens += int(b["attention_mask"].sum())
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                 b["labels"][:, 1:].reshape(-1), ignore_index=-100,
                                 reduction="sum")
            loss = ce / n_items
            loss.backward()
            loss_sum += loss.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss_sum)  # a real loop logs the step's loss
    return tokens


def accumlab_loop(model: torch.nn.Module, data: list[dict], steps: int, pad_id: int) -> int:
    cfg = accumlab.TrainConfig(micro_batch_size=MICRO, accum_steps=K, max_steps=steps,
                               optimizer="adamw", lr=LR, weight_decay=0.0, shuffle=False,
                               clip_grad_norm=None, precision="fp32", device="cpu",
                               progress=False, pad_token_id=pad_id)
    result = accumlab.train(model, data, cfg)
    assert result.steps == steps, result.steps
    return sum(r["tokens"] for r in result.history)


def params_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def timed(fn, init, data, steps, pad_id):
    """Run one side on a fresh copy of the initial model: tokens, wall s, CPU s, model."""
    model = copy.deepcopy(init)
    c0, t0 = time.process_time(), time.perf_counter()
    tokens = fn(model, data, steps, pad_id)
    return tokens, time.perf_counter() - t0, time.process_time() - c0, model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI size (< 60 s on 2 CPU cores)")
    p.add_argument("--model", default=None, help="make_model size (default mini; quick: tiny)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per side")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per round")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: OpenMP threads on a shared 2-core "
                        "machine stall whenever another process holds a core)")
    p.add_argument("--profile", action="store_true", help="cProfile one accumlab round")
    args = p.parse_args(argv)

    size = args.model or ("tiny" if args.quick else "mini")
    rounds = args.rounds or (8 if args.quick else 15)
    steps = args.steps or (4 if args.quick else 8)
    torch.set_num_threads(args.threads)
    min_len, max_len = 16, 128
    data = make_data(steps * MICRO * K, min_len, max_len, vocab=4096)
    init = make_model("gpt2", size, seed=0)
    pad_id = init.config.pad_token_id
    n_params = sum(p.numel() for p in init.parameters())
    print(f"bench_overhead: gpt2 {size} ({n_params / 1e6:.2f}M params), torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; micro {MICRO} x k {K}, "
          f"{steps} steps/round ({len(data)} sequences, lengths {min_len}-{max_len}), "
          f"{rounds} rounds per side after 1 warm-up round")

    sides = {"hand": hand_loop, "accumlab": accumlab_loop}
    # Warm-up (allocator, kernels, lazy imports), and the honesty check: equal end parameters.
    finals = {}
    for name, fn in sides.items():
        *_, model = timed(fn, init, data, steps, pad_id)
        finals[name] = params_vector(model)
    diff = (finals["accumlab"] - finals["hand"]).abs().max().item()
    rel = ((finals["accumlab"] - finals["hand"]).norm() / finals["hand"].norm()).item()
    bitwise = torch.equal(finals["accumlab"], finals["hand"])
    print(f"end parameters accumlab vs hand loop: bitwise equal {bitwise}, max abs diff "
          f"{diff:.3e}, rel diff {rel:.3e}")

    if args.profile:
        import cProfile
        import pstats

        for name, fn in sides.items():
            prof = cProfile.Profile()
            prof.enable()
            timed(fn, init, data, steps, pad_id)
            prof.disable()
            stats = pstats.Stats(prof)
            print(f"--- cProfile {name}: {stats.total_calls:,} calls, {stats.total_tt:.3f} s")
            stats.sort_stats("tottime").print_stats(12)
        print("--- accumlab's own functions (cumulative):")
        prof = cProfile.Profile()
        prof.enable()
        timed(accumlab_loop, init, data, steps, pad_id)
        prof.disable()
        stats = pstats.Stats(prof)
        stats.sort_stats("cumulative").print_stats(r"accumlab[/\\]", 25)
        own = sum(tt for (file, _, _), (_, _, tt, _, _) in stats.stats.items()
                  if f"{os.sep}accumlab{os.sep}" in file)
        print(f"self time inside accumlab/*.py (Python, excluding the torch calls it makes): "
              f"{own:.4f} s of {stats.total_tt:.3f} s profiled ({100 * own / stats.total_tt:.2f}%)")

    # Wall-clock tokens/s is what a user sees; tokens per CPU-second is what the code costs and
    # barely moves when other processes share the machine (each side runs on `--threads`).
    wall = {name: [] for name in sides}
    cpu = {name: [] for name in sides}
    totals = {name: [0, 0.0, 0.0] for name in sides}  # tokens, wall s, CPU s over all rounds
    wall_ratios, cpu_ratios = [], []
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))  # alternate who goes first
        for name in order:
            tokens, seconds, cpu_s, _ = timed(sides[name], init, data, steps, pad_id)
            wall[name].append(tokens / seconds)
            totals[name][0] += tokens
            totals[name][1] += seconds
            totals[name][2] += cpu_s
            cpu[name].append(tokens / cpu_s)
        wall_ratios.append(wall["accumlab"][-1] / wall["hand"][-1])
        cpu_ratios.append(cpu["accumlab"][-1] / cpu["hand"][-1])
        print(f"  round {r + 1}: tok/s wall hand {wall['hand'][-1]:8,.0f} accumlab "
              f"{wall['accumlab'][-1]:8,.0f} ratio {wall_ratios[-1]:.3f} | per CPU-s hand "
              f"{cpu['hand'][-1]:8,.0f} accumlab {cpu['accumlab'][-1]:8,.0f} ratio "
              f"{cpu_ratios[-1]:.3f}")

    med = statistics.median
    for label, rates, ratios in (("wall-clock", wall, wall_ratios),
                                 ("per CPU-second", cpu, cpu_ratios)):
        m = med(ratios)
        print(f"{label:>14}: tokens/s median hand {med(rates['hand']):,.0f}, accumlab "
              f"{med(rates['accumlab']):,.0f}; ratio accumlab/hand median {m:.3f} "
              f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {rounds} rounds), overhead "
              f"{100 * (1 - m):+.1f}% (target <= 5%)")
    ours, hand = totals["accumlab"], totals["hand"]
    pooled = [(ours[0] / ours[i]) / (hand[0] / hand[i]) for i in (1, 2)]
    print(f"pooled over all rounds (total tokens / total time): ratio wall {pooled[0]:.3f}, "
          f"CPU {pooled[1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
