"""The compiled fast path (`TrainConfig(compile=True)`), proven on CPU.

1. one compiled region per micro-batch: no graph break for GPT-2, BERT and a Llama-style model,
   and no recompilation across windows (lengths that vary, a short last micro-batch and a short
   last window);
2. no host read of a tensor inside a window, and one (L_W and the norm together) in its step;
3. the fused output layer + cross-entropy: the gradient of the unfused loss in float64, and the
   whole logits are never saved nor live at once.

Compiling on a CPU is slow, so the models have one layer and the sequences are short; only one
test runs inductor, the others dynamo with the "aot_eager" backend (same graphs and guards).
CUDA tests at the end (skipped without a GPU) repeat the sync check with CUDA's own detector.
"""

import contextlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import params_vector, random_cls_data, random_lm_data, rel_diff
from torch._dynamo.testing import CompileCounterWithBackend

import accumlab
from accumlab.engine import compiled
from accumlab.engine.fused_loss import chunks_for, linear_cross_entropy
from accumlab.engine.losses import summed_loss
from accumlab.engine.models import make_model
from accumlab.engine.window import Accumulator, Window

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    model.accumlab_task = "causal_lm"
    return model


BUILDERS = {
    "gpt2": lambda dtype=torch.float32: make_model("gpt2", "tiny", n_layer=1, dtype=dtype,
                                                   vocab_size=512),
    "llama": _llama,
    "bert_mlm": lambda dtype=torch.float32: make_model("bert", "tiny", task="masked_lm",
                                                       num_hidden_layers=1, dtype=dtype,
                                                       vocab_size=512),
    "bert_cls": lambda dtype=torch.float32: make_model("bert", "tiny", num_hidden_layers=1,
                                                       dtype=dtype, vocab_size=512),
}
TASKS = {"gpt2": "causal_lm", "llama": "causal_lm", "bert_mlm": "masked_lm",
         "bert_cls": "classification"}


def _batch(task, rows=3, length=13, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length - 4:] = 0  # one padded row
    ids[0, length - 4:] = 1
    if task == "classification":
        labels = torch.randint(0, 2, (rows,), generator=g)
    else:
        labels = ids.masked_fill(mask == 0, -100)
        if task == "masked_lm":
            labels = labels.masked_fill(torch.rand(ids.shape, generator=g) < 0.6, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------- 3. the fused loss


@pytest.mark.parametrize("chunks", [1, 3, 7, 64])
def test_fused_loss_has_the_unfused_value_and_gradient_in_float64(chunks):
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(101, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 101, (37,))
    y[::5] = -100
    ref = F.cross_entropy(h @ w.T + b, y, ignore_index=-100, reduction="sum")
    grads_ref = torch.autograd.grad(ref / 7, (h, w, b))
    out = linear_cross_entropy(h, w, y, b, chunks=chunks)
    grads = torch.autograd.grad(out / 7, (h, w, b))
    assert out.dtype == torch.float64
    assert abs(float(out - ref)) <= 1e-14 * abs(float(ref))  # measured: 0.0
    for g, r in zip(grads, grads_ref):
        assert rel_diff(g, r) < 1e-14  # measured: 3e-16 .. 5e-16


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert_mlm"])
def test_fused_micro_step_gives_every_parameter_the_unfused_gradient_in_float64(name):
    model = BUILDERS[name](torch.float64)
    task = TASKS[name]
    batch = _batch(task)
    step = compiled.MicroStep(model, model, task, contextlib.nullcontext, compile=True,
                              rows=3, max_length=16)
    assert step.fused
    ref = summed_loss(model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits,
                      batch["labels"], task)
    grads_ref = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = step._fused_sum(inputs, batch["labels"])  # the function the region compiles
    grads = torch.autograd.grad(out, list(model.parameters()), allow_unused=True)
    assert abs(float(out - ref)) < 1e-13 * abs(float(ref))
    pairs = [(g, r) for g, r in zip(grads, grads_ref) if r is not None]
    assert len(pairs) == len(grads_ref) - grads_ref.count(None) and all(g is not None
                                                                         for g, _ in pairs)
    whole = torch.cat([r.flatten() for _, r in pairs]).norm()
    assert rel_diff(torch.cat([g.flatten() for g, _ in pairs]),
                    torch.cat([r.flatten() for _, r in pairs])) < 1e-13
    for g, r in pairs:  # each parameter (a key bias's gradient is 0 up to rounding, 1e-19)
        assert (g - r).norm() < 1e-12 * max(float(r.norm()), 1e-6 * float(whole))


def test_bf16_fused_loss_is_as_accurate_as_the_unfused_one():
    torch.manual_seed(1)
    h = torch.randn(64, 32)
    w = torch.randn(300, 32) / 4
    y = torch.randint(0, 300, (64,))
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    exact = torch.autograd.grad(F.cross_entropy(hd @ wd.T, y, reduction="sum"), (hd, wd))
    errors = {}
    for how in ("unfused", "fused"):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (F.cross_entropy((hh @ ww.T).float(), y, reduction="sum") if how == "unfused"
                    else linear_cross_entropy(hh, ww, y, chunks=4))
        grads = torch.autograd.grad(loss, (hh, ww))
        assert all(g.dtype == torch.float32 for g in grads)
        errors[how] = [rel_diff(g.double(), e) for g, e in zip(grads, exact)]
    for fused, unfused in zip(errors["fused"], errors["unfused"]):
        assert fused < 2 * unfused + 1e-3, errors  # bf16 rounding, no worse than unfused


def test_the_whole_logits_are_never_saved_for_backward():
    model = BUILDERS["gpt2"]()
    batch = _batch("causal_lm", rows=4, length=64)
    vocab, positions = 512, 4 * 63  # the weight's gradient (vocab x 64) is saved, no logits
    step = compiled.MicroStep(model, model, "causal_lm", contextlib.nullcontext, compile=True,
                              rows=4, max_length=64)
    saved = {"fused": [], "unfused": []}  # shapes of what autograd keeps for the backward
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    for how in saved:
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t, how=how: saved[how].append(tuple(t.shape)) or t.detach(), lambda t: t):
            if how == "fused":
                step._fused_sum(inputs, batch["labels"])
            else:
                summed_loss(model(**inputs).logits, batch["labels"], "causal_lm")
    per_position = [s for s in saved["unfused"] if s and s[-1] == vocab]
    assert max(math.prod(s) for s in per_position) >= positions * vocab  # the whole logits
    assert [s for s in saved["fused"] if s and s[-1] == vocab] == []  # no logits at all
    assert (vocab, 64) in saved["fused"]  # what it keeps instead: the weight's gradient


def test_peak_memory_of_the_fused_loss_stays_below_one_copy_of_the_logits():
    from accumlab.lab.memory.measure import peak_of_memory_events

    torch.manual_seed(2)
    rows, width, vocab = 512, 32, 4096
    logits_bytes = rows * vocab * 4  # 8 MiB of float32
    peaks = {}
    for how in ("unfused", "fused"):
        h = torch.randn(rows, width, requires_grad=True)
        w = torch.randn(vocab, width, requires_grad=True)
        y = torch.randint(0, vocab, (rows,))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            if how == "fused":
                loss = linear_cross_entropy(h, w, y, chunks=16)
            else:
                loss = F.cross_entropy(h @ w.T, y, reduction="sum")
            loss.backward()
        peaks[how] = peak_of_memory_events(prof)
    assert peaks["unfused"] >= logits_bytes, peaks  # logits + their gradient
    assert peaks["fused"] < logits_bytes / 2, peaks  # one chunk at a time (+ grad of w)


def test_compiled_micro_step_peak_stays_below_one_copy_of_the_logits():
    """Under inductor (the real compiler), forward + backward of a whole micro-batch: the peak
    of live tensors, model activations included, is below one float32 copy of its logits.
    Measured: 29.6 MiB against 63.8 MiB (the compiled unfused loss: 138 MiB)."""
    from accumlab.lab.memory.measure import peak_of_memory_events, quiet_stderr

    torch._dynamo.reset()
    vocab, rows, length = 8192, 8, 256
    model = make_model("gpt2", "tiny", n_layer=1, vocab_size=vocab, max_positions=length)
    ids = torch.randint(2, vocab, (rows, length), generator=torch.Generator().manual_seed(0))
    step = compiled.MicroStep(model, model, "causal_lm", contextlib.nullcontext, compile=True,
                              rows=rows, max_length=length)
    step.chunks = 8
    region = torch.compile(step._fused_sum, backend="inductor")
    for _ in range(2):  # the first call compiles
        model.zero_grad(set_to_none=True)
        with quiet_stderr(), torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            region({"input_ids": ids}, ids).backward()
    assert peak_of_memory_events(prof) < rows * (length - 1) * vocab * 4


def test_chunks_keep_one_chunk_of_float32_logits_under_the_budget():
    assert chunks_for(16 * 1024, 50257) == 13  # GPT-2 small, 16 x 1024: chunks of 1261
    assert chunks_for(10, 512) == 1
    assert chunks_for(16 * 1024, 50257, budget_bytes=2**40) == 1


# ---------------------------------------------------------------- 1. one region, no recompiles


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert_mlm", "bert_cls"])
def test_one_graph_and_no_graph_break_per_micro_batch(name):
    torch._dynamo.reset()
    model = BUILDERS[name]()
    task = TASKS[name]
    step = compiled.MicroStep(model, model, task, contextlib.nullcontext, compile=True,
                              rows=3, max_length=16)
    batch = step.prepare(_batch(task))
    labels = batch.pop("labels")
    compiled.mark_dynamic(batch, labels)
    fn = step._fused_sum if step.fused else step._logits_sum
    assert step.fused == (name != "bert_cls")
    explained = torch._dynamo.explain(fn)(batch, labels)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _train_compiled(backend, data, **overrides):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    old, compiled.BACKEND = compiled.BACKEND, counter
    try:
        model = make_model("gpt2", "tiny", n_layer=1)
        settings = dict(micro_batch_size=5, accum_steps=2, epochs=2, lr=1e-3, compile=True,
                        progress=False, device="cpu", clip_grad_norm=1.0)
        settings.update(overrides)
        result = accumlab.train(model, data, accumlab.TrainConfig(**settings))
    finally:
        compiled.BACKEND = old
    return model, result, counter


def test_no_recompilation_across_windows_with_inductor():
    """23 examples of 5..29 tokens, micro 5 x k 2: windows of 2, 2 and 1 micro-batches, the
    last micro-batch has 3 rows; shuffled, so every window has other lengths. One graph."""
    data = random_lm_data(23, seed=3, min_len=5, max_len=30)
    model, result, counter = _train_compiled("inductor", data)
    assert result.steps == 6 and [r["micro_batches"] for r in result.history] == [2, 2, 1] * 2
    assert len({r["seq_len"] for r in result.history}) > 1
    assert counter.frame_count == 1  # one graph, compiled once: no break, no recompile
    eager = make_model("gpt2", "tiny", n_layer=1)
    cfg = accumlab.TrainConfig(micro_batch_size=5, accum_steps=2, epochs=2, lr=1e-3,
                               progress=False, device="cpu", clip_grad_norm=1.0)
    reference = accumlab.train(eager, data, cfg)
    for a, b in zip(result.losses, reference.losses):
        assert abs(a - b) < 1e-5 * b
    assert rel_diff(params_vector(model), params_vector(eager)) < 1e-5  # measured 1.4e-6


def test_compiled_training_is_exact_in_float64():
    data = random_lm_data(23, seed=4, min_len=5, max_len=30, vocab=4096)
    model, result, counter = _train_compiled("aot_eager", data, precision="fp64", epochs=1)
    assert counter.frame_count == 1
    eager = make_model("gpt2", "tiny", n_layer=1)
    cfg = accumlab.TrainConfig(micro_batch_size=5, accum_steps=2, epochs=1, lr=1e-3,
                               progress=False, device="cpu", clip_grad_norm=1.0,
                               precision="fp64")
    accumlab.train(eager, data, cfg)
    assert rel_diff(params_vector(model), params_vector(eager)) < 1e-12


def _mlm_data(n, seed):
    data = random_lm_data(n, seed=seed, min_len=5, max_len=30, vocab=512)
    g = torch.Generator().manual_seed(seed)
    for d in data:
        d["labels"] = [t if float(torch.rand(1, generator=g)) < 0.3 else -100
                       for t in d["input_ids"]]
    return data


def _packed_data():
    from accumlab.data.packing import pack_documents

    return pack_documents(random_lm_data(40, seed=1, min_len=3, max_len=20, vocab=512), 32)


@pytest.mark.parametrize("case", ["packed", "classification", "samples", "masked_lm", "llama"])
def test_compiled_training_equals_eager_in_float64_for_every_kind_of_data(case):
    """Packed rows (4-D mask, position_ids), BERT classification (the logits path), samples
    normalisation (the logits path), masked LM and a Llama-style model (the fused path), with
    varying lengths, a short micro-batch and a short window: one graph, the same weights."""
    build, data, extra = {
        "packed": (BUILDERS["gpt2"], _packed_data(), {}),
        "classification": (lambda: make_model("bert", "tiny", num_hidden_layers=1,
                                              num_labels=3), random_cls_data(23, seed=2), {}),
        "samples": (BUILDERS["gpt2"], random_lm_data(23, seed=3, min_len=5, max_len=30,
                                                     vocab=512),
                    {"loss_normalization": "samples"}),
        "masked_lm": (BUILDERS["bert_mlm"], _mlm_data(23, 4), {}),
        "llama": (_llama, random_lm_data(23, seed=5, min_len=5, max_len=30, vocab=512), {}),
    }[case]
    finals = []
    for compile in (True, False):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        old, compiled.BACKEND = compiled.BACKEND, counter
        try:
            model = build()
            cfg = accumlab.TrainConfig(micro_batch_size=5, accum_steps=2, epochs=1, lr=1e-3,
                                       compile=compile, progress=False, device="cpu",
                                       precision="fp64", **extra)
            accumlab.train(model, data, cfg)
        finally:
            compiled.BACKEND = old
        finals.append(params_vector(model))
        assert counter.frame_count == (1 if compile else 0)
    assert rel_diff(finals[0], finals[1]) < 1e-13  # measured 6e-17 .. 1.7e-15


def test_padding_rows_and_lengths_changes_nothing():
    batch = _batch("causal_lm", rows=3, length=13)
    padded = compiled.pad_rows(compiled.pad_length(batch, 8, 1), 5, 1)
    assert padded["input_ids"].shape == (5, 16) and padded["labels"].shape == (5, 16)
    assert (padded["labels"][3:] == -100).all() and (padded["labels"][:, 13:] == -100).all()
    assert (padded["attention_mask"][3:] == 1).all()  # padding rows attend to their own tokens
    assert (padded["attention_mask"][:3, 13:] == 0).all()
    model = BUILDERS["gpt2"](torch.float64)

    def loss_of(b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        return summed_loss(logits, b["labels"], "causal_lm")

    assert abs(float(loss_of(padded) - loss_of(batch))) < 1e-12 * float(loss_of(batch))


# ---------------------------------------------------------------- 2. host reads in a window

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy",
         "nonzero")


@contextlib.contextmanager
def host_reads():
    """Count Python-level reads of tensor values (what makes a GPU wait for its queue)."""
    reads: list[str] = []
    saved = {}

    def counting(name, original):
        def read(self, *args, **kwargs):
            if not torch.compiler.is_compiling():
                reads.append(name)
            return original(self, *args, **kwargs)
        return read

    for name in READS:
        saved[name] = torch.Tensor.__dict__.get(name)
        setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    try:
        yield reads
    finally:
        for name, original in saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)


@contextlib.contextmanager
def reads_per_window(monkeypatch):
    """Wrap Window.__iter__ (the micro-batches and whatever the loop does between them) and
    Window.step in counters; yields [(reads inside the micro-batches, reads in step)]."""
    per_window = []
    original_iter, original_step = Window.__iter__, Window.step

    def counted_iter(self):
        with host_reads() as reads:
            yield from original_iter(self)
        per_window.append([list(reads), None])

    def counted_step(self):
        with host_reads() as reads:
            record = original_step(self)
        per_window[-1][1] = list(reads)
        return record

    monkeypatch.setattr(Window, "__iter__", counted_iter)
    monkeypatch.setattr(Window, "step", counted_step)
    yield per_window


def test_the_counter_sees_a_host_read():
    x = torch.ones(3)
    with host_reads() as reads:
        float(x.sum()), x.tolist(), bool(x[0]), x[1].item()
    assert reads == ["__float__", "tolist", "__bool__", "item"]
    assert "item" not in torch.Tensor.__dict__ or torch.Tensor.item is not None


def test_no_host_read_inside_a_compiled_window_and_one_in_its_step(monkeypatch):
    data = random_lm_data(23, seed=5, min_len=5, max_len=30)
    with reads_per_window(monkeypatch) as per_window:
        _, result, counter = _train_compiled("aot_eager", data, optimizer="sgd")
    assert counter.frame_count == 1 and len(per_window) == 6
    for inside, in_step in per_window[1:]:  # window 1 compiles
        assert inside == [], inside
        assert in_step == ["tolist"], in_step  # L_W and the gradient norm, read together


def test_the_eager_window_does_read_the_host(monkeypatch):
    """The counter can fail: without compile, transformers checks the padding mask on the host
    (`masking_utils.fast_all`) in every forward."""
    data = random_lm_data(23, seed=5, min_len=5, max_len=30)
    model = make_model("gpt2", "tiny", n_layer=1)
    cfg = accumlab.TrainConfig(micro_batch_size=5, accum_steps=2, epochs=1, lr=1e-3,
                               optimizer="sgd", progress=False, device="cpu")
    with reads_per_window(monkeypatch) as per_window:
        accumlab.train(model, data, cfg)
    assert all(len(inside) >= len_window for (inside, _), len_window
               in zip(per_window, (2, 2, 1))), per_window


def test_fused_adamw_window_reads_the_host_once(monkeypatch):
    """Fused AdamW (on CPU too) skips a non-finite step on device: no read before it."""
    torch._dynamo.reset()
    old, compiled.BACKEND = compiled.BACKEND, "aot_eager"
    try:
        model = make_model("gpt2", "tiny", n_layer=1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        acc = Accumulator(model, opt, 2, task="causal_lm", clip_grad_norm=1.0)
        step = compiled.MicroStep(model, model, "causal_lm", contextlib.nullcontext,
                                  compile=True, rows=4, max_length=32)
        from accumlab.engine.collate import pad_collate

        data = random_lm_data(16, seed=6, min_len=5, max_len=30)
        batches = [pad_collate(data[i:i + 4], 1) for i in range(0, 16, 4)]
        with reads_per_window(monkeypatch) as per_window:
            for window in acc.windows(batches):
                on_device = [step.to_device(step.prepare(b), torch.device("cpu"))
                             for b in window.micro_batches]
                for i, batch in enumerate(window):
                    window.backward(step(window, on_device[i], batch["labels"]))
                record = window.step()
                assert record.stepped and math.isfinite(record.loss)
    finally:
        compiled.BACKEND = old
    assert [w[1] for w in per_window[1:]] == [["tolist"]]
    assert [w[0] for w in per_window[1:]] == [[]]


# ---------------------------------------------------------------- CUDA


@cuda
def test_cuda_compiled_window_has_no_sync_and_one_in_its_step(monkeypatch):
    """CUDA's own detector: "error" inside the micro-batches, one warning in step()."""
    per_window = []
    original_iter, original_step = Window.__iter__, Window.step

    def checked_iter(self):
        torch.cuda.set_sync_debug_mode("error" if per_window else 0)  # window 1 compiles
        try:
            yield from original_iter(self)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    def counted_step(self):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn" if per_window else 0)
            try:
                record = original_step(self)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        per_window.append(sum("synchroniz" in str(w.message) for w in caught))
        return record

    monkeypatch.setattr(Window, "__iter__", checked_iter)
    monkeypatch.setattr(Window, "step", counted_step)
    torch._dynamo.reset()
    model = make_model("gpt2", "tiny")
    cfg = accumlab.TrainConfig(micro_batch_size=5, accum_steps=2, epochs=2, lr=1e-3,
                               compile=True, precision="bf16", device="cuda", progress=False,
                               clip_grad_norm=1.0)
    result = accumlab.train(model, random_lm_data(23, seed=7, min_len=5, max_len=30), cfg)
    assert result.steps == 6
    assert per_window[1:] == [1] * 5, per_window  # the read of L_W and the norm, only


@cuda
def test_cuda_fused_loss_peak_is_below_the_unfused_one_and_gradients_agree():
    torch.manual_seed(3)
    rows, width, vocab = 8 * 1024, 768, 50257
    h = torch.randn(rows, width, device="cuda", requires_grad=True)
    w = (torch.randn(vocab, width, device="cuda") / 30).requires_grad_()
    y = torch.randint(0, vocab, (rows,), device="cuda")
    peaks, grads = {}, {}
    for how in ("unfused", "fused"):
        h.grad = w.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (F.cross_entropy((h @ w.T).float(), y, reduction="sum") if how == "unfused"
                    else linear_cross_entropy(h, w, y, chunks=chunks_for(rows, vocab)))
        loss.backward()
        torch.cuda.synchronize()
        peaks[how] = torch.cuda.max_memory_allocated() - base
        grads[how] = (h.grad.clone(), w.grad.clone())
    assert peaks["fused"] < 0.5 * peaks["unfused"], peaks
    for a, b in zip(grads["fused"], grads["unfused"]):
        assert rel_diff(a.double(), b.double()) < 2e-2
