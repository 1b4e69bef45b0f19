"""Wrong answers every assignment is graded with (tests/test_assignments.py).

For each assignment: the classic bug's name -> (replacement bodies of the answer functions,
the per-question scores that submission must get). The bodies replace what lies between
`# BEGIN SOLUTION` and `# END SOLUTION` in the master's answer cell; everything else in the
notebook stays the solution. Later questions are graded with correct versions of earlier
answers substituted, so a bug costs the points of the question it is in (only public checks,
which cannot show a correct answer, still use the student's earlier answers).
"""

WRONG = {
    "a1_window": {
        "mean of means": (
            {
                "accumulate": """
                window_loss = 0.0
                for batch in micro_batches:
                    share = model(**batch).loss / len(micro_batches)  # mean of the micro-batch means
                    share.backward()
                    window_loss += share.item()
                return window_loss
""",
            },
            {"q1": 2, "q2": 4},
        ),
        "deferred backward": (
            {
                "accumulate": """
                n_total = sum(num_items(b) for b in micro_batches)
                total = sum(model(**b).loss * num_items(b) / n_total for b in micro_batches)
                total.backward()  # one backward for the whole window
                return total.item()
""",
            },
            {"q1": 1, "q2": 4},
        ),
        "loss / k (nanoGPT)": (
            {
                "window_step": """
                loss = 0.0
                for batch in micro_batches:
                    part = model(**batch).loss / accum_steps
                    part.backward()
                    loss += part.item()
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                return loss
""",
            },
            {"q1": 4, "q2": 1},
        ),
        "step per micro-batch": (
            {
                "window_step": """
                n_total = sum(num_items(b) for b in micro_batches)
                loss = 0.0
                for batch in micro_batches:
                    share = model(**batch).loss * num_items(batch) / n_total
                    share.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss += share.item()
                if scheduler is not None:
                    scheduler.step()
                return loss
""",
            },
            {"q1": 4, "q2": 0},
        ),
        "library import": (
            {
                "accumulate": """
                from accumlab.engine.window import accumulate_gradients
                return accumulate_gradients(model, micro_batches, task="causal_lm")
""",
            },
            {"q1": 0, "q2": 4},
        ),
    },
    "a2_token_loss": {
        "unshifted count": (
            {
                "count_label_tokens": """
                return int((labels != IGNORE).sum())
""",
            },
            {"q1": 0, "q2": 2, "q3": 3},
        ),
        "no shift in the loss": (
            {
                "summed_token_loss": """
                return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=IGNORE, reduction="sum")
""",
            },
            {"q1": 2, "q2": 0, "q3": 3},
        ),
        ".item() shares": (
            {
                "micro_batch_shares": """
                n_total = sum(count_label_tokens(lb) for lb in labels_list)
                return [summed_token_loss(lg, lb).item() / n_total for lg, lb in zip(logits_list, labels_list)]
""",
            },
            {"q1": 2, "q2": 2, "q3": 0},
        ),
        "mean of means": (
            {
                "micro_batch_shares": """
                k = len(logits_list)
                return [summed_token_loss(lg, lb) / count_label_tokens(lb) / k
                        for lg, lb in zip(logits_list, labels_list)]
""",
            },
            {"q1": 2, "q2": 2, "q3": 0},
        ),
        "library import": (
            {
                "summed_token_loss": """
                from accumlab.engine.losses import summed_loss
                return summed_loss(logits, labels, "causal_lm")
""",
            },
            {"q1": 2, "q2": 0, "q3": 3},
        ),
    },
    "a3_plan": {
        "textbook memory": (
            {
                "largest_micro_batch": """
                budget = budget_gib * GIB
                best = 0
                while estimate_memory(shape, best + 1, seq_len, precision)["total"] <= budget:
                    best += 1
                return best
""",
            },
            {"q1": 0, "q2": 4},
        ),
        "linear rule for Adam": (
            {
                "plan": """
                if target_tokens % seq_len:
                    raise ValueError("target_tokens must be a multiple of seq_len")
                sequences = target_tokens // seq_len
                fits = largest_micro_batch(shape, seq_len, gpu_gib * (1 - headroom), precision)
                if fits == 0:
                    raise ValueError("not even one sequence fits the memory budget")
                micro = max(d for d in range(1, min(fits, sequences) + 1) if sequences % d == 0)
                if rule not in ("linear", "sqrt"):
                    raise ValueError("rule must be 'linear' or 'sqrt'")
                lr = base_lr * target_tokens / base_tokens  # the same rule for both
                return {"micro_batch": micro, "accum_steps": sequences // micro, "lr": lr,
                        "tokens_per_step": target_tokens}
""",
            },
            {"q1": 3, "q2": 2},
        ),
        "micro-batch not a divisor": (
            {
                "plan": """
                if target_tokens % seq_len:
                    raise ValueError("target_tokens must be a multiple of seq_len")
                sequences = target_tokens // seq_len
                micro = min(largest_micro_batch(shape, seq_len, gpu_gib * (1 - headroom), precision), sequences)
                if micro == 0:
                    raise ValueError("not even one sequence fits the memory budget")
                steps = math.ceil(sequences / micro)
                ratio = target_tokens / base_tokens
                if rule not in ("linear", "sqrt"):
                    raise ValueError("rule must be 'linear' or 'sqrt'")
                lr = base_lr * (ratio if rule == "linear" else math.sqrt(ratio))
                return {"micro_batch": micro, "accum_steps": steps, "lr": lr,
                        "tokens_per_step": micro * steps * seq_len}
""",
            },
            {"q1": 3, "q2": 2},
        ),
        "library import": (
            {
                "plan": """
                from accumlab.lab.planner import plan_training
                p = plan_training(f"{gpu_gib}GiB", shape, seq_len, target_tokens, precision,
                                  checkpointing="off", headroom=headroom)
                if rule not in ("linear", "sqrt"):
                    raise ValueError("rule must be 'linear' or 'sqrt'")
                ratio = target_tokens / base_tokens
                lr = base_lr * (ratio if rule == "linear" else math.sqrt(ratio))
                return {"micro_batch": p.micro_batch, "accum_steps": p.accum_steps, "lr": lr,
                        "tokens_per_step": p.tokens_per_step}
""",
            },
            {"q1": 3, "q2": 0},
        ),
    },
    "a4_data_parallel": {
        "forgets the factor R": (
            {
                "rank_backward": """
                part = 0.0
                for batch in micro_batches:
                    summed = model(**batch).loss * num_items(batch)
                    (summed / n_global).backward()  # DDP's average then divides by R once more
                    part += summed.item() / n_global
                return part
""",
            },
            {"q1": 0, "q2": 2, "q3": 3},
        ),
        "per-rank count": (
            {
                "ddp_window": """
                world_size = len(rank_windows)
                replicas = [copy.deepcopy(model) for _ in range(world_size)]
                loss = 0.0
                for r, w in zip(replicas, rank_windows):
                    n_local = sum(num_items(b) for b in w)  # each rank counts only its own tokens
                    loss += rank_backward(r, w, n_local, world_size)
                for p, *copies in zip(model.parameters(), *(r.parameters() for r in replicas)):
                    mean = sum(c.grad for c in copies) / world_size
                    p.grad = mean if p.grad is None else p.grad + mean
                return loss
""",
            },
            {"q1": 3, "q2": 0, "q3": 3},
        ),
        "per-rank mean, no factor R": (
            {
                "rank_backward": """
                part = 0.0
                for batch in micro_batches:
                    summed = model(**batch).loss * num_items(batch)
                    (summed / n_global).backward()
                    part += summed.item() / n_global
                return part
""",
                "ddp_window": """
                world_size = len(rank_windows)
                replicas = [copy.deepcopy(model) for _ in range(world_size)]
                loss = 0.0
                for r, w in zip(replicas, rank_windows):
                    loss += rank_backward(r, w, sum(num_items(b) for b in w), world_size) / world_size
                for p, *copies in zip(model.parameters(), *(r.parameters() for r in replicas)):
                    mean = sum(c.grad for c in copies) / world_size
                    p.grad = mean if p.grad is None else p.grad + mean
                return loss
""",
            },
            {"q1": 0, "q2": 1, "q3": 3},
        ),
        "average of ratios": (
            {
                "noise_scale": """
                ratios = []
                for p in pairs:
                    b_small, b_big = p["small_items"], p["big_items"]
                    if not 0 < b_small < b_big:
                        raise ValueError("each pair needs 0 < small_items < big_items")
                    grad_sq = (b_big * p["big_sq"] - b_small * p["small_sq"]) / (b_big - b_small)
                    trace = (p["small_sq"] - p["big_sq"]) / (1 / b_small - 1 / b_big)
                    ratios.append(trace / grad_sq)
                return sum(ratios) / len(ratios)
""",
            },
            {"q1": 3, "q2": 3, "q3": 1},
        ),
        "library import": (
            {
                "noise_scale": """
                from accumlab.engine.noise import NoiseScale
                est = NoiseScale(ema=None)
                for p in pairs:
                    out = est.update(**p)
                return out["noise_scale"]
""",
            },
            {"q1": 3, "q2": 3, "q3": 0},
        ),
    },
}
