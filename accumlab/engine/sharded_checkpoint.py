"""Sharded checkpoints of an FSDP run, written by every rank with torch.distributed.checkpoint.

    checkpoint_dir/step-00000007/dcp/.metadata       which shard of which tensor is where
                                 dcp/__0_0.distcp     rank 0's shards of weights and AdamW state
                                 dcp/__1_0.distcp     rank 1's ...
                                 rank-00000.pt        rank 0's scheduler, GradScaler and RNG
                                 rank-00001.pt        rank 1's ...
                                 state.json           step, data position, config, ranks,
                                                      the model's class and config, checksums
    checkpoint_dir/latest, best, history.jsonl        as for accumlab.engine.checkpoint

No rank ever holds the whole model. All ranks write into one temporary folder, which rank 0
renames into place once every file is written and checksummed, so a crash leaves the old
checkpoint or the new one, never half of one (the same promise as checkpoint.py; on several
machines `checkpoint_dir` must be a shared file system). Resuming needs the same number of
ranks and gives the same run, bit for bit. `load_consolidated` reads one into a single-process
model (no torch.distributed needed), e.g. for notebook 11, and `export_pretrained` writes it as
a `from_pretrained` folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from accumlab.engine import distributed
from accumlab.engine.checkpoint import (
    CheckpointError,
    _fsync_dir,
    _json_default,
    _sha256,
    _state_checksum,
    _write_atomic_text,
    check_compatible,
    install_folder,
    parameter_shapes,
    restore_run_state,
    rng_state,
)

FORMAT = "accumlab-sharded-checkpoint-1"
DCP_DIR = "dcp"


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` holds a checkpoint written by an FSDP run (not yet verified)."""
    try:
        return json.loads((Path(path) / "state.json").read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _original_class(model: torch.nn.Module) -> type:
    """The model's own class (fully_shard puts an FSDP class in front of it)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def _model_record(model: torch.nn.Module) -> dict:
    cls = _original_class(model)
    config = getattr(model, "config", None)
    dtype = next(model.parameters()).dtype
    return {"class": cls.__name__, "module": cls.__module__, "dtype": str(dtype).split(".")[-1],
            "task": getattr(model, "accumlab_task", None),
            "config": config.to_dict() if hasattr(config, "to_dict") else None}


def _nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of parameters that hold inf or nan on any rank (one all-reduce)."""
    from accumlab.engine.fsdp import local

    names = [n for n, _ in model.named_parameters()]
    flags = torch.tensor([float(not torch.isfinite(local(p)).all())
                          for _, p in model.named_parameters()], dtype=torch.float64)
    flags = distributed.all_reduce_sum(flags.to(distributed.collective_device())).cpu()
    return [n for n, bad in zip(names, flags.tolist()) if bad]


def _on_all_ranks(error: str | None) -> None:
    """Rank 0's error (or None) raised on every rank, so that no rank waits for the others."""
    box = [error]
    if distributed.is_distributed():
        torch.distributed.broadcast_object_list(box, src=0)
    if box[0]:
        raise CheckpointError(box[0])


def save_sharded_checkpoint(directory, name, *, model, optimizer=None, scheduler=None,
                            scaler=None, state: dict | None = None, update_latest: bool = True,
                            link: bool = False) -> Path:
    """Write `directory/name` from every rank (a collective: call it on all ranks).

    The same arguments and atomic replacement as `checkpoint.save_checkpoint`; rank 0's
    `state` goes into state.json.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    bad = _nonfinite_parameters(model)
    if bad:
        raise FloatingPointError(
            f"the weights hold inf or nan ({', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}),"
            " so no checkpoint was written and `latest` still names the last good one. Lower "
            "the learning rate or turn on clip_grad_norm.")
    root, rank, main = Path(directory), distributed.rank(), distributed.is_main_process()
    box = [None]
    if main:
        root.mkdir(parents=True, exist_ok=True)
        box = [tempfile.mkdtemp(dir=root, prefix=f".tmp-{name}-")]
    if distributed.is_distributed():
        torch.distributed.broadcast_object_list(box, src=0)
    tmp = Path(box[0])
    error = None
    try:
        model_sd, optim_sd = get_state_dict(model, optimizer if optimizer is not None else [])
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / DCP_DIR))
        own = tmp / _rank_file(rank)
        torch.save({"scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": rng_state()}, own)
        with open(own, "rb") as f:
            os.fsync(f.fileno())
    except Exception as e:  # every rank must reach the barrier below, or the others hang
        error = f"rank {rank} could not write its shards into {tmp}: {e}"
    errors = [None] * distributed.world_size()
    if distributed.is_distributed():
        torch.distributed.all_gather_object(errors, error)
    else:
        errors = [error]
    final, failure = root / name, next((e for e in errors if e), None)
    if main:
        try:
            if failure is None:
                final = _finish(root, name, tmp, model, state, link)
        except Exception as e:
            failure = f"could not finish {root / name}: {e}"
        if failure is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        elif update_latest:
            _write_atomic_text(root / "latest", name + "\n")
    _on_all_ranks(failure if main else None)
    return final


def _finish(root: Path, name: str, tmp: Path, model, state, link: bool) -> Path:
    """Rank 0: checksum every file, write state.json, and move the folder into place."""
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    meta = dict(state or {})
    meta.update(format=FORMAT, world_size=distributed.world_size(),
                parameter_shapes=parameter_shapes(model), model=_model_record(model),
                sha256={f: _sha256(tmp / f) for f in files})
    meta = json.loads(json.dumps(meta, default=_json_default))
    meta["checksum"] = _state_checksum(meta)
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    for f in [tmp / "state.json", *(tmp / f for f in files)]:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp / DCP_DIR)
    _fsync_dir(tmp)
    return install_folder(root, name, tmp, link=link, step=meta.get("step"))


def read_sharded_state(path: str | os.PathLike) -> dict:
    """The JSON state of a sharded checkpoint, after checking that every file is intact."""
    path = Path(path)
    state_file = path / "state.json"
    if not state_file.exists():
        raise CheckpointError(f"{path} is not an accumlab checkpoint (no state.json): pass a "
                              "folder written by accumlab.train, or resume_from='latest'")
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{state_file} is damaged ({e}): resume from an earlier one") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a sharded checkpoint (format {state.get('format')!r}, expected "
            f"{FORMAT!r}): resume it with parallel='ddp', or in one process")
    if state.get("checksum") != _state_checksum(state):
        raise CheckpointError(f"{state_file} was changed after it was written (its checksum "
                              "does not match): resume from an earlier checkpoint")
    for fname, digest in (state.get("sha256") or {}).items():
        f = path / fname
        if not f.exists() or _sha256(f) != digest:
            raise CheckpointError(f"{f} is missing or damaged (checksum mismatch): resume from "
                                  "an earlier checkpoint or start again")
    if not any(f.startswith(DCP_DIR + "/") for f in state.get("sha256") or {}):
        raise CheckpointError(f"{state_file} lists no shard files")
    return state


def load_sharded_checkpoint(path, *, model, optimizer=None, scheduler=None, scaler=None,
                            expected: dict | None = None, data: dict | None = None,
                            restore_rng: bool = True) -> dict:
    """Load an FSDP run's checkpoint into the sharded `model` and `optimizer` on every rank
    (a collective, on as many ranks as wrote it); returns the JSON state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    state, error = None, None
    if distributed.is_main_process():  # one rank reads every file; all raise alike
        try:
            state = read_sharded_state(path)
            check_compatible(state, model, expected or {}, data)
            if state["world_size"] != distributed.world_size():
                raise CheckpointError(
                    f"{path} was written by {state['world_size']} ranks and this run has "
                    f"{distributed.world_size()}: resume on {state['world_size']} ranks, or "
                    "start a new run from its weights (load_consolidated)")
        except CheckpointError as e:
            error = str(e)
    _on_all_ranks(error)
    box = [state]
    torch.distributed.broadcast_object_list(box, src=0)
    state = box[0]
    opts = optimizer if optimizer is not None else []
    model_sd, optim_sd = get_state_dict(model, opts)
    sd = {"model": model_sd, "optim": optim_sd} if optimizer is not None else {"model": model_sd}
    dcp.load(sd, checkpoint_id=str(path / DCP_DIR))
    if optimizer is not None:
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:
        set_state_dict(model, [], model_state_dict=sd["model"], optim_state_dict={})
    own = torch.load(path / _rank_file(distributed.rank()), weights_only=True)
    restore_run_state(own, scheduler, scaler, restore_rng)
    return state


def load_consolidated(path: str | os.PathLike, model: torch.nn.Module | None = None
                      ) -> torch.nn.Module:
    """The whole model of a sharded checkpoint, in this one process (no torch.distributed).

    `model` (same architecture) receives the weights; without it the checkpoint's own
    transformers class and config are built, in the dtype it was trained in.
    """
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    state = read_sharded_state(path)
    if model is None:
        model = _build_model(state["model"], path)
    check_compatible(state, model, {})
    weights = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": yes
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load({"model": weights}, checkpoint_id=str(path / DCP_DIR), no_dist=True)
    model.load_state_dict(weights)
    return model


def _build_model(record: dict, path: Path) -> torch.nn.Module:
    import transformers

    cls = getattr(transformers, record["class"], None)
    if cls is None or record.get("config") is None:
        raise CheckpointError(f"{path} holds a {record['class']} (not a transformers model "
                              "with a config): pass load_consolidated(path, model=...) a model "
                              "of the same architecture")
    config = cls.config_class.from_dict(record["config"])
    model = cls._from_config(config, dtype=getattr(torch, record["dtype"]))
    if record.get("task"):
        model.accumlab_task = record["task"]
    return model


def export_pretrained(path: str | os.PathLike, out_dir: str | os.PathLike,
                      model: torch.nn.Module | None = None) -> Path:
    """Write a sharded checkpoint's whole model as a `from_pretrained` folder; returns it."""
    model = load_consolidated(path, model)
    model.save_pretrained(str(out_dir))
    return Path(out_dir)
