"""check_loop: buggy accumulation loops are each named correctly, correct ones pass."""

import contextlib
import textwrap

import pytest
import torch

import accumlab
from accumlab.doctor import check_loop, num_items

# ----------------------------------------------------------------------------- correct loops


def plain(model, optimizer, micro_batches, accum_steps, *, scheduler=None, max_grad_norm=None):
    """The textbook loop, token-weighted: each mean loss times its share n_j / N of tokens."""
    n = sum(num_items(b) for b in micro_batches)
    for batch in micro_batches:
        (model(**batch).loss * num_items(batch) / n).backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad()


class TinyAccelerator:
    """An Accelerate-like object: `accumulate` decides when step/zero_grad really happen."""

    def __init__(self, optimizer, scheduler, n_items):
        self.optimizer, self.scheduler, self.n_items = optimizer, scheduler, n_items
        self.sync_gradients = False

    @contextlib.contextmanager
    def accumulate(self, last):
        self.sync_gradients = last
        yield

    def backward(self, loss):
        loss.backward()

    def step(self, max_grad_norm, params):
        if not self.sync_gradients:
            return
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad()


def context_manager(model, optimizer, micro_batches, accum_steps, *, scheduler=None,
                    loss_fn=None, max_grad_norm=None):
    """Accelerate style: every call inside `with acc.accumulate(...)`; token-normalised."""
    n = sum(num_items(b) for b in micro_batches)
    acc = TinyAccelerator(optimizer, scheduler, n)
    for i, batch in enumerate(micro_batches):
        with acc.accumulate(last=i == len(micro_batches) - 1):
            acc.backward(loss_fn(model, batch, reduction="sum") / n)
            acc.step(max_grad_norm, model.parameters())


def with_scaler(model, optimizer, micro_batches, accum_steps, *, scheduler=None, scaler=None,
                loss_fn=None, max_grad_norm=None):
    """AMP style: scale, unscale once, clip, scaler.step, update, once per window."""
    n = sum(num_items(b) for b in micro_batches)
    for batch in micro_batches:
        loss = loss_fn(model, batch, reduction="sum") / n
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def token_normalised(model, optimizer, micro_batches, accum_steps, **kw):
    """HF-Trainer style: count label tokens first, zero_grad at the start, return L_W."""
    model.zero_grad()
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
    logged = 0.0
    for batch in micro_batches:
        logits = model(input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum") / n
        loss.backward()
        logged += loss.item()
    if kw.get("max_grad_norm") is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), kw["max_grad_norm"])
    optimizer.step()
    if kw.get("scheduler") is not None:
        kw["scheduler"].step()
    return logged


def deferred(model, optimizer, micro_batches, accum_steps):
    """Correct but memory-hungry: one backward on the summed token losses."""
    n = sum(num_items(b) for b in micro_batches)
    total = sum(model(**b).loss * num_items(b) for b in micro_batches) / n
    total.backward()
    optimizer.step()
    optimizer.zero_grad()


CORRECT = [plain, context_manager, with_scaler, token_normalised]


@pytest.mark.parametrize("fn", CORRECT, ids=lambda f: f.__name__)
def test_correct_loops_pass(fn):
    result = check_loop(fn)
    assert result.ok, str(result)
    assert result.codes == []
    assert "correct" in str(result)


def test_deferred_backward_is_correct_with_a_note():
    result = check_loop(deferred)
    assert result.ok, str(result)
    assert [d.code for d in result.diagnoses] == ["deferred_backward"]
    assert "memory" in result.diagnoses[0].evidence


# ----------------------------------------------------------------------------- buggy loops
# Each is token-weighted (so correct) except for the one bug it is named after.


def share(model, batch, micro_batches):
    """This micro-batch's exact share of the window loss: mean loss * n_j / N."""
    return model(**batch).loss * num_items(batch) / sum(num_items(b) for b in micro_batches)



def no_division(model, optimizer, micro_batches, accum_steps):
    for batch in micro_batches:
        model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def divided_twice(model, optimizer, micro_batches, accum_steps):
    for batch in micro_batches:
        (model(**batch).loss / accum_steps / accum_steps).backward()
    optimizer.step()
    optimizer.zero_grad()


def zero_grad_inside(model, optimizer, micro_batches, accum_steps):
    for batch in micro_batches:
        optimizer.zero_grad()
        (model(**batch).loss / accum_steps).backward()
    optimizer.step()


def model_zero_grad_inside(model, optimizer, micro_batches, accum_steps):
    for batch in micro_batches:
        model.zero_grad()
        model(**batch).loss.backward()
    optimizer.step()


def no_backward(model, optimizer, micro_batches, accum_steps):
    for batch in micro_batches:
        loss = model(**batch).loss / accum_steps  # noqa: F841  (never backpropagated)
    optimizer.step()
    optimizer.zero_grad()


def step_every_micro_batch(model, optimizer, micro_batches, accum_steps):
    for batch in micro_batches:
        (model(**batch).loss / accum_steps).backward()
        optimizer.step()
        optimizer.zero_grad()


def scheduler_every_micro_batch(model, optimizer, micro_batches, accum_steps, *, scheduler=None):
    for batch in micro_batches:
        share(model, batch, micro_batches).backward()
        if scheduler is not None:
            scheduler.step()
    optimizer.step()
    optimizer.zero_grad()


def clip_per_micro_batch(model, optimizer, micro_batches, accum_steps, *, max_grad_norm=None):
    for batch in micro_batches:
        share(model, batch, micro_batches).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()


def clip_before_last(model, optimizer, micro_batches, accum_steps, *, max_grad_norm=None):
    for i, batch in enumerate(micro_batches):
        if i == len(micro_batches) - 1 and max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        share(model, batch, micro_batches).backward()
    optimizer.step()
    optimizer.zero_grad()


def mean_of_means(model, optimizer, micro_batches, accum_steps):
    for batch in micro_batches:
        (model(**batch).loss / accum_steps).backward()
    optimizer.step()
    optimizer.zero_grad()


def partial_divided_by_k(model, optimizer, micro_batches, accum_steps, *, loss_fn=None):
    n_per_full_window = sum(num_items(b) for b in micro_batches) * accum_steps \
        // len(micro_batches)  # assumes every window is full
    for batch in micro_batches:
        (loss_fn(model, batch, reduction="sum") / n_per_full_window).backward()
    optimizer.step()
    optimizer.zero_grad()


def partial_not_stepped(model, optimizer, micro_batches, accum_steps):
    for i, batch in enumerate(micro_batches):
        share(model, batch, micro_batches).backward()
        if (i + 1) % accum_steps == 0:
            optimizer.step()
            optimizer.zero_grad()


def item_accumulated(model, optimizer, micro_batches, accum_steps):
    total = torch.zeros((), dtype=torch.float64, requires_grad=True)
    for batch in micro_batches:
        total = total + model(**batch).loss.item() / accum_steps  # a float: the graph is cut
    total.backward()
    optimizer.step()
    optimizer.zero_grad()


def detached_sum(model, optimizer, micro_batches, accum_steps):
    total = 0
    for batch in micro_batches:
        total = total + model(**batch).loss.detach()
    (total / accum_steps).backward()
    optimizer.step()
    optimizer.zero_grad()


def scaler_not_unscaled(model, optimizer, micro_batches, accum_steps, *, scaler=None):
    for batch in micro_batches:
        loss = share(model, batch, micro_batches)
        (scaler.scale(loss) if scaler is not None else loss).backward()
    optimizer.step()  # should be scaler.step(optimizer); scaler.update()
    optimizer.zero_grad()


def never_zeroed(model, optimizer, micro_batches, accum_steps):
    for batch in micro_batches:
        share(model, batch, micro_batches).backward()
    optimizer.step()


def scheduler_forgotten(model, optimizer, micro_batches, accum_steps, *, scheduler=None):
    for batch in micro_batches:
        share(model, batch, micro_batches).backward()
    optimizer.step()
    optimizer.zero_grad()


def never_steps(model, optimizer, micro_batches, accum_steps):
    for batch in micro_batches:
        share(model, batch, micro_batches).backward()
    optimizer.zero_grad()


def counts_unshifted(model, optimizer, micro_batches, accum_steps):
    n = sum(int((b["labels"] != -100).sum()) for b in micro_batches)  # transformers PR #46204
    for batch in micro_batches:
        (model(**batch).loss * num_items(batch) / n).backward()
    optimizer.step()
    optimizer.zero_grad()


def clip_ignored(model, optimizer, micro_batches, accum_steps, *, max_grad_norm=None):
    for batch in micro_batches:
        share(model, batch, micro_batches).backward()
    optimizer.step()
    optimizer.zero_grad()


def per_sequence_mean(model, optimizer, micro_batches, accum_steps, *, loss_fn=None):
    rows = sum(b["input_ids"].shape[0] for b in micro_batches)
    for batch in micro_batches:  # every sequence weighs the same, not every token
        for i in range(batch["input_ids"].shape[0]):
            one = {key: t[i:i + 1] for key, t in batch.items()}
            (loss_fn(model, one) / rows).backward()
    optimizer.step()
    optimizer.zero_grad()


BUGGY = [
    (no_division, "loss_not_scaled"),
    (divided_twice, "loss_scaled_twice"),
    (zero_grad_inside, "zero_grad_inside_window"),
    (model_zero_grad_inside, "zero_grad_inside_window"),
    (no_backward, "no_backward"),
    (step_every_micro_batch, "step_every_micro_batch"),
    (scheduler_every_micro_batch, "scheduler_every_micro_batch"),
    (clip_per_micro_batch, "clip_per_micro_batch"),
    (clip_before_last, "clip_per_micro_batch"),
    (mean_of_means, "mean_of_means"),
    (partial_divided_by_k, "partial_window_scaled_by_k"),
    (partial_not_stepped, "partial_window_not_stepped"),
    (item_accumulated, "detached_loss"),
    (detached_sum, "detached_loss"),
    (scaler_not_unscaled, "scaler_not_unscaled"),
    (never_zeroed, "zero_grad_missing"),
    (scheduler_forgotten, "scheduler_not_stepped"),
    (never_steps, "no_optimizer_step"),
    (counts_unshifted, "wrong_scale"),
    (clip_ignored, "clip_missing"),
    (per_sequence_mean, "update_differs"),
]


@pytest.mark.parametrize("fn,code", BUGGY, ids=[f.__name__ for f, _ in BUGGY])
def test_buggy_loops_are_named(fn, code):
    result = check_loop(fn)
    assert not result.ok
    assert result.codes[0] == code, str(result)
    assert result.diagnoses[0].evidence


def test_scale_is_reported_as_a_ratio():
    result = check_loop(no_division, accum_steps=4)
    assert result.diagnoses[0].title.startswith("your update is 4.00× the exact one: the loss "
                                                "is not divided by the number of accumulation")
    assert check_loop(no_division, accum_steps=3).diagnoses[0].title.startswith(
        "your update is 3.00×")


def test_zero_grad_inside_names_the_erasure():
    d = check_loop(zero_grad_inside).diagnoses[0]
    assert "last micro-batch" in d.title and "0.25×" in d.evidence


def test_mean_of_means_evidence_lists_token_counts():
    d = check_loop(mean_of_means).diagnoses[0]
    assert "n_j = [" in d.evidence and "%" in d.evidence


def test_function_that_raises_is_reported():
    def broken(model, optimizer, micro_batches, accum_steps):
        raise KeyError("input_ids")

    result = check_loop(broken)
    assert result.codes == ["function_raised"] and "KeyError" in result.diagnoses[0].evidence


def test_logged_loss_warning_does_not_fail():
    def logs_last(model, optimizer, micro_batches, accum_steps):
        for batch in micro_batches:
            last = model(**batch).loss
            (last * num_items(batch) / sum(num_items(b) for b in micro_batches)).backward()
        optimizer.step()
        optimizer.zero_grad()
        return last.item()

    result = check_loop(logs_last)
    assert result.ok
    assert [d.code for d in result.diagnoses] == ["logged_loss_wrong"]
    assert "last micro-batch" in result.diagnoses[0].evidence


def test_result_renders_and_global_state_is_restored():
    before = torch.random.get_rng_state()
    backward = torch.autograd.backward
    for isolate in ("thread", "fork"):  # in the caller's process, and in a child
        result = check_loop(no_division, isolate=isolate)
        assert torch.equal(before, torch.random.get_rng_state())
        assert torch.autograd.backward is backward
    assert "loss_not_scaled" in result._repr_html_() and "not_checked" not in repr(result)
    assert accumlab.check_loop is check_loop
    with pytest.raises(ValueError):
        check_loop(plain, accum_steps=1)


def test_cli_check(tmp_path, capsys):
    src = tmp_path / "loop.py"
    src.write_text(textwrap.dedent("""
        def good(model, optimizer, micro_batches, accum_steps):
            n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches)
            for b in micro_batches:
                (model(**b).loss * int((b["labels"][:, 1:] != -100).sum()) / n).backward()
            optimizer.step()
            optimizer.zero_grad()

        def bad(model, optimizer, micro_batches, accum_steps):
            for b in micro_batches:
                model(**b).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    """))
    from accumlab.cli import main

    assert main(["check", f"{src}:good"]) == 0
    assert "correct" in capsys.readouterr().out
    assert main(["check", f"{src}:nope"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["check", f"{src}:bad", "--accum-steps", "3"]) == 1
    assert "your update is 3.00×" in capsys.readouterr().out
    assert main(["check", str(src)]) == 2  # no :function
    assert "file.py:function" in capsys.readouterr().err


# ----------------------------------------------------------------------------- lengths helpers


def test_lengths_helpers(lm_data):
    from accumlab.data import packing
    from accumlab.lab import lengths

    stats = packing.padding_stats([3, 5, 2, 2], 2)
    assert stats == {"real_tokens": 12, "padded_tokens": 14, "padding_fraction": 1 - 12 / 14}
    packed = packing.pack_examples(lm_data, 16)
    assert packed and all(len(p["input_ids"]) == 16 for p in packed)
    flat = [t for e in lm_data for t in e["input_ids"]]
    assert packed[1]["input_ids"] == flat[16:32]
    near = lengths.skewed_sample(lm_data, 0.0, 8)
    wide = lengths.skewed_sample(lm_data, 1.0, 8)
    spread = [max(len(e["input_ids"]) for e in s) - min(len(e["input_ids"]) for e in s)
              for s in (near, wide)]
    assert spread[0] < spread[1]
    w = lengths.token_weights([30, 10])
    assert w["exact"] == [1 / 40, 1 / 40] and w["mean_of_means"] == [1 / 60, 1 / 20]
    with pytest.raises(ValueError):
        lengths.skewed_sample(lm_data, 1.5, 4)
