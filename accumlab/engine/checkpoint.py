"""Checkpoints written atomically: safetensors weights, a torch state file, and JSON state.

    checkpoint_dir/step-00000007/model.safetensors    weights (shared tensors stored once)
                                 training_state.pt    optimizer, scheduler, GradScaler, RNG
                                 state.json           step, data position, config, checksums
    checkpoint_dir/latest                             name of the newest complete checkpoint

Each checkpoint is written into a temporary folder and renamed into place, so a crash leaves
either the old checkpoint or the new one, never half of one. `training_state.pt` holds only
tensors and plain containers and is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

FORMAT = "accumlab-checkpoint-1"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged, or was made by a different configuration."""


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
) -> Path:
    """Write `directory/name` atomically and (by default) point `directory/latest` at it."""
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
        meta["sha256"] = {f: _sha256(tmp / f) for f in ("model.safetensors", "training_state.pt")}
        (tmp / "state.json").write_text(json.dumps(meta, indent=1, default=_json_default))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
        final = root / name
        if final.exists():  # replace an older checkpoint of the same name (e.g. "best")
            old = root / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if update_latest:
        _write_atomic_text(root / "latest", name + "\n")
    return final


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint `directory/latest` names, or None when there is none yet."""
    pointer = Path(directory) / "latest"
    if not pointer.exists():
        return None
    path = Path(directory) / pointer.read_text().strip()
    return path if path.exists() else None


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
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {state.get('format')!r}, expected {FORMAT!r}")
    for fname, digest in state.get("sha256", {}).items():
        f = path / fname
        if not f.exists() or _sha256(f) != digest:
            raise CheckpointError(
                f"{f} is missing or damaged (checksum mismatch): the checkpoint can't be trusted; "
                "resume from an earlier checkpoint or start again"
            )
    return state


def check_compatible(state: dict, model: torch.nn.Module, expected: dict) -> None:
    """Raise CheckpointError naming every setting or parameter that differs from this run."""
    problems = []
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
            + "\nResume with the same settings and model, or use a new checkpoint_dir."
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
) -> dict:
    """Load weights (and training state) into the given objects; returns the JSON state."""
    path = Path(path)
    state = read_state(path)
    check_compatible(state, model, expected or {})
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
        training = torch.load(path / "training_state.pt", weights_only=True)
    except Exception as e:  # safetensors and torch raise many types for broken files
        raise CheckpointError(f"could not read {path}: {e}") from e
    if optimizer is not None and training["optimizer"] is not None:
        optimizer.load_state_dict(training["optimizer"])
    if scheduler is not None and training["scheduler"] is not None:
        scheduler.load_state_dict(training["scheduler"])
    if scaler is not None and training["scaler"] is not None:
        scaler.load_state_dict(training["scaler"])
    if restore_rng:
        set_rng_state(training["rng"])
    return state


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
