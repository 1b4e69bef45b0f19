"""Helpers for the graded assignments: is an answer the student's own, and grading one
question with correct versions of the other answers put in.

`assert_own_work(fn, allowed=...)` fails when the student's function (or a helper it calls
from the notebook) imports or calls accumlab code other than the helpers the notebook hands
out, for example `accumulate_gradients` where the question asks to write it. It reads both the
function's source (an AST, for line numbers in the message) and its bytecode with the globals
it resolves, so aliases (`import ... as f`), imports in another cell, default arguments,
closures and helper functions are seen. It also refuses introspection (`getattr`, `sys`,
`inspect`, frames, dunder attributes) that could reach a hidden test's own reference.

`substitute(fn, name=replacement)` puts correct versions of earlier answers into the
function's globals while a later question is graded, so that one bug costs points once.
`one_batch_reference` and `call_order` are what the tests compare with: the window as one
large batch, and the order of forward and backward passes.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import inspect
import textwrap
import types
from collections.abc import Callable, Iterable, Iterator

import torch

from accumlab.engine.collate import pad_collate
from accumlab.engine.gradients import gradient_vector

# Names that reach objects the grader cannot follow (other frames, modules by string, globals).
INTROSPECTION = frozenset({
    "__import__", "importlib", "eval", "exec", "compile", "globals", "vars", "getattr",
    "sys", "inspect", "gc", "builtins", "ctypes", "_getframe", "f_back", "f_globals",
    "f_locals", "tb_frame", "gi_frame", "cr_frame", "ag_frame",
})
_HARMLESS_DUNDERS = frozenset({
    "__init__", "__name__", "__module__", "__qualname__", "__doc__", "__annotations__",
    "__firstlineno__", "__static_attributes__",
})


def _library_name(obj) -> str | None:
    """`accumlab.x.y.name` if `obj` is a module, function or class of accumlab, else None."""
    if isinstance(obj, types.ModuleType):
        name = obj.__name__
    elif isinstance(obj, (types.FunctionType, types.BuiltinFunctionType, type)):
        name = f"{getattr(obj, '__module__', '') or ''}.{getattr(obj, '__qualname__', '')}"
    else:
        return None
    return name if name == "accumlab" or name.startswith("accumlab.") else None


def _describe(name: str, obj) -> str:
    """How a message names the accumlab object `obj` that a function reaches as `name`."""
    lib = _library_name(obj)
    module, _, short = lib.rpartition(".")
    if isinstance(obj, types.ModuleType):
        what = f"the accumlab module `{lib}`"
    else:
        what = f"accumlab's `{short}` ({module})"
    return what if name == short else f"`{name}`, {what}"


def _code_objects(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _code_objects(const)


def _line_of(fn: types.FunctionType, name: str) -> str:
    """' (line N)' where `name` first appears in `fn`'s source, when the source is available."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return ""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return ""
    for node in ast.walk(tree):
        found = (
            (isinstance(node, ast.Name) and node.id == name)
            or (isinstance(node, ast.Attribute) and node.attr == name)
            or (isinstance(node, ast.alias) and name in (node.name, node.asname))
            or (isinstance(node, ast.ImportFrom) and node.module and name == node.module)
            or (isinstance(node, ast.Import) and any(name == a.name for a in node.names))
        )
        if found and hasattr(node, "lineno"):
            return f" (line {fn.__code__.co_firstlineno + node.lineno - 1} of its cell)"
    return ""


def _values(obj) -> Iterable:
    """`obj`, and one level into the containers a helper could be hidden in."""
    yield obj
    if isinstance(obj, dict):
        yield from obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj


def own_work_problems(fn: Callable, *, allowed: Iterable = (), skip: Iterable[str] = ()
                      ) -> list[str]:
    """Why `fn` is not the student's own code: one sentence per problem (empty: it is).

    `allowed` are the accumlab objects the notebook hands out (compared by identity, so a
    student cannot rebind their names); `skip` names the other answers `fn` may call, which
    their own questions check.
    """
    allowed_ids = {id(a) for a in allowed}
    skip = set(skip)
    lib = _library_name(fn) or _library_name(getattr(fn, "func", None))
    if lib or not isinstance(fn, types.FunctionType):
        what = f"accumlab's `{lib}`" if lib else f"a {type(fn).__name__}"
        return [f"`{getattr(fn, '__name__', fn)}` is {what}, not a function you wrote with "
                "`def`"]
    problems: list[str] = []
    seen: set[int] = set()
    todo = [fn]
    while todo:
        f = todo.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        where = f"`{f.__name__}`"
        names = set().union(*(c.co_names for c in _code_objects(f.__code__)))
        reachable = [(n, f.__globals__[n]) for n in sorted(names) if n in f.__globals__]
        hidden = [*(f.__defaults__ or ()), *(f.__kwdefaults__ or {}).values(),
                  *(c.cell_contents for c in (f.__closure__ or ())
                    if c.cell_contents is not None)]
        reachable += [("a default or closure value", v) for v in hidden]
        for name in sorted(names):
            if name in INTROSPECTION or (name.startswith("__") and name.endswith("__")
                                         and name not in _HARMLESS_DUNDERS):
                problems.append(f"{where} uses `{name}`{_line_of(f, name)}: the grader "
                                "cannot follow introspection, so write the answer without it")
            elif (name == "accumlab" or name.startswith("accumlab.")) and (
                    name not in f.__globals__):  # an import inside the function
                problems.append(f"{where} imports `{name}`{_line_of(f, name)}")
        modules = [v for _, v in reachable if isinstance(v, types.ModuleType)]
        for name, value in reachable:
            if name in skip:
                continue
            for obj in _values(value):
                if id(obj) in allowed_ids:
                    continue
                lib = _library_name(obj)
                if lib:
                    problems.append(f"{where} uses {_describe(name, obj)}{_line_of(f, name)}")
                elif isinstance(obj, types.FunctionType) and obj.__globals__ is fn.__globals__:
                    todo.append(obj)  # a helper written in the notebook: check it too
                elif isinstance(obj, type) and obj.__module__ == fn.__module__:
                    todo.extend(v for v in vars(obj).values()
                                if isinstance(v, types.FunctionType))
        for module in modules:  # `helper_module.f` where f is an accumlab function
            if _library_name(module):
                continue
            for name in names:
                obj = getattr(module, name, None) if name not in skip else None
                if obj is not None and id(obj) not in allowed_ids and _library_name(obj):
                    problems.append(f"{where} uses `{module.__name__}.{name}`, which is "
                                    f"{_describe(name, obj).removeprefix(f'`{name}`, ')}")
    return list(dict.fromkeys(problems))


def assert_own_work(fn: Callable, *, allowed: Iterable = (), skip: Iterable[str] = (),
                    hint: str = "") -> None:
    """Raise AssertionError, with a message for the student, if `fn` is not their own code."""
    problems = own_work_problems(fn, allowed=allowed, skip=skip)
    if problems:
        name = getattr(fn, "__name__", "your answer")
        raise AssertionError(
            f"`{name}` must be your own code; this answer gets no points while:\n- "
            + "\n- ".join(problems)
            + (f"\n{hint}" if hint else "")
        )


@contextlib.contextmanager
def substitute(fn: Callable, **replacements) -> Iterator[None]:
    """Temporarily bind `replacements` in the globals `fn` reads (the notebook's namespace)."""
    env = getattr(fn, "__globals__", None)
    if env is None:
        yield
        return
    missing = object()
    saved = {name: env.get(name, missing) for name in replacements}
    env.update(replacements)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                env.pop(name, None)
            else:
                env[name] = value


def one_batch_reference(model: torch.nn.Module, micro_batches: list[dict]
                        ) -> tuple[float, torch.Tensor]:
    """The window as ONE batch of all its rows: its mean token loss L_W and its gradient
    (a float64 vector), computed on a copy of `model`. Exact accumulation reproduces both."""
    rows = []
    for batch in micro_batches:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
        for ids, labels, keep in zip(batch["input_ids"], batch["labels"], mask):
            rows.append({"input_ids": ids[keep].tolist(), "labels": labels[keep].tolist()})
    net = copy.deepcopy(model)
    net.zero_grad(set_to_none=True)
    loss = net(**pad_collate(rows)).loss
    loss.backward()
    return float(loss.detach()), gradient_vector(net)


@contextlib.contextmanager
def call_order(model: torch.nn.Module) -> Iterator[list[str]]:
    """Record "forward" and "backward" on `model` in the order they happen (a backward is
    counted when the gradient of its first parameter, used by every forward, is added)."""
    events: list[str] = []
    first = next(model.parameters())
    hooks = [model.register_forward_hook(lambda *_: events.append("forward")),
             first.register_post_accumulate_grad_hook(lambda _: events.append("backward"))]
    try:
        yield events
    finally:
        for hook in hooks:
            hook.remove()


def window_of(lengths: list[tuple[int, ...]], seed: int = 0, vocab: int = 64) -> list[dict]:
    """A window of causal-LM micro-batches: micro-batch j holds sequences of the lengths in
    `lengths[j]` (a sequence of length L has L - 1 label tokens), random tokens, right padding."""
    gen = torch.Generator().manual_seed(seed)
    window = []
    for sizes in lengths:
        rows = []
        for n in sizes:
            ids = torch.randint(2, vocab, (n,), generator=gen).tolist()
            rows.append({"input_ids": ids, "labels": list(ids)})
        window.append(pad_collate(rows))
    return window
