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
import zipfile
from typing import Mapping, Optional, Sequence

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
    """Copy a file so that ``dst`` is either the old file or the whole new one."""
    _atomic(dst, lambda tmp: shutil.copyfile(src, tmp))


#: the keys that only a resumable checkpoint needs; model_best.pth.tar goes without them
TRAINING_STATE_KEYS = ("optimizer", "scheduler", "rng_state")


def save_checkpoint(state: dict, run_dir: str, is_best: bool,
                    best_drop: Sequence[str] = TRAINING_STATE_KEYS) -> str:
    """Write ``run_dir/checkpoint.pth.tar`` (everything in ``state``: the run can resume from it) and,
    when ``is_best``, ``model_best.pth.tar`` -- the model and what identifies it, without the
    ``best_drop`` keys (the optimizer's momentum buffers alone are as large as the model)."""
    path = os.path.join(run_dir, CHECKPOINT)
    atomic_save(state, path)
    if is_best:
        atomic_save({k: v for k, v in state.items() if k not in set(best_drop)}, os.path.join(run_dir, BEST))
    return path


# ---------------------------------------------------------------------------------------- RNG states
def rng_state(generators: Optional[Mapping[str, torch.Generator]] = None) -> dict:
    """The random-number states of this process -- Python, NumPy, torch (CPU and CUDA) and the given
    ``torch.Generator`` s (e.g. a DataLoader's, which fixes the shuffling order) -- in a form that
    ``torch.load(weights_only=True)`` reads back. Inverse: :func:`set_rng_state`."""
    import random
    state = {"python": _plain(random.getstate()), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"name": name, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:  # pragma: no cover
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = {k: g.get_state() for k, g in (generators or {}).items()}
    return state


def set_rng_state(state: Mapping, generators: Optional[Mapping[str, torch.Generator]] = None):
    """Restore what :func:`rng_state` recorded (missing parts are left as they are)."""
    import random
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        n = state["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for k, g in (generators or {}).items():
        if k in state.get("generators", {}):
            g.set_state(state["generators"][k])


def _plain(obj):
    """Tuples -> lists, recursively (plain types for the checkpoint)."""
    return [_plain(v) for v in obj] if isinstance(obj, (tuple, list)) else obj


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _looks_like_text(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(512)
    if not head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 32 or c in (9, 10, 13) for c in head)


def _not_a_checkpoint(path: str, what: str) -> UserError:
    """The error for a file ``torch.load`` cannot read, saying what the file looks like."""
    if os.path.getsize(path) == 0:
        kind = "an empty file"
    elif _looks_like_text(path):
        kind = "a text file"
    elif zipfile.is_zipfile(path):
        kind = "a damaged or truncated torch.save archive"
    else:
        kind = "neither a complete torch.save zip archive nor a legacy PyTorch file"
    return UserError(f"{what} {path} is corrupt or not a PyTorch checkpoint ({kind})",
                     "re-create it (e.g. rerun the training) or pass another file")


def _check_path(path: str, what: str, hint: Optional[str]):
    if not path:
        raise UserError(f"no {what} given", hint or "pass the path of a .pth.tar file")
    if not os.path.exists(path):
        raise UserError(f"{what} {path} does not exist", hint or "check the path")
    if os.path.isdir(path):
        raise UserError(f"{what} {path} is a folder, not a checkpoint file",
                        f"pass {os.path.join(path, BEST)} or another .pth.tar file")


def check_file(path: str, what: str = "checkpoint", hint: Optional[str] = None):
    """The cheap part of :func:`load_checkpoint`: the path is an existing file that looks like a
    checkpoint (zip archives are not read here; anything else is loaded once). Same one-line errors."""
    _check_path(path, what, hint)
    if not zipfile.is_zipfile(path):
        load_checkpoint(path, what, hint)


def load_checkpoint(path: str, what: str = "checkpoint", hint: Optional[str] = None) -> dict:
    """Load a checkpoint (or raw state dict) on the CPU; user errors for missing / corrupt files."""
    _check_path(path, what, hint)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise UserError(f"{what} {path} holds objects other than tensors and plain types ({found.group(1)})",
                            "load only checkpoints you trust; re-save it as a plain state dict") from None
        raise _not_a_checkpoint(path, what) from None
    except Exception:  # noqa: BLE001 -- any failure to unpickle means an unusable file (KeyError, ...)
        raise _not_a_checkpoint(path, what) from None
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("state_dict")):
        return dict(obj)
    if isinstance(obj, Mapping) and _is_state_dict(obj.get("model")):
        return {**obj, "state_dict": obj["model"]}
    if _is_state_dict(obj):
        return {"state_dict": dict(obj)}
    raise UserError(f"{what} {path} is not a model checkpoint (no state_dict of tensors in it)",
                    "pass a model_best.pth.tar / checkpoint.pth.tar written by these scripts or a state dict")


def check_class_names(recorded, names, what: str, path: str):
    """A one-line error when a checkpoint's recorded class names (``recorded``; ``None``: not recorded)
    differ from the data's ``names`` (:func:`common.loaders.same_names`: spelling variants such as
    ``potted plant`` / ``pottedplant`` are one name) -- same count but other names or another order would
    silently permute the labels."""
    if not recorded or names is None:
        return
    from .loaders import name_key, same_names
    if same_names(recorded, names):
        return
    recorded, names = list(recorded), list(names)
    n = min(len(recorded), len(names))
    i = next((k for k, (a, b) in enumerate(zip(recorded, names)) if name_key(a) != name_key(b)), n)
    at = (f"class {i} is {recorded[i]!r} there and {names[i]!r} here" if i < n
          else f"{len(recorded)} classes there, {len(names)} here")
    raise UserError(f"{what} {path} was trained on other class names than this data's ({at})",
                    "pass the --classes file it was trained with (same names, same order), or a checkpoint of "
                    "these classes")


def plain_scheduler_state(scheduler) -> dict:
    """A scheduler's state dict with plain types (``Counter`` milestones -> ``dict``)."""
    return {k: dict(v) if isinstance(v, collections.Counter) else v for k, v in scheduler.state_dict().items()}


def load_scheduler_state(scheduler, state: dict):
    """Inverse of :func:`plain_scheduler_state`."""
    fixed = {k: collections.Counter(v) if isinstance(getattr(scheduler, k, None), collections.Counter) else v
             for k, v in state.items()}
    scheduler.load_state_dict(fixed)
