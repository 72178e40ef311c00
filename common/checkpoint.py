"""Checkpoints: atomic writes, safe loads (``weights_only``), one-line errors.

A training checkpoint is a dict of plain types plus tensors::

    {"arch", "bit", "wbit", "num_classes", "dataset", "epoch" (epochs completed), "best_acc1",
     "state_dict", "optimizer", "scheduler", "args" (dict), "history" (list of per-epoch dicts), ...}

A raw ``state_dict`` (``{name: tensor}``) is accepted wherever a checkpoint is read and is returned
as ``{"state_dict": sd}``.
"""
from __future__ import annotations

import collections
import os
import pickle
import re
import shutil
import tempfile
from typing import Mapping, Optional

import torch

from .errors import UserError

CHECKPOINT = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"


def _atomic(path: str, write):
    """Call ``write(tmp_path)`` on a temp file next to ``path``, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj, path: str):
    """``torch.save`` that never leaves a half-written file at ``path`` (killed runs included)."""
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src: str, dst: str):
    _atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


def save_checkpoint(state: dict, run_dir: str, is_best: bool) -> str:
    """Write ``run_dir/checkpoint.pth.tar`` (and ``model_best.pth.tar`` when ``is_best``)."""
    path = os.path.join(run_dir, CHECKPOINT)
    atomic_save(state, path)
    if is_best:
        atomic_copy(path, os.path.join(run_dir, BEST))
    return path


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_checkpoint(path: str, what: str = "checkpoint", hint: Optional[str] = None) -> dict:
    """Load a checkpoint (or raw state dict) on the CPU; user errors for missing / corrupt files."""
    if not path:
        raise UserError(f"no {what} given", hint or "pass the path of a .pth.tar file")
    if not os.path.exists(path):
        raise UserError(f"{what} {path} does not exist", hint or "check the path")
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder, not a checkpoint file",
                        f"pass {os.path.join(path, BEST)} or another .pth.tar file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise UserError(f"{what} {path} holds objects other than tensors and plain types ({found.group(1)})",
                            "load only checkpoints you trust; re-save it as a plain state dict") from None
        raise UserError(f"{what} {path} is corrupt or not a PyTorch checkpoint (unreadable pickle data)",
                        "re-create it (e.g. rerun the training) or pass another file") from None
    except Exception as e:  # noqa: BLE001 -- any failure to unpickle means an unusable file (KeyError, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{what} {path} is corrupt or not a PyTorch checkpoint ({first[:160]})",
                        "re-create it (e.g. rerun the training) or pass another file") from None
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")):
        return dict(obj)
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
        return {**obj, "state_dict": obj["model"]}
    if _is_state_dict(obj):
        return {"state_dict": dict(obj)}
    raise UserError(f"{what} {path} is not a model checkpoint (no state_dict of tensors in it)",
                    "pass a model_best.pth.tar / checkpoint.pth.tar written by these scripts or a state dict")


def plain_scheduler_state(scheduler) -> dict:
    """A scheduler's state dict with plain types (``Counter`` milestones -> ``dict``)."""
    return {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in scheduler.state_dict().items()}


def load_scheduler_state(scheduler, state: dict):
    """Inverse of :func:`plain_scheduler_state`."""
    fixed = {k: collections.Counter(v) if isinstance(getattr(scheduler, k, None), collections.Counter) else v
             for k, v in state.items()}
    scheduler.load_state_dict(fixed)
