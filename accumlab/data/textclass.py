"""A labelled text-classification set: which part of the standard library a docstring is from.

Built at first use from the docstring corpus (``accumlab.data.corpus``) into the git-ignored cache
``cache_dir()/textclass-py{major}{minor}-{fingerprint}.jsonl``. Each docstring of a module in
one of the ``LABELS`` groups is cut into pieces of at most ``MAX_CHARS`` characters at paragraph
or word boundaries; each piece is one example labelled with its module's group. Whole
docstrings go to one split (chosen in the order of a hash of their qualified name), so no split
sees another's docstrings; every split has the same number of examples per class. Rebuild and
print the bag-of-words baseline with ``python -m accumlab.data.textclass``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

from accumlab.data.corpus import fingerprint as corpus_fingerprint
from accumlab.data.corpus import load_corpus_records, write_jsonl
from accumlab.data.paths import cache_dir

SPLITS = ("train", "dev", "test")
MAX_CHARS = 400
MIN_CHARS = 40
EVAL_PER_CLASS = 75  # examples per class in dev and in test
LABELS: tuple[str, ...] = ("internet", "files_and_os", "concurrency", "dev_tools")

# Top-level standard-library modules of each class, in the order of LABELS.
GROUPS: dict[str, tuple[str, ...]] = {
    "internet": (
        "asynchat", "cgi", "cgitb", "email", "ftplib", "html", "http", "imaplib", "ipaddress",
        "mailbox", "mailcap", "mimetypes", "netrc", "nntplib", "nturl2path", "poplib", "quopri",
        "smtpd", "smtplib", "socket", "socketserver", "ssl", "telnetlib", "urllib", "uu",
        "webbrowser", "wsgiref", "xmlrpc",
    ),
    "files_and_os": (
        "bz2", "chunk", "errno", "fcntl", "filecmp", "fileinput", "fnmatch", "genericpath",
        "getpass", "glob", "grp", "gzip", "io", "lzma", "mmap", "ntpath", "os", "pathlib",
        "platform", "posix", "posixpath", "pty", "pwd", "resource", "shutil", "spwd", "stat",
        "subprocess", "tarfile", "tempfile", "termios", "tty", "zipfile", "zlib",
    ),
    "concurrency": (
        "asyncio", "asyncore", "atexit", "concurrent", "contextvars", "multiprocessing",
        "queue", "sched", "select", "selectors", "signal", "threading",
    ),
    "dev_tools": (
        "ast", "bdb", "cProfile", "code", "codeop", "compileall", "dis", "doctest",
        "faulthandler", "gc", "imp", "importlib", "inspect", "linecache", "modulefinder", "pdb",
        "pkgutil", "profile", "pstats", "py_compile", "pyclbr", "pydoc", "runpy", "symtable",
        "tabnanny", "timeit", "trace", "traceback", "tracemalloc", "unittest", "zipimport",
    ),
}
_LABEL_OF = {mod: LABELS.index(group) for group, mods in GROUPS.items() for mod in mods}


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_text(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most ``max_chars``, at paragraph, else word, boundaries."""
    pieces, cur = [], ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        while len(para) > max_chars:
            cut = para.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > max_chars // 2 else max_chars
            if cur:
                pieces.append(cur)
                cur = ""
            pieces.append(para[:cut].rstrip())
            para = para[cut:].strip()
        if not para:
            continue
        if cur and len(cur) + 2 + len(para) > max_chars:
            pieces.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        pieces.append(cur)
    return [p for p in pieces if len(p) >= MIN_CHARS]


def classification_path() -> Path:
    """This Python version's cache, ``textclass-py{major}{minor}-{fingerprint}.jsonl``.

    The fingerprint covers the corpus rules and the labelling rules, so changing either
    rebuilds the set. The file may not exist yet; ``load_classification`` builds it.
    """
    rules = (corpus_fingerprint() + inspect.getsource(split_text)
             + inspect.getsource(build_classification)
             + repr((LABELS, GROUPS, MAX_CHARS, MIN_CHARS, EVAL_PER_CLASS)))
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir() / f"textclass-{py}-{_hash(rules)[:8]}.jsonl"


def build_classification(path: Path | None = None) -> Path:
    """Label, split and balance the corpus pieces; write the JSONL cache atomically."""
    path = Path(path) if path is not None else classification_path()
    docs = defaultdict(list)  # label -> [(hash, name, pieces)]
    seen = set()
    for rec in load_corpus_records("all"):
        label = _LABEL_OF.get(rec["module"].split(".")[0])
        if label is None:
            continue
        pieces = [p for p in split_text(rec["text"]) if p not in seen]
        seen.update(pieces)
        if pieces:
            docs[label].append((_hash(rec["name"]), rec["name"], pieces))
    missing = [name for i, name in enumerate(LABELS) if i not in docs]
    if missing:
        raise RuntimeError(f"no docstrings for classes {missing}; rebuild the corpus with "
                           "`python -m accumlab.data.corpus`")
    per_split = defaultdict(lambda: defaultdict(list))  # split -> label -> rows
    for label, items in docs.items():
        for _, name, pieces in sorted(items):
            split = next((s for s in ("test", "dev") if
                          len(per_split[s][label]) < EVAL_PER_CLASS), "train")
            for i, piece in enumerate(pieces):
                per_split[split][label].append(
                    {"name": f"{name}#{i}", "split": split, "label": label, "text": piece})
    n_train = min(len(per_split["train"][label]) for label in range(len(LABELS)))
    rows = []
    for split, cap in (("train", n_train), ("dev", EVAL_PER_CLASS), ("test", EVAL_PER_CLASS)):
        chosen = []
        for label in range(len(LABELS)):
            members = per_split[split][label]
            if split == "train":  # downsample by hash, not by name order
                members = sorted(members, key=lambda r: _hash(r["name"]))
            chosen += members[:cap]
        rows += sorted(chosen, key=lambda r: _hash(r["name"]))  # classes interleaved
    stale = f"textclass-py{sys.version_info.major}{sys.version_info.minor}-*.jsonl"
    return write_jsonl(path, rows, stale=stale if path == classification_path() else None)


def load_classification(split: str = "train") -> list[dict]:
    """Examples ``{"text": str, "label": int}`` of ``"train"``, ``"dev"`` or ``"test"``.

    ``LABELS[label]`` names the class. The cache is built on first use (under a second).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    path = classification_path()
    if not path.exists():
        build_classification(path)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"text": r["text"], "label": r["label"]} for r in rows if r["split"] == split]


def classification_examples(tokenizer, split: str = "train", max_length: int = 128,
                            limit: int | None = None, add_eos: bool = True) -> list[dict]:
    """Tokenised examples ``{"input_ids": list[int], "labels": int}``, unpadded.

    Texts are truncated to ``max_length`` tokens; with ``add_eos`` the last of them is the EOS
    token, a fixed summary position for GPT-2-style classifiers. ``limit`` keeps the first ones.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if add_eos and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; pass add_eos=False or set one")
    rows = load_classification(split)[:limit]
    ids = tokenizer([r["text"] for r in rows], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos else []
    keep = max_length - len(eos)
    return [{"input_ids": list(i[:keep]) + eos, "labels": r["label"]}
            for i, r in zip(ids, rows, strict=True)]


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def bow_baseline(steps: int = 200, lr: float = 2.0, weight_decay: float = 1e-3,
                 ) -> dict[str, float]:
    """Accuracy on each split of a bag-of-words logistic regression (torch, about a second).

    Features: presence of each word seen at least twice in train. Full-batch gradient descent
    from zero weights, so the result is deterministic (settings chosen on dev).
    """
    import torch
    from torch.nn.functional import cross_entropy, embedding_bag

    data = {s: load_classification(s) for s in SPLITS}
    counts = Counter(w for r in data["train"] for w in set(_words(r["text"])))
    vocab = {w: i for i, w in enumerate(sorted(w for w, c in counts.items() if c >= 2))}

    def features(rows):  # (flat word ids, offsets, labels) for embedding_bag
        bags = [sorted({vocab[w] for w in _words(r["text"]) if w in vocab}) for r in rows]
        offsets = torch.tensor([0] + [len(b) for b in bags[:-1]]).cumsum(0)
        flat = torch.tensor([i for b in bags for i in b], dtype=torch.long)
        return flat, offsets, torch.tensor([r["label"] for r in rows])

    feats = {s: features(rows) for s, rows in data.items()}
    weight = torch.zeros(len(vocab), len(LABELS), requires_grad=True)
    bias = torch.zeros(len(LABELS), requires_grad=True)
    flat, offsets, y = feats["train"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster, and 10x faster on a busy CPU
    try:
        for _ in range(steps):
            logits = embedding_bag(flat, weight, offsets, mode="sum") + bias
            loss = cross_entropy(logits, y) + weight_decay / 2 * weight.square().sum()
            grads = torch.autograd.grad(loss, [weight, bias])
            with torch.no_grad():
                weight -= lr * grads[0]
                bias -= lr * grads[1]
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        return {s: (embedding_bag(f, weight, o, mode="sum").add(bias).argmax(-1) == y)
                .float().mean().item() for s, (f, o, y) in feats.items()}


def main() -> None:
    """Rebuild the classification cache, print class counts and the bag-of-words baseline."""
    import time

    t0 = time.perf_counter()
    path = build_classification()
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s (Python {sys.version.split()[0]})")
    for split in SPLITS:
        rows = load_classification(split)
        per = Counter(LABELS[r["label"]] for r in rows)
        chars = sorted(len(r["text"]) for r in rows)
        print(f"{split:>5}: {len(rows)} examples, {dict(per)}, "
              f"chars median {chars[len(chars) // 2]}")
    t0 = time.perf_counter()
    acc = bow_baseline()
    print(f"bag-of-words logistic regression ({time.perf_counter() - t0:.1f} s): "
          + ", ".join(f"{s} {a:.3f}" for s, a in acc.items())
          + f" (chance {1 / len(LABELS):.3f})")


if __name__ == "__main__":
    main()
