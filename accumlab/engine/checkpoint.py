"""Checkpoints written atomically: safetensors weights, a torch state file, and JSON state.

    checkpoint_dir/step-00000007/model.safetensors    weights (shared tensors stored once)
                                 training_state.pt    optimizer, scheduler, GradScaler, RNG
                                 state.json           step, data position, config, checksums
    checkpoint_dir/latest                             name of the newest complete checkpoint
    checkpoint_dir/best -> best-00000005              link to the best checkpoint's folder
    checkpoint_dir/history.jsonl                      one line per step (see bookkeeping)

Each checkpoint is written into a temporary folder and renamed into place, so a crash leaves
either the old checkpoint or the new one, never half of one; a name that is replaced (`best`)
is a link switched atomically to a new folder, so it always names a complete checkpoint.
`training_state.pt` holds only tensors and plain containers and is read with
`torch.load(weights_only=True)`. state.json lists the sha256 of the two other files and ends
with the sha256 of its own content, so a changed byte anywhere (a hand-edited step, a removed
checksum) is detected. This guards against accidents and edits, not against someone who
recomputes the checksums on purpose.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

FORMAT = "accumlab-checkpoint-2"
FILES = ("model.safetensors", "training_state.pt")
STEP_NAME = re.compile(r"step-\d{8,}")
DEBRIS = (".tmp-", ".old-", ".latest.")  # left by a crash while writing


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or was made by a different configuration."""


class CheckpointWarning(UserWarning):
    """A checkpoint pointer was stale, and an older intact checkpoint is used instead."""


def _state_checksum(state: dict) -> str:
    """sha256 of state.json's content without its own checksum, in a canonical form."""
    body = {k: v for k, v in state.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parameter_shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    """Name -> shape of every parameter: the model's fingerprint in a checkpoint."""
    return {name: list(p.shape) for name, p in model.named_parameters()}


def rng_state() -> dict:
    """The torch CPU (and CUDA) random states, for exact resumption of dropout."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    directory: str | os.PathLike,
    name: str,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    scaler: torch.amp.GradScaler | None = None,
    state: dict | None = None,
    update_latest: bool = True,
    link: bool = False,
) -> Path:
    """Write `directory/name` atomically and (by default) point `directory/latest` at it.

    `link=True` (for `best`): write a new folder `name-<step>`, switch the link `name` to it,
    then delete the old folder, so that `name` always exists while it is replaced.
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-"))
    try:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict() if optimizer is not None else None,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": rng_state(),
            },
            tmp / "training_state.pt",
        )
        meta = dict(state or {})
        meta["format"] = FORMAT
        meta["parameter_shapes"] = parameter_shapes(model)
        meta["sha256"] = {f: _sha256(tmp / f) for f in FILES}
        meta = json.loads(json.dumps(meta, default=_json_default))  # as it will be read back
        meta["checksum"] = _state_checksum(meta)
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = install_folder(root, name, tmp, link=link, step=meta.get("step"))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if update_latest:
        _write_atomic_text(root / "latest", name + "\n")
    return final


def install_folder(root: Path, name: str, tmp: Path, *, link: bool, step) -> Path:
    """Move the finished folder `tmp` into place as `root/name`, never leaving a gap.

    With `link`, `name` becomes a link switched to a new `name-<step>` folder; otherwise an
    older `name` is renamed away first and deleted after the new one is in place.
    """
    final = root / name
    if link and _switch_link(root, name, tmp, step):
        pass
    elif final.exists():  # replace an older checkpoint of the same name
        old = root / f".old-{name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    return final


def _switch_link(root: Path, name: str, tmp: Path, step) -> bool:
    """Move `tmp` to a new folder and switch the link `root/name` to it; False where links are
    not available (then the caller renames, with a short moment in which `name` is missing)."""
    link = root / name
    old = os.readlink(link) if link.is_symlink() else None
    if link.exists() and old is None and not _replace_dir_with_nothing(link):
        return False
    base = f"{name}-{int(step):08d}" if isinstance(step, int) else f"{name}-00000000"
    target, n = base, 1
    while os.path.lexists(root / target):  # the same step again, after a resume
        n += 1
        target = f"{base}-{n}"
    os.replace(tmp, root / target)
    tmp_link = root / f".tmp-link-{name}-{os.getpid()}"
    try:
        if tmp_link.is_symlink():
            tmp_link.unlink()
        os.symlink(target, tmp_link)
    except OSError:  # no symbolic links here (some Windows setups)
        os.replace(root / target, tmp)
        return False
    os.replace(tmp_link, link)  # atomic: `name` names the old folder, then the new one
    _fsync_dir(root)
    if old and old != target and "/" not in old:
        shutil.rmtree(root / old, ignore_errors=True)
    return True


def _replace_dir_with_nothing(path: Path) -> bool:
    """An old real folder where a link goes: move it aside (debris, removed at the next start)."""
    try:
        os.replace(path, path.parent / f".old-{path.name}-{os.getpid()}")
        return True
    except OSError:
        return False


def _pointer_target(root: Path, name: str) -> Path:
    """The folder a pointer names, which must be a folder directly inside `root`."""
    plain = not (not name or name in (".", "..") or "/" in name or "\\" in name
                 or name.startswith(".") or os.path.isabs(name))
    if not plain or (root / name).resolve().parent != root.resolve():  # a link leading out
        raise CheckpointError(
            f"{root / 'latest'} names {name!r}, which is not a checkpoint folder inside "
            f"{root}: delete that file (resume then uses the newest intact checkpoint) or "
            "write the name of a folder in it, e.g. step-00000010")
    return root / name


def step_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """The step-NNNNNNNN checkpoint folders of `directory`, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def newest_intact_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest step checkpoint whose files match their checksums."""
    for path in reversed(step_checkpoints(directory)):
        try:
            read_state(path)
        except CheckpointError:
            continue
        return path
    return None


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint `directory/latest` names, or None when there is none yet.

    A `latest` that names a missing folder (or is missing while checkpoints exist) falls back
    to the newest intact step checkpoint, with a warning. A `latest` that names anything but a
    folder inside `directory` is an error.
    """
    root = Path(directory)
    pointer = root / "latest"
    if pointer.exists():
        path = _pointer_target(root, pointer.read_text().strip())
        if path.is_dir():
            return path
        problem = f"{pointer} names {path.name}, which does not exist"
    elif step_checkpoints(root):
        problem = f"{pointer} is missing"
    else:
        return None
    fallback = newest_intact_checkpoint(root)
    if fallback is not None:
        warnings.warn(f"{problem}: using the newest intact checkpoint, {fallback.name}",
                      CheckpointWarning, stacklevel=2)
    return fallback


def prune_checkpoints(directory: str | os.PathLike, keep_last: int | None) -> list[str]:
    """Delete all but the newest `keep_last` step checkpoints (never the one `latest` names)."""
    if keep_last is None:
        return []
    root = Path(directory)
    pointer = root / "latest"
    current = pointer.read_text().strip() if pointer.exists() else None
    old = [p for p in step_checkpoints(root)[:-keep_last] if p.name != current]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return [p.name for p in old]


def remove_debris(directory: str | os.PathLike) -> list[str]:
    """Remove what a crash while writing left behind: temporary and replaced folders, pointer
    temp files, and link targets no link names. Returns the names removed."""
    root = Path(directory)
    if not root.is_dir():
        return []
    links = {p.name: os.readlink(p) for p in root.iterdir() if p.is_symlink()}
    removed = []
    for p in root.iterdir():
        owner = re.fullmatch(r"(.+)-\d{8,}(-\d+)?", p.name)  # e.g. best-00000012
        orphan = (owner is not None and owner.group(1) in links
                  and links[owner.group(1)] != p.name and not p.is_symlink())
        if p.name.startswith(DEBRIS) or orphan:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)


def read_state(path: str | os.PathLike) -> dict:
    """The JSON state of a checkpoint, after checking that its files are intact."""
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.exists():
        raise CheckpointError(
            f"{path} is not an accumlab checkpoint (no state.json): pass a folder written by "
            "accumlab.train, e.g. checkpoint_dir/step-00000010, or resume_from='latest'"
        )
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_file} is damaged ({e}): resume from an earlier one") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise CheckpointError(f"{path} has format {found!r}, expected {FORMAT!r}: it was "
                              "written by another version of accumlab")
    if state.get("checksum") != _state_checksum(state):
        raise CheckpointError(
            f"{state_file} was changed after it was written (its checksum does not match): the "
            "checkpoint can't be trusted; resume from an earlier checkpoint or start again")
    sums = state.get("sha256")
    if not isinstance(sums, dict) or set(sums) != set(FILES):
        raise CheckpointError(f"{state_file} does not list the checksums of {list(FILES)}")
    for fname, digest in sums.items():
        f = path / fname
        if not f.exists() or _sha256(f) != digest:
            raise CheckpointError(
                f"{f} is missing or damaged (checksum mismatch): the checkpoint can't be trusted; "
                "resume from an earlier checkpoint or start again"
            )
    return state


def check_compatible(state: dict, model: torch.nn.Module, expected: dict,
                     data: dict | None = None) -> None:
    """Raise CheckpointError naming every setting, parameter or dataset that differs from this
    run. `data` is {"examples": n, "fingerprint": ...} of this run's training data."""
    problems = []
    saved_data = state.get("data") or {}
    if data and saved_data.get("examples") != data["examples"]:
        problems.append(f"train_data: the checkpoint was made on {saved_data.get('examples')} "
                        f"examples, this run has {data['examples']}")
    elif data and None not in (saved_data.get("fingerprint"), data.get("fingerprint")) and \
            saved_data["fingerprint"] != data["fingerprint"]:
        problems.append(f"train_data: same size ({data['examples']} examples) but other "
                        f"contents (fingerprint {saved_data['fingerprint']}, this run "
                        f"{data['fingerprint']})")
    saved_cfg = state.get("config", {})
    for key, value in expected.items():
        if key in saved_cfg and _normalise(saved_cfg[key]) != _normalise(value):
            problems.append(f"{key}: checkpoint {saved_cfg[key]!r}, this run {value!r}")
    shapes = parameter_shapes(model)
    saved_shapes = state.get("parameter_shapes", {})
    if set(shapes) != set(saved_shapes):
        missing = sorted(set(saved_shapes) - set(shapes))[:3]
        extra = sorted(set(shapes) - set(saved_shapes))[:3]
        problems.append(f"parameters differ (only in checkpoint: {missing}, only here: {extra})")
    else:
        for name, shape in shapes.items():
            if saved_shapes[name] != shape:
                problems.append(f"{name}: checkpoint shape {saved_shapes[name]}, model {shape}")
    if problems:
        raise CheckpointError(
            "the checkpoint was made by another configuration:\n  " + "\n  ".join(problems)
            + "\nResume with the same settings, model and data, or use a new checkpoint_dir."
        )


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    scaler: torch.amp.GradScaler | None = None,
    expected: dict | None = None,
    restore_rng: bool = True,
    data: dict | None = None,
) -> dict:
    """Load weights (and training state) into the given objects; returns the JSON state."""
    path = Path(path)
    state = read_state(path)
    check_compatible(state, model, expected or {}, data)
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
        training = torch.load(path / "training_state.pt", weights_only=True)
    except Exception as e:  # safetensors and torch raise many types for broken files
        raise CheckpointError(f"could not read {path}: {e}") from e
    if optimizer is not None and training["optimizer"] is not None:
        optimizer.load_state_dict(training["optimizer"])
    restore_run_state(training, scheduler, scaler, restore_rng)
    return state


def restore_run_state(saved: dict, scheduler, scaler, restore_rng: bool) -> None:
    """Put back what a checkpoint saved beside the weights: scheduler, scaler and RNG."""
    if scheduler is not None and saved["scheduler"] is not None:
        scheduler.load_state_dict(saved["scheduler"])
    if scaler is not None and saved["scaler"] is not None:
        scaler.load_state_dict(saved["scaler"])
    if restore_rng:
        set_rng_state(saved["rng"])


def load_weights(path: str | os.PathLike, model: torch.nn.Module) -> dict:
    """Load only a checkpoint's weights (e.g. `checkpoint_dir/best`) into `model`.

    Checks the checksums and parameter shapes; returns the JSON state (step, metrics...).
    """
    return load_checkpoint(path, model=model, restore_rng=False)


def _normalise(value):
    return list(value) if isinstance(value, tuple) else value


def _json_default(value):
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's state.json")
