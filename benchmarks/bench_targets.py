"""The micro-batch sweep and the fast path's targets, for `bench_frameworks.py`.

    python benchmarks/bench_frameworks.py --compile --sweep 64x1,32x2,16x4,8x8

runs, after the alternated rounds, `--sweep-sides` (default accumlab-compile) once at every
micro x k of the sweep (same tokens per step when micro x k is constant), then prints the open
targets of the fast path against what this run measured:

- accumlab compiled >= 2.5 x the Trainer's tokens/s (anchor configuration);
- accumlab compiled >= 40% MFU (GPU only: a CPU has no known peak);
- accumlab compiled at 16 x 4 >= 0.97 x its own largest single micro-batch (the sweep's k = 1);
- accumlab compiled at 16 x 4 <= 12 GiB peak (GPU only);

and accumlab compiled / plain compiled loop (both sides of the same run). A target whose sides
did not run (or failed) is printed as "unmeasured", never guessed.
"""

from __future__ import annotations

import dataclasses

FAST = "accumlab-compile"


def parse_sweep(text: str) -> list[tuple[int, int]]:
    """ "64x1,32x2" -> [(64, 1), (32, 2)] (micro-batch, accumulation steps)."""
    configs = []
    for item in text.split(","):
        micro, _, accum = item.strip().lower().partition("x")
        if not (micro.isdigit() and accum.isdigit() and int(micro) > 0 and int(accum) > 0):
            raise SystemExit(f"--sweep: {item!r} is not micro x k such as 16x4")
        configs.append((int(micro), int(accum)))
    return configs


def run_sweep(configs, sides, spec, init_state, probe, rep, run_side, corpus_blocks,
              flops_tok: float, peak: float | None, steps: int | None = None) -> list[dict]:
    """One run of every side at every micro x k; each record carries micro, accum and MFU."""
    rows = []
    rep.line()
    rep.line(f"sweep: {', '.join(f'{m}x{k}' for m, k in configs)} ({', '.join(sides)}; "
             f"{spec.warmup} warm-up + {steps or spec.steps} timed steps each)")
    for micro, accum in configs:
        config = dataclasses.replace(spec, micro=micro, accum=accum, rounds=1,
                                     steps=steps or spec.steps)
        data = corpus_blocks(spec.seq, config.total_steps * micro * accum)
        for side in sides:
            where = {"side": side, "micro": micro, "accum": accum}
            try:
                rec = run_side(side, config, init_state, data, probe)
            except Exception as e:  # an out-of-memory micro-batch keeps the other rows
                rows.append(where | {"error": f"{type(e).__name__}: {e}"})
                rep.line(f"sweep {micro}x{accum} {side}: FAILED {type(e).__name__}: {e}")
                continue
            rec |= where | {"mfu": rec["tokens_per_s"] * flops_tok / peak if peak else None}
            rows.append(rec)
            mem = f", peak {rec['peak_mem_gib']:.2f} GiB" if rec["peak_mem_gib"] else ""
            util = f", MFU {100 * rec['mfu']:.1f}%" if rec["mfu"] is not None else ""
            rep.line(f"sweep {micro:>3}x{accum:<2} {side:<17} {rec['tokens_per_s']:>11,.0f} "
                     f"tokens/s{util}{mem}, final loss {rec['final_loss']:.6f}")
    rep.data["sweep"] = rows
    return rows


def _sweep_rate(rows: list[dict], micro: int, accum: int) -> dict | None:
    return next((r for r in rows if r.get("side") == FAST and r["micro"] == micro
                 and r["accum"] == accum and "error" not in r), None)


def targets(sides: dict[str, dict], sweep: list[dict], micro: int, accum: int) -> list[dict]:
    """Each target: name, measured value (None = unmeasured), goal, met (None = unmeasured)."""
    fast, trainer, plain = sides.get(FAST), sides.get("trainer"), sides.get("plain-compile")
    out = []

    def add(name, value, goal, at_least=True):
        met = None if value is None else (value >= goal if at_least else value <= goal)
        out.append({"target": name, "measured": value, "goal": goal, "at_least": at_least,
                    "met": met})

    add("accumlab compiled / Trainer tokens/s",
        fast["tokens_per_s"] / trainer["tokens_per_s"] if fast and trainer else None, 2.5)
    add("accumlab compiled MFU", fast["mfu"] if fast else None, 0.40)
    largest = max((r for r in sweep if r.get("side") == FAST and r["accum"] == 1
                   and "error" not in r), key=lambda r: r["micro"], default=None)
    anchor = _sweep_rate(sweep, micro, accum) or fast  # the sweep's own run, else the rounds'
    add(f"{micro}x{accum} / largest single micro-batch"
        + (f" ({largest['micro']}x1)" if largest else ""),
        anchor["tokens_per_s"] / largest["tokens_per_s"] if anchor and largest else None, 0.97)
    add(f"accumlab compiled peak GiB at {micro}x{accum}",
        fast["peak_mem_gib"] if fast else None, 12.0, at_least=False)
    out.append({"target": "accumlab compiled / plain compiled loop tokens/s",
                "measured": fast["tokens_per_s"] / plain["tokens_per_s"]
                if fast and plain else None, "goal": None, "at_least": True, "met": None})
    return out


def target_lines(rows: list[dict]) -> list[str]:
    """The printed targets: measured, goal, met / not met / unmeasured."""
    lines = [f"{'target':<52} {'measured':>10} {'goal':>8}  verdict"]
    for r in rows:
        value = "unmeasured" if r["measured"] is None else (
            f"{100 * r['measured']:.1f}%" if "MFU" in r["target"] else f"{r['measured']:.3f}")
        goal = "" if r["goal"] is None else (
            ("" if r["at_least"] else "<= ") + (f"{100 * r['goal']:.0f}%" if "MFU" in r["target"]
                                                 else f"{r['goal']:g}"))
        verdict = ("unmeasured" if r["measured"] is None else "(ratio)" if r["met"] is None
                   else "met" if r["met"] else "NOT met")
        lines.append(f"{r['target']:<52} {value:>10} {goal:>8}  {verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print the table and the targets again from a (possibly partial) bench JSON file."""
    import argparse
    import json
    from pathlib import Path

    import bench_frameworks

    p = argparse.ArgumentParser(description="the table and targets of a bench_frameworks JSON")
    p.add_argument("json", help="the file bench_frameworks.py wrote (--json)")
    args = p.parse_args(argv)
    report = json.loads(Path(args.json).read_text())
    spec = report.get("spec", {})
    ok = [r for r in report.get("runs", []) if "error" not in r]
    for r in report.get("runs", []) + report.get("sweep", []):
        if "error" in r:
            print(f"failed: {r['side']} {r.get('micro', '')}x{r.get('accum', '')}: {r['error']}")
    if not ok:
        print("no finished run in the anchor rounds: every target is unmeasured")
    sides = bench_frameworks.summarise(ok, spec.get("flops_per_token", 0.0),
                                       spec.get("peak_flops")) if ok else {}
    for line in bench_frameworks.table(sides, gpu=spec.get("device") == "cuda") if sides else []:
        print(line)
    sweep = report.get("sweep", [])
    for r in sweep:
        if "error" not in r:
            mem = f"{r['peak_mem_gib']:.2f} GiB" if r.get("peak_mem_gib") else "n/a"
            util = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
            print(f"sweep {r['micro']:>3}x{r['accum']:<2} {r['side']:<17} "
                  f"{r['tokens_per_s']:>11,.0f} tokens/s  MFU {util}  peak {mem}")
    print()
    for line in target_lines(targets(sides, sweep, spec.get("micro", 16), spec.get("accum", 4))):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
