"""check_loop on loops as people write them: closures, dropped tails, float32 code, stock
models, off-by-one steps, several partial windows, and functions that hang, exit or change
global torch state (issue 16)."""

import sys
import textwrap

import pytest
import torch

from accumlab.doctor import check_loop, make_probe_model, num_items
from accumlab.engine.models import make_model


def share(model, batch, micro_batches):
    """This micro-batch's exact share of the window loss: mean loss * n_j / N."""
    return model(**batch).loss * num_items(batch) / sum(num_items(b) for b in micro_batches)


# ----------------------------------------------------------------------------- 1. closures


def closure_window(model, optimizer, micro_batches, accum_steps, *, scheduler=None,
                   max_grad_norm=None):
    """Lightning style: the last micro-batch's forward and backward run inside step(closure)."""
    for i, batch in enumerate(micro_batches):
        def closure(batch=batch):
            loss = share(model, batch, micro_batches)
            loss.backward()
            return loss

        if i < len(micro_batches) - 1:
            closure()
        else:
            def clipped(closure=closure):
                loss = closure()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                return loss

            optimizer.step(clipped)
            if scheduler is not None:
                scheduler.step()
    optimizer.zero_grad()


def closure_divided_by_k(model, optimizer, micro_batches, accum_steps):
    """Lightning's automatic optimisation arithmetic: each mean loss / k, always the full k."""
    for i, batch in enumerate(micro_batches):
        def closure(batch=batch):
            loss = model(**batch).loss / accum_steps
            loss.backward()
            return loss

        if i < len(micro_batches) - 1:
            closure()
        else:
            optimizer.step(closure)
    optimizer.zero_grad()


def test_closure_is_judged_after_it_runs():
    result = check_loop(closure_window)
    assert result.ok and result.codes == [], str(result)
    assert result.probes["clipping"]["optimizer_steps"] == 1


def test_closure_bugs_are_named():
    result = check_loop(closure_divided_by_k)
    assert result.codes == ["mean_of_means", "partial_window_scaled_by_k"], str(result)


# ----------------------------------------------------------------------------- 2. dropped tails


def drops_the_tail(model, optimizer, micro_batches, accum_steps):
    if len(micro_batches) < accum_steps:  # steps_per_epoch = len(loader) // k
        return
    for batch in micro_batches:
        share(model, batch, micro_batches).backward()
    optimizer.step()
    optimizer.zero_grad()


def computes_then_discards_the_tail(model, optimizer, micro_batches, accum_steps):
    model.zero_grad()  # a fresh window: whatever a short window left is thrown away here
    for batch in micro_batches:
        share(model, batch, micro_batches).backward()
    if len(micro_batches) == accum_steps:
        optimizer.step()


def test_dropped_tail_is_a_note_with_its_cost():
    result = check_loop(drops_the_tail)
    assert result.ok and result.codes == [], str(result)
    (note,) = result.diagnoses
    assert note.code == "partial_window_dropped" and note.severity == "note"
    assert "never trained on" in note.evidence and "up to 6 examples per epoch" in note.evidence
    assert "1 and 2 and 3" in note.evidence  # every partial length was dropped


def test_tail_computed_and_discarded_is_dropped_not_leaked():
    result = check_loop(computes_then_discards_the_tail)
    assert result.codes == [], str(result)
    assert "thrown away" in result.diagnoses[0].evidence


# ----------------------------------------------------------------------------- 3. float32 code


def float32_norm(model, optimizer, micro_batches, accum_steps, *, max_grad_norm=None):
    """Clips with a float32 norm (as fairseq does): raises on float64 gradients."""
    for batch in micro_batches:
        share(model, batch, micro_batches).backward()
    grads = [p.grad for p in model.parameters()]
    norm = torch.norm(torch.stack([torch.norm(g, p=2, dtype=torch.float32) for g in grads]))
    if max_grad_norm is not None:
        torch._foreach_mul_(grads, (max_grad_norm / (norm + 1e-6)).clamp(max=1))
    optimizer.step()
    optimizer.zero_grad()


def float32_mean_of_means(model, optimizer, micro_batches, accum_steps):
    for batch in micro_batches:
        (model(**batch).loss / accum_steps).backward()
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in model.parameters()]
    print(f"grad norm {float(torch.stack(norms).norm()):.3f}")  # logged in float32
    optimizer.step()
    optimizer.zero_grad()


def test_float32_code_is_probed_in_float32():
    result = check_loop(float32_norm)
    assert result.ok and result.precision == "float32", str(result)
    assert [d.code for d in result.diagnoses] == ["probed_in_float32"]
    assert "Double" in result.diagnoses[0].evidence and "float32" in str(result)
    assert check_loop(float32_norm, precision="float64").codes == ["function_raised"]


def test_float32_bugs_are_still_named():
    result = check_loop(float32_mean_of_means)
    assert result.precision == "float32"
    assert result.codes == ["mean_of_means", "partial_window_scaled_by_k"], str(result)


def test_correct_loop_passes_in_float32():
    result = check_loop(closure_window, precision="float32")
    assert result.ok and result.precision == "float32", str(result)


# ----------------------------------------------------------------------------- 4. not checked


def unscaled_with_clipping(model, optimizer, micro_batches, accum_steps, *, max_grad_norm=None):
    for batch in micro_batches:
        model(**batch).loss.backward()  # no / k
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad()


def scaled_up_partial_by_k(model, optimizer, micro_batches, accum_steps, *, scaler=None):
    n_full = sum(num_items(b) for b in micro_batches) * accum_steps // len(micro_batches)
    for batch in micro_batches:
        loss = model(**batch).loss * num_items(batch) / n_full
        scaler.scale(loss).backward()
    optimizer.step()  # never unscaled: every update is 1024x
    optimizer.zero_grad()


def test_probes_skipped_for_a_k_tied_scale_are_listed():
    result = check_loop(unscaled_with_clipping)
    assert result.codes[0] == "loss_not_scaled"
    assert any(line.startswith("partial windows") for line in result.not_checked), str(result)
    assert "clipping" in result.probes  # clipping runs with the scale divided out


def test_a_constant_wrong_scale_is_divided_out():
    result = check_loop(scaled_up_partial_by_k)
    assert result.codes == ["scaler_not_unscaled", "partial_window_scaled_by_k"], str(result)


# ----------------------------------------------------------------------------- 5. stock model


def hf_trainer_count(model, optimizer, micro_batches, accum_steps):
    """The Trainer's label count: shifted only if the model's loss_type says causal LM."""
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    shifts = LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss
    n = sum((b["labels"][..., 1:] if shifts else b["labels"]).ne(-100).sum()
            for b in micro_batches)
    for batch in micro_batches:
        model(**batch, num_items_in_batch=n).loss.backward()
    optimizer.step()
    model.zero_grad()


def test_probe_model_is_stock_and_make_model_is_unchanged():
    assert make_probe_model().loss_type is None
    assert make_model("gpt2", "tiny", vocab_size=64).loss_type == "ForCausalLM"
    same = make_model("gpt2", "tiny", seed=0, dtype=torch.float64, vocab_size=64,
                      max_positions=64, n_layer=1, n_embd=32, n_head=2)
    assert all(torch.equal(a, b) for a, b in zip(same.parameters(),
                                                  make_probe_model().parameters()))


def test_trainer_label_miscount_is_named_with_its_cause():
    result = check_loop(hf_trainer_count)
    assert result.codes == ["wrong_scale"], str(result)
    d = result.diagnoses[0]
    assert "0.89×" in d.title and "first label of every row" in d.title
    assert "loss_type is None" in d.evidence


# ----------------------------------------------------------------------------- 6. patterns


def step_modulo_off_by_one(model, optimizer, micro_batches, accum_steps, *, scheduler=None):
    for step, batch in enumerate(micro_batches):
        (model(**batch).loss / accum_steps).backward()
        if step % accum_steps == 0:
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()


def wrong_for_one_micro_batch(model, optimizer, micro_batches, accum_steps):
    for batch in micro_batches:
        loss = share(model, batch, micro_batches)
        (loss / accum_steps if len(micro_batches) == 1 else loss).backward()
    optimizer.step()
    optimizer.zero_grad()


def scheduler_first_window_only(model, optimizer, micro_batches, accum_steps, *, scheduler=None):
    for batch in micro_batches:
        share(model, batch, micro_batches).backward()
    optimizer.step()
    if scheduler.last_epoch == 0:  # a warm-up written to run once
        scheduler.step()
    optimizer.zero_grad()


def test_step_after_first_micro_batch_is_named():
    result = check_loop(step_modulo_off_by_one)
    assert result.codes == ["step_off_by_one"], str(result)
    assert "0.25× the gradient of micro-batch 1" in result.diagnoses[0].evidence
    assert "step % k == 0" in result.diagnoses[0].evidence


def test_partial_windows_of_several_lengths():
    result = check_loop(wrong_for_one_micro_batch)
    assert result.codes == ["partial_window_scaled_by_k"], str(result)
    assert result.diagnoses[0].probe == "partial_1"
    lengths = {name: p["micro_batches"] for name, p in result.probes.items()
               if name.startswith("partial")}
    assert lengths == {"partial": 3, "partial_1": 1, "partial_unequal": 2}
    assert "partial_1" not in check_loop(closure_window, accum_steps=2).probes  # k-1 = 1 already


def test_scheduler_is_counted_in_the_second_window():
    assert check_loop(closure_window).probes["next_window"]["scheduler_steps"] == 1
    result = check_loop(scheduler_first_window_only)
    assert result.codes == ["scheduler_not_stepped"], str(result)
    assert result.diagnoses[0].probe == "next_window"
    assert "second window" in result.diagnoses[0].title


# ----------------------------------------------------------------------------- 7. never hang


def forever(model, optimizer, micro_batches, accum_steps):
    while True:
        pass


def hangs_on_short_windows(model, optimizer, micro_batches, accum_steps):
    done = 0
    while done < accum_steps:  # waits for k micro-batches that never come
        if done < len(micro_batches):
            share(model, micro_batches[done], micro_batches).backward()
        done += done < len(micro_batches)
    optimizer.step()
    optimizer.zero_grad()


def exits(model, optimizer, micro_batches, accum_steps):
    sys.exit(3)


def interrupts(model, optimizer, micro_batches, accum_steps):
    raise KeyboardInterrupt


def changes_torch_state(model, optimizer, micro_batches, accum_steps):
    for batch in micro_batches:
        share(model, batch, micro_batches).backward()
    optimizer.step()
    optimizer.zero_grad()
    torch.set_grad_enabled(False)
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)


@pytest.mark.parametrize("isolate", ["fork", "thread"])
def test_endless_loop_times_out(isolate):
    result = check_loop(forever, timeout=1.5, isolate=isolate)
    assert result.codes == ["timed_out"] and "1.5 s" in result.diagnoses[0].title, str(result)


def test_timeout_keeps_what_was_found_before():
    result = check_loop(hangs_on_short_windows, timeout=2)
    assert result.codes == ["timed_out"], str(result)
    assert result.diagnoses[0].probe == "partial" and "equal" in result.probes
    assert any("partial" in line for line in result.not_checked)


@pytest.mark.parametrize("isolate", ["fork", "thread"])
def test_exit_and_interrupt_are_reported_not_raised(isolate):
    for fn, words in ((exits, "sys.exit(3)"), (interrupts, "KeyboardInterrupt")):
        result = check_loop(fn, isolate=isolate)
        assert result.codes == ["function_raised"] and words in result.diagnoses[0].title


def test_global_torch_state_is_restored():
    before = (torch.is_grad_enabled(), torch.get_default_dtype(), torch.get_num_threads())
    result = check_loop(changes_torch_state, isolate="thread")
    assert result.ok, str(result)
    assert (torch.is_grad_enabled(), torch.get_default_dtype(),
            torch.get_num_threads()) == before


def test_cli_says_it_imports_and_stops_an_endless_loop(tmp_path, capsys):
    from accumlab.cli.main import main

    src = tmp_path / "loop.py"
    src.write_text(textwrap.dedent("""
        def forever(model, optimizer, micro_batches, accum_steps):
            while True:
                pass
    """))
    assert main(["check", f"{src}:forever", "--timeout", "1.5"]) == 1
    captured = capsys.readouterr()
    assert "its top-level code runs" in captured.out and "timed_out" in captured.out
    assert "did not finish within 1.5 s" in captured.err
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "FILE is imported: its top-level code runs" in help_text and "--timeout" in help_text
    hang = tmp_path / "hang.py"
    hang.write_text("while True:\n    pass\n")
    assert main(["check", f"{hang}:f", "--timeout", "1"]) == 2
    assert "top-level code does not finish" in capsys.readouterr().err
