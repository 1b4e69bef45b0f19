"""Measuring a ported loop's update without the doctor.

The loop runs on a stock tiny GPT-2 (built here with transformers' own classes) with plain SGD,
lr=1, so the parameter change is the gradient the loop stepped with. The exact gradient of a
window is computed here too, from scratch: one sum of shifted token cross-entropies over the
window, divided by its label-token count. Nothing here calls accumlab.
"""

from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

K = 4
VOCAB = 50
UNEQUAL = [(30, 25), (5,), (14, 3), (8, 7, 6)]


def stock_model(dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=40, n_embd=24, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return GPT2LMHeadModel(config).to(dtype).eval()


def micro_batch(lengths, gen: torch.Generator) -> dict:
    """Right-padded rows: pad id 0, attention 0 and label -100 on padding."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for r, n in enumerate(lengths):
        row = torch.randint(2, VOCAB, (n,), generator=gen)
        ids[r, :n], mask[r, :n], labels[r, :n] = row, 1, row
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def windows(k: int = K, seed: int = 7) -> dict[str, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    return {"equal": [micro_batch((10, 10), gen) for _ in range(k)],
            "unequal": [micro_batch(UNEQUAL[j % 4], gen) for j in range(k)],
            "partial": [micro_batch((10, 10), gen) for _ in range(k - 1)],
            "second": [micro_batch((10, 10), gen) for _ in range(k)]}


def token_loss_sum(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
                           batch["labels"][:, 1:].reshape(-1), ignore_index=-100,
                           reduction="sum")


def label_tokens(batch, shifted: bool = True) -> int:
    labels = batch["labels"][:, 1:] if shifted else batch["labels"]
    return int((labels != -100).sum())


def grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).double().flatten()
                      for p in model.parameters()])


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def exact_gradient(model, batches) -> torch.Tensor:
    """Gradient of (sum of token losses over the window) / (label tokens in the window)."""
    net = copy.deepcopy(model)
    n = sum(label_tokens(b) for b in batches)
    (sum(token_loss_sum(net, b) for b in batches) / n).backward()
    return grads(net)


def mean_of_means_gradient(model, batches) -> torch.Tensor:
    """Gradient of the mean of the micro-batch mean losses."""
    net = copy.deepcopy(model)
    (sum(token_loss_sum(net, b) / label_tokens(b) for b in batches) / len(batches)).backward()
    return grads(net)


class Session:
    """A copy of the model with SGD(lr=1) and a constant scheduler, through several windows."""

    def __init__(self, model):
        self.net = copy.deepcopy(model)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=1.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: 1.0)

    def window(self, fn, batches, k=K) -> tuple[torch.Tensor, torch.Tensor]:
        """Run one window: (parameter change / lr, gradients left in .grad)."""
        before = params(self.net)
        batches = [{key: t.clone() for key, t in b.items()} for b in batches]
        takes = inspect.signature(fn).parameters
        fn(self.net, self.opt, batches, k, **({"scheduler": self.sched} if "scheduler" in takes
                                               else {}))
        return before - params(self.net), grads(self.net)


def fit(u: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Best c with u ~ c ref, and the relative residual."""
    c = float(u @ ref / (ref @ ref))
    return c, float((u - c * ref).norm() / max(float(u.norm()), 1e-300))


def measure(fn, dtype: torch.dtype = torch.float64, k: int = K) -> dict:
    """What one ported window function does, measured on fixed windows."""
    model, data = stock_model(dtype), windows(k)
    out = {}
    u, _ = Session(model).window(fn, data["equal"], k)
    out["equal"] = fit(u, exact_gradient(model, data["equal"]))
    out["first"] = fit(u, exact_gradient(model, data["equal"][:1]))
    out["last"] = fit(u, exact_gradient(model, data["equal"][-1:]))
    out["unshifted"] = (sum(label_tokens(b) for b in data["equal"])
                        / sum(label_tokens(b, shifted=False) for b in data["equal"]))
    u, _ = Session(model).window(fn, data["unequal"], k)
    out["unequal_exact"] = fit(u, exact_gradient(model, data["unequal"]))
    out["unequal_mom"] = fit(u, mean_of_means_gradient(model, data["unequal"]))
    session = Session(model)
    u, left = session.window(fn, data["partial"], k)
    out["partial"] = fit(u, exact_gradient(model, data["partial"])) if u.norm() > 0 else None
    out["partial_left"] = float(left.norm())
    out["partial_unshifted"] = (sum(label_tokens(b) for b in data["partial"])
                                / sum(label_tokens(b, shifted=False) for b in data["partial"]))
    if u.norm() == 0:  # not stepped: does the next window add the tail's gradient, or drop it?
        u2, _ = session.window(fn, data["second"], k)
        exact_2 = exact_gradient(model, data["second"])
        out["next_plain"] = fit(u2, exact_2)
        out["next_with_tail"] = fit(u2 - left, exact_2)
    return out
