"""Run under torchrun by test_distributed.py: ranks that disagree or freeze must not hang.

One launch, two faults in turn (each rank writes the error it stopped with to OUT/<fault>-<R>):
    lengths   rank 1 holds 40 examples, rank 0 holds 48: both must stop at the start
    freeze    rank 1 stops answering after step 2: rank 0 must time out (collective timeout 3 s)
"""

import os
import sys
import time
from pathlib import Path

from helpers import random_lm_data

import accumlab
from accumlab.engine.models import make_model


def run(out_dir: str, fault: str, rank: int) -> None:
    n = 40 if fault == "lengths" and rank == 1 else 48
    callbacks = []
    if fault == "freeze" and rank == 1:
        callbacks = [lambda entry: time.sleep(120) if entry["step"] == 2 else None]
    try:
        cfg = accumlab.TrainConfig(micro_batch_size=2, accum_steps=2, max_steps=4,
                                   shuffle=False, progress=False, collective_timeout_s=3)
        accumlab.train(make_model("gpt2", "tiny"), random_lm_data(n, seed=40), cfg,
                       callbacks=callbacks)
        said = "finished"
    except Exception as e:
        said = f"{type(e).__name__}: {e}"
    Path(out_dir, f"{fault}-{rank}").write_text(said)


if __name__ == "__main__":
    rank = int(os.environ["RANK"])
    run(sys.argv[1], "lengths", rank)
    run(sys.argv[1], "freeze", rank)
    sys.exit(1)  # rank 1 never gets here: torchrun ends it once rank 0 has stopped
