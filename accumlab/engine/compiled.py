"""One micro-batch, one compiled region: the forward and the loss together, with fixed shapes.

`make_micro_step` gives the trainer a function that turns one micro-batch into its share of L_W.
With `TrainConfig(compile=True)` on one process it compiles, as one graph, the model's body,
the output layer and the cross-entropy (`fused_loss.linear_cross_entropy`: the whole logits are
never materialised), and feeds it shapes that do not change between windows:

- every micro-batch has `micro_batch_size` rows: the last, short one gets extra rows of padding
  whose labels are -100 (they add exactly nothing to the loss, N or the gradient);
- lengths are padded to a multiple of 8, and when the examples' lengths vary the length
  dimension is marked dynamic, so one graph serves every length (packed rows of one length stay
  static);
- the window's item count N divides the graph's output outside it, so a new N never recompiles;
- an all-ones attention mask is dropped on the host (no padding: nothing to mask).

Nothing in the region reads a value back to the host, so a window runs without a host sync
until `Window.step` reads L_W and the gradient norm once. Without compile (or under DDP) the
step is the plain one: `model(**inputs).logits`, then `Window.loss`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from accumlab.engine.fused_loss import chunks_for, linear_cross_entropy
from accumlab.engine.losses import IGNORE_INDEX, summed_loss
from accumlab.engine.setup import to_device

LENGTH_MULTIPLE = 8
MAX_CHUNKS = 16  # the loss's chunks are unrolled in the graph: more would only slow compiling
BACKEND = "inductor"  # tests swap in a counting backend
# output layers applied straight to the body's last hidden state, by model class
PLAIN_HEADS = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
               "Qwen3ForCausalLM")


@dataclass
class Head:
    """A model cut before its output layer: body -> (transform) -> linear = logits."""

    body: torch.nn.Module
    linear: torch.nn.Linear
    transform: torch.nn.Module | None = None
    body_kwargs: dict | None = None


def head_split(model: torch.nn.Module) -> Head | None:
    """The body and output layer of a known language model, or None (use the logits path).

    Causal LMs in `PLAIN_HEADS` compute `logits = lm_head(last_hidden_state)`; BERT's masked LM
    applies `cls.predictions.transform` first. Any other model keeps its own forward.
    """
    name = type(model).__name__
    if name in PLAIN_HEADS:
        body, linear, transform = getattr(model, model.base_model_prefix), model.lm_head, None
    elif name == "BertForMaskedLM":
        body, linear = model.bert, model.cls.predictions.decoder
        transform = model.cls.predictions.transform
    else:
        return None
    if not isinstance(linear, torch.nn.Linear):
        return None
    kwargs = {"use_cache": False} if "use_cache" in inspect.signature(body.forward).parameters \
        else {}
    return Head(body, linear, transform, kwargs)


class MicroStep:
    """`step(window, inputs)`: one micro-batch's share of L_W, ready for `window.backward`.

    `prepare(batch)` (on the host) and `to_device(batch, device)` make the inputs; the labels
    travel with them. `autocast` is the precision's autocast context factory.
    """

    def __init__(self, model, net, task: str, autocast, *, compile: bool = False,
                 normalization: str = "tokens", chunk_size: int | None = None,
                 rows: int | None = None, max_length: int | None = None,
                 lengths_vary: bool = True, pad_id: int = 0):
        self.model, self.net, self.task, self.autocast = model, net, task, autocast
        self.compiled = compile
        self.rows, self.pad_id, self.lengths_vary = rows, pad_id, lengths_vary
        self.normalization, self.chunk_size = normalization, chunk_size
        self.head = head_split(model) if normalization != "samples" else None
        self.chunks = 1
        if self.head is not None:
            positions = (rows or 1) * (max_length or 1)
            self.chunks = chunks_for(positions, self.head.linear.out_features)
            if chunk_size:
                self.chunks = max(self.chunks, -(-positions // chunk_size))
            self.chunks = min(self.chunks, MAX_CHUNKS)
        if compile:
            fn = self._fused_sum if self.head is not None else self._logits_sum
            self._region = torch.compile(fn, backend=BACKEND)

    @property
    def fused(self) -> bool:
        """True when the loss never materialises the whole logits (compiled, known head)."""
        return self.compiled and self.head is not None

    # ---------------------------------------------------------------- host side

    def prepare(self, batch: dict) -> dict:
        """Fixed shapes for the compiled region (no-op without compile)."""
        if not self.compiled:
            return batch
        batch = pad_length(batch, LENGTH_MULTIPLE, self.pad_id)
        if self.rows is not None:
            batch = pad_rows(batch, self.rows, self.pad_id)
        mask = batch.get("attention_mask")
        if mask is not None and mask.dim() == 2 and bool(mask.all()):  # host tensor: no sync
            batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        return batch

    def to_device(self, batch: dict, device: torch.device) -> dict:
        """Inputs (and, compiled, the labels) on `device`; pinned non-blocking copies on CUDA."""
        return to_device(batch, device, labels=self.compiled)

    # ---------------------------------------------------------------- device side

    def __call__(self, window, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of L_W (`labels`: the host copy, used without compile)."""
        if not self.compiled:
            with self.autocast():
                logits = self.net(**inputs).logits
            return window.loss(logits, labels)
        inputs = dict(inputs)
        device_labels = inputs.pop("labels")
        if self.lengths_vary:
            mark_dynamic(inputs, device_labels, rows=self.rows is None)
        with self.autocast():
            summed = self._region(inputs, device_labels)
        return window.share(summed)

    def _fused_sum(self, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        head = self.head
        hidden = head.body(**inputs, **head.body_kwargs)[0]
        if head.transform is not None:
            hidden = head.transform(hidden)
        if self.task == "causal_lm":
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        return linear_cross_entropy(hidden, head.linear.weight, labels, head.linear.bias,
                                    chunks=self.chunks)

    def _logits_sum(self, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
        logits = self.net(**inputs).logits
        return summed_loss(logits, labels, self.task, self.normalization, self.chunk_size)


def make_micro_step(model, net, task: str, cfg, precision, *, pad_id: int, data) -> MicroStep:
    """The trainer's micro-step: compiled and fused for `cfg.compile` on one process."""
    from accumlab.engine import distributed

    compile = cfg.compile and not distributed.is_distributed() and cfg.parallel != "fsdp"
    if not compile:
        return MicroStep(model, net, task, precision.autocast)
    lengths = {len(data[i]["input_ids"]) for i in range(len(data))}
    longest = -(-max(lengths) // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
    vary = len(lengths) > 1 or cfg.seq_len_warmup_steps > 0 or bool(cfg.micro_batch_tokens)
    return MicroStep(model, net, task, precision.autocast, compile=True,
                     normalization=cfg.loss_normalization, chunk_size=cfg.loss_chunk_size,
                     rows=None if cfg.micro_batch_tokens else cfg.micro_batch_size,
                     max_length=longest, lengths_vary=vary, pad_id=pad_id)


# -------------------------------------------------------------------- fixed shapes


def pad_rows(batch: dict, rows: int, pad_id: int) -> dict:
    """Append rows of padding (labels -100) up to `rows`; they change no loss or gradient."""
    have = batch["input_ids"].shape[0]
    if have >= rows:
        return batch
    extra = rows - have
    out = {}
    for key, value in batch.items():
        if key == "labels":
            fill = torch.full((extra, *value.shape[1:]), IGNORE_INDEX, dtype=value.dtype)
        elif key == "input_ids":
            fill = torch.full((extra, *value.shape[1:]), pad_id, dtype=value.dtype)
        elif key == "position_ids":
            fill = torch.arange(value.shape[1], dtype=value.dtype).expand(extra, -1)
        elif key == "attention_mask" and value.dim() == 4:  # packed rows: a causal block
            fill = value.new_zeros((extra, *value.shape[1:]))
            blocked = torch.ones(value.shape[-2:], dtype=torch.bool).triu(1)
            fill = fill.masked_fill(blocked, torch.finfo(value.dtype).min) \
                if value.dtype.is_floating_point else ~blocked.expand_as(fill)
        else:  # a 2-D attention mask or token types: padded rows attend to their own tokens
            fill = torch.ones((extra, *value.shape[1:]), dtype=value.dtype)
        out[key] = torch.cat([value, fill])
    return out


def pad_length(batch: dict, multiple: int, pad_id: int) -> dict:
    """Right-pad every per-position tensor to a multiple of `multiple` positions."""
    ids = batch["input_ids"]
    width = ids.shape[1]
    target = -(-width // multiple) * multiple
    if target == width:
        return batch
    extra = target - width
    fills = {"input_ids": pad_id, "labels": IGNORE_INDEX, "attention_mask": 0}
    out = {}
    for key, value in batch.items():
        if value.dim() == 2 and value.shape[1] == width:
            if key == "position_ids":
                tail = value[:, -1:] + torch.arange(1, extra + 1, dtype=value.dtype)
            else:
                tail = torch.full((value.shape[0], extra), fills.get(key, 0), dtype=value.dtype)
            out[key] = torch.cat([value, tail], dim=1)
        elif value.dim() == 4:  # packed rows' mask: the new positions see only themselves
            out[key] = _grow_mask(value, extra)
        else:
            out[key] = value
    return out


def _grow_mask(mask: torch.Tensor, extra: int) -> torch.Tensor:
    rows, heads, s, _ = mask.shape
    blocked = ~torch.eye(s + extra, dtype=torch.bool)
    if mask.dtype.is_floating_point:
        grown = torch.zeros((rows, heads, s + extra, s + extra), dtype=mask.dtype)
        grown.masked_fill_(blocked, torch.finfo(mask.dtype).min)
    else:
        grown = (~blocked).expand(rows, heads, -1, -1).clone()
    grown[:, :, :s, :s] = mask
    return grown


def mark_dynamic(inputs: dict, labels: torch.Tensor, rows: bool = False) -> None:
    """One graph for every sequence length (and row count, if `rows`): mark those dimensions
    dynamic, so that dynamo does not specialise on the first micro-batch's shape."""
    for value in (*inputs.values(), labels):
        dims = [0] if rows else []
        if value.dim() >= 2:
            dims += [1] if value.dim() < 4 else [2, 3]  # a 4-D mask's head dimension stays 1
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(value, dim)
