"""Test helpers shared by several test files."""

import torch


def params_vector(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def random_lm_data(n: int, *, seed: int = 0, min_len: int = 4, max_len: int = 33,
                   vocab: int = 4096, mask_prefix: bool = False) -> list[dict]:
    """Variable-length causal-LM examples of random token ids (labels = inputs)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len, (1,), generator=g))
        ids = torch.randint(2, vocab, (length,), generator=g).tolist()
        labels = list(ids)
        if mask_prefix:  # a prompt whose tokens carry no loss
            cut = int(torch.randint(0, length, (1,), generator=g))
            labels[:cut] = [-100] * cut
        out.append({"input_ids": ids, "labels": labels})
    return out


def random_cls_data(n: int, *, seed: int = 0, num_labels: int = 3, vocab: int = 4096
                    ) -> list[dict]:
    """Variable-length classification examples with random labels."""
    g = torch.Generator().manual_seed(seed)
    data = random_lm_data(n, seed=seed, vocab=vocab)
    return [{"input_ids": d["input_ids"],
             "labels": int(torch.randint(0, num_labels, (1,), generator=g))} for d in data]
