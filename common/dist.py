"""Device selection and (optional) DistributedDataParallel set-up.

One code path for every launch style:

* ``python script.py ...``                                        -> one process (GPU if any, else CPU);
* ``torchrun --nproc_per_node=N script.py ...``                    -> N processes (env ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``);
* ``python -m torch.distributed.launch --nproc_per_node=N ...``   -> the same, plus a
  ``--local-rank`` / ``--local_rank`` argument (both spellings are accepted).

NCCL is used on GPUs, gloo on the CPU. ``-id/--device`` sets ``CUDA_VISIBLE_DEVICES`` (``"cpu"``
forces the CPU); each process then takes GPU ``local_rank`` among the visible ones.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass
class Context:
    """Where this process runs."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ctx = Context(torch.device("cpu"))
_warned = set()
_seed: Optional[int] = None   # the last seed_all() seed (recorded in the metrics JSONs)
_set_up = False               # setup() has run in this process


def device_ids(text: str) -> Optional[str]:
    """``-id``'s value: ``cpu`` or GPU ids (``2``, ``0,1``; empty: the default); anything else is refused
    when parsed."""
    t = text.strip().lower()
    if not t:
        return None
    if t == "cpu" or all(part.strip().isdigit() for part in t.split(",")):
        return t.replace(" ", "")
    raise argparse.ArgumentTypeError(f"-id {text!r} is not 'cpu' or GPU ids (e.g. 2 or 0,1)")


def add_dist_args(parser, device_default: Optional[str] = None):
    """``-id/--device`` and the launcher's ``--local-rank`` / ``--local_rank``."""
    parser.add_argument("-id", "--device", default=device_default, metavar="IDS", type=device_ids,
                        help="GPU ids, sets CUDA_VISIBLE_DEVICES (e.g. '2' or '0,1'); 'cpu' forces the CPU "
                             "(default: all visible GPUs, else the CPU)")
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)


def warn_once(msg: str):
    """Print ``warning: msg`` once per process (main rank only)."""
    if msg not in _warned and _ctx.is_main and rank_from_env() == 0:
        _warned.add(msg)
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def select_device(spec: Optional[str], local_rank: int = 0) -> torch.device:
    if spec is not None and str(spec).lower() == "cpu":
        return torch.device("cpu")
    if spec not in (None, ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = str(spec)
    if not torch.cuda.is_available():
        warn_once("no GPU found, running on the CPU (slow)" + (f"; -id {spec} ignored" if spec else ""))
        return torch.device("cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: Optional[str] = None, local_rank: Optional[int] = None) -> Context:
    """Select the device and join the process group when launched with several processes."""
    global _ctx, _set_up
    _set_up = True
    world = _env_world()
    lr = int(os.environ.get("LOCAL_RANK", local_rank if local_rank is not None else 0))
    if world > 1 or dist.is_initialized():
        dev = select_device(device, lr)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method="env://")
        _ctx = Context(dev, dist.get_rank(), dist.get_world_size(), lr)
    else:
        _ctx = Context(select_device(device, 0))
    return _ctx


@contextlib.contextmanager
def session(device: Optional[str] = None, local_rank: Optional[int] = None):
    """``with session(args.device, args.local_rank) as ctx:`` -- set up, and leave the process group
    on exit if this call created it."""
    created = not dist.is_initialized()
    ctx = setup(device, local_rank)
    try:
        yield ctx
    except BaseException:
        if created and dist.is_initialized():
            dist.destroy_process_group()
        raise
    if created and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()  # every rank is done with its collectives: tear the group down together
        dist.destroy_process_group()
        # objects in reference cycles that still hold the group's work (and its tensors) are freed now,
        # while the interpreter is alive, not by gloo's threads during interpreter shutdown
        gc.collect()


def context() -> Context:
    return _ctx


def is_main() -> bool:
    """Rank 0 -- before :func:`setup` the launcher's ``RANK`` says (so output printed while the
    flags are checked appears once under torchrun too)."""
    return _ctx.is_main if _set_up else rank_from_env() == 0


def rank() -> int:
    return _ctx.rank


def world_size() -> int:
    return _ctx.world_size


def barrier():
    if dist.is_initialized():
        dist.barrier()


def _reduce_device() -> torch.device:
    return _ctx.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(values: Sequence[float]) -> List[float]:
    """Sum a list of numbers over all processes (identity in one process)."""
    values = [float(v) for v in values]
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device())
    dist.all_reduce(t)
    return t.cpu().tolist()


def any_rank(flag: bool) -> bool:
    """True on every process if ``flag`` is true on any (so all ranks can stop together)."""
    return all_reduce_sum([1.0 if flag else 0.0])[0] > 0


def wrap_ddp(model: nn.Module, ctx: Context) -> nn.Module:
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def seed_all(seed: Optional[int], offset: int = 0):
    """Seed python / NumPy / torch (``seed + offset``, e.g. the rank, so ranks draw different
    augmentations). ``None`` leaves them unseeded. The seed is remembered (:func:`current_seed`)."""
    global _seed
    _seed = seed
    if seed is None:
        return
    random.seed(seed + offset)
    torch.manual_seed(seed + offset)
    try:
        import numpy as np
        np.random.seed((seed + offset) % 2 ** 32)
    except ImportError:  # pragma: no cover - numpy comes with torch here
        pass


def current_seed() -> Optional[int]:
    """The seed of the last :func:`seed_all` call in this process (``None``: not seeded)."""
    return _seed


def rank_from_env() -> int:
    """This process's rank as a launcher set it (``RANK``; 0 without one), usable before
    :func:`setup` -- e.g. to print an error once when the process group never came up."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0
