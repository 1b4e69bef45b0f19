"""A real-text corpus of variable-length documents: the installed standard library's docstrings.

At first use the docstrings of the Python standard library (its public modules, their classes,
methods and functions, including single-underscore helpers) are extracted in a separate,
isolated interpreter (``python -I -S``: no site-packages, no user code, side effects contained)
and written once to the git-ignored JSON Lines cache
``cache_dir()/corpus-py{major}{minor}-{fingerprint}.jsonl`` (the fingerprint names the
extraction rules, so changing them rebuilds the cache). One document is one docstring.
Documents are sorted by qualified name, exact duplicates and documents under ``MIN_CHARS``
characters are dropped, and a hash of the qualified name puts about 5% of them in the
validation split. Rebuild with ``python -m accumlab.data.corpus``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from accumlab.data.paths import cache_dir

SPLITS = ("train", "validation", "all")
MIN_CHARS = 40
VALIDATION_PERCENT = 5

# Top-level modules never imported: GUI, demos, tests, installers, modules whose import acts
# (``this`` prints, ``antigravity`` opens a browser) and ``distutils`` (removed in 3.12).
SKIP_MODULES = (
    "antigravity", "distutils", "ensurepip", "idlelib", "lib2to3", "pydoc_data", "test",
    "this", "tkinter", "turtle", "turtledemo",
)


def _extract_docstrings(out_path, skip_modules):
    """Child-process body: write [qualified name, module, docstring] triples as JSON.

    Runs alone through ``inspect.getsource`` in ``python -I -S``, so it imports what it needs.
    """
    import contextlib
    import importlib
    import inspect
    import io
    import json
    import pkgutil
    import sys
    import warnings

    def wanted(name):
        parts = name.split(".")
        return not (
            parts[0] in skip_modules
            or any(p.startswith("_") for p in parts)
            or parts[-1] in ("test", "tests", "__main__")
            or (parts[0] == "encodings" and len(parts) > 1)  # ~100 generated codec tables
        )

    def own_doc(obj):
        doc = vars(obj).get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
        return inspect.cleandoc(doc) if isinstance(doc, str) else None

    modules, todo = {}, sorted(n for n in sys.stdlib_module_names if wanted(n))
    sink = io.StringIO()
    while todo:
        name = todo.pop(0)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                    contextlib.redirect_stderr(sink):
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except BaseException:  # platform-specific or broken modules are simply skipped
            continue
        modules[name] = module
        if hasattr(module, "__path__"):
            todo += [i.name for i in pkgutil.iter_modules(module.__path__, name + ".")
                     if wanted(i.name)]

    out = []
    for name in sorted(modules):
        module = modules[name]
        out.append((name, name, own_doc(module)))
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("__") or getattr(obj, "__module__", None) != name:
                continue
            if inspect.isroutine(obj):
                out.append((f"{name}.{attr}", name, own_doc(obj)))
            elif inspect.isclass(obj):
                out.append((f"{name}.{attr}", name, own_doc(obj)))
                for meth_name, meth in sorted(vars(obj).items()):
                    if meth_name.startswith("__") and meth_name != "__init__":
                        continue
                    if isinstance(meth, (classmethod, staticmethod)):
                        meth = meth.__func__
                    if inspect.isroutine(meth) or isinstance(meth, property):
                        out.append((f"{name}.{attr}.{meth_name}", name, own_doc(meth)))
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump([r for r in out if r[2]], f)


def _run_extraction() -> list[tuple[str, str, str]]:
    """Run ``_extract_docstrings`` in a fresh isolated interpreter and return its triples."""
    code = (inspect.getsource(_extract_docstrings)
            + "\nimport sys\n_extract_docstrings(sys.argv[1], tuple(sys.argv[2:]))\n")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "docstrings.json"
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", code, str(out), *SKIP_MODULES],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300, cwd=tmp,
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"extracting standard-library docstrings failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-2000:]}\nCheck that `{sys.executable} -I -S` starts."
            )
        return [tuple(r) for r in json.loads(out.read_text(encoding="utf-8"))]


def _split_of(name: str) -> str:
    """Deterministic split of a document from a hash of its qualified name."""
    bucket = int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "validation" if bucket < VALIDATION_PERCENT else "train"


def fingerprint() -> str:
    """Eight hex digits naming the extraction rules; a change of them means a new cache file."""
    rules = inspect.getsource(_extract_docstrings) + repr((SKIP_MODULES, MIN_CHARS))
    return hashlib.sha256(rules.encode("utf-8")).hexdigest()[:8]


def corpus_path() -> Path:
    """This Python version's corpus cache, ``corpus-py{major}{minor}-{fingerprint}.jsonl``.

    The file may not exist yet; ``load_corpus_records`` builds it.
    """
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_dir() / f"corpus-{py}-{fingerprint()}.jsonl"


def build_corpus(path: Path | None = None) -> Path:
    """Extract the docstrings, filter and deduplicate them, write the JSONL cache atomically."""
    path = Path(path) if path is not None else corpus_path()
    seen, rows = set(), []
    for name, module, text in sorted(_run_extraction()):
        if len(text) < MIN_CHARS or text in seen:
            continue
        seen.add(text)
        rows.append({"name": name, "module": module, "text": text})
    if not rows:
        raise RuntimeError("no docstrings were extracted; is this a complete Python install?")
    stale = f"corpus-py{sys.version_info.major}{sys.version_info.minor}-*.jsonl"
    return write_jsonl(path, rows, stale=stale if path == corpus_path() else None)


def write_jsonl(path: Path, rows, stale: str | None = None) -> Path:
    """Write dicts as JSON Lines atomically (temp file, then ``os.replace``).

    ``stale`` is a glob of older caches beside ``path`` to delete once it is written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in path.parent.glob(stale) if stale else ():
        if old != path:
            old.unlink(missing_ok=True)
    return path


def _check_split(split: str, choices: tuple[str, ...]) -> None:
    if split not in choices:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(choices)}")


def load_corpus_records(split: str = "train") -> list[dict]:
    """Documents as dicts ``{"name", "module", "text", "split"}``, sorted by qualified name.

    ``split`` is ``"train"`` (about 95%), ``"validation"`` (about 5%) or ``"all"``.
    The cache is built on first use (about 2 s).
    """
    _check_split(split, SPLITS)
    path = corpus_path()
    if not path.exists():
        build_corpus(path)
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                rec["split"] = _split_of(rec["name"])
                if split in ("all", rec["split"]):
                    records.append(rec)
    return records


def load_corpus(split: str = "train") -> list[str]:
    """Document texts of one split (``"train"``, ``"validation"`` or ``"all"``)."""
    return [r["text"] for r in load_corpus_records(split)]


def lm_examples(tokenizer, split: str = "train", max_length: int = 128,
                limit: int | None = None, min_tokens: int = 8,
                truncate: bool = False) -> list[dict]:
    """Causal-LM examples ``{"input_ids", "labels"}``, unpadded and of varying length.

    Each document is tokenised and ends with the EOS token. A document longer than
    ``max_length`` is cut into consecutive chunks of ``max_length`` tokens (the last chunk is
    shorter), or only its first chunk is kept when ``truncate=True``. Chunks shorter than
    ``min_tokens`` are dropped. ``labels`` is a copy of ``input_ids`` (the model shifts them).
    ``limit`` keeps the first ``limit`` examples.
    """
    if max_length < 2 or not 1 <= min_tokens <= max_length:
        raise ValueError(f"need max_length >= 2 and 1 <= min_tokens <= max_length, got "
                         f"max_length={max_length}, min_tokens={min_tokens}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token first")
    texts, eos, out = load_corpus(split), tokenizer.eos_token_id, []
    for start in range(0, len(texts), 256):  # batches, so that a small limit stays cheap
        batch = tokenizer(texts[start:start + 256], add_special_tokens=False)["input_ids"]
        for ids in batch:
            ids = list(ids) + [eos]
            for i in range(0, max_length if truncate else len(ids), max_length):
                chunk = ids[i:i + max_length]
                if len(chunk) >= min_tokens:
                    out.append({"input_ids": chunk, "labels": list(chunk)})
                    if limit is not None and len(out) >= limit:
                        return out
    return out


def percentiles(values, qs=(10, 25, 50, 75, 90, 99, 100)) -> dict[int, int]:
    """Nearest-rank percentiles of a list of numbers, e.g. ``{10: 12, 50: 40, ..., 100: max}``."""
    ordered = sorted(values)
    if not ordered:
        return {q: 0 for q in qs}
    return {q: ordered[min(len(ordered) - 1, max(0, -(-q * len(ordered) // 100) - 1))]
            for q in qs}


def main() -> None:
    """Rebuild the corpus cache and print its statistics."""
    t0 = time.perf_counter()
    path = build_corpus()
    built = time.perf_counter() - t0
    print(f"wrote {path} in {built:.1f} s (Python {sys.version.split()[0]})")
    for split in ("train", "validation", "all"):
        texts = load_corpus(split)
        chars = [len(t) for t in texts]
        print(f"{split:>10}: {len(texts)} docs, {sum(chars)} chars, "
              f"chars/doc percentiles {percentiles(chars)}")
    print("token statistics: python -m accumlab.data.tokenizer")


if __name__ == "__main__":
    main()
