"""The rules every task's scripts follow, written once: run folders, metrics files, resume, presets,
flag checks, images on disk.

* a run folder is claimed by one run: a fresh training or fine-tuning into a folder that already holds
  one is a one-line error (``--resume auto`` continues it, ``--fresh`` starts over and keeps the old
  files aside, another ``--save_folder`` / ``--out`` puts the new run elsewhere);
* every evaluation writes its own file, named by what it measured (:func:`metrics_name`), next to the
  checkpoint it evaluated (:func:`eval_dir`); fine-tuning methods get a folder each (:func:`ft_suffix`);
* a preset / config file is parsed by the script's own parser (:func:`parse_with_config`), so its values
  are checked exactly like the command line's;
* a folder of images skips an unreadable file with a warning (:func:`read_each`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .checkpoint import BEST, CHECKPOINT
from .errors import UserError
from .logger import log

#: files that mark a folder as holding a run
RUN_FILES = (CHECKPOINT, BEST, "metrics_ann.json")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")


# ---------------------------------------------------------------------------------------- flags
def default_workers(cap: int = 4) -> int:
    """Loader processes per process: at most ``cap``, and no more than the CPU cores this process may
    use divided by the processes a launcher started on this node."""
    from .cli import usable_cpus
    cpus = usable_cpus()
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return min(cap, max(1, cpus // local))


def add_workers_arg(p, *names: str, dest: str = "workers", cap: int = 4):
    """``-j/--workers`` (plus a task's old spellings in ``names``) defaulting to :func:`default_workers`."""
    n = default_workers(cap)
    p.add_argument("-j", "--workers", *names, dest=dest, type=int, default=n,
                   help=f"data-loading processes per process (default: min({cap}, CPU cores / processes on this "
                        f"node) = {n} here)")


def add_fresh_arg(p):
    p.add_argument("--fresh", action="store_true",
                   help="start a new run in a folder that holds one, also where a run would resume (its files are "
                        "kept aside in <folder>.replaced-<time>/)")


def check_positive(args, *names: str, flag: Callable[[str], str] = None):
    """One-line error for a flag below 1 (``None`` = not given is fine)."""
    for n in names:
        v = getattr(args, n, None)
        if v is not None and v < 1:
            raise UserError(f"{(flag or _flag)(n)} {v} must be at least 1", "pass a positive number")


def check_non_negative(args, *names: str):
    for n in names:
        v = getattr(args, n, None)
        if v is not None and v < 0:
            raise UserError(f"{_flag(n)} {v} must not be negative", "pass a value >= 0")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# ---------------------------------------------------------------------------------------- presets
def config_argv(p: argparse.ArgumentParser, cfg: dict, source: str, ignore: Iterable[str] = ()) -> List[str]:
    """A preset's ``{dest: value}`` as command-line tokens of ``p``: parsed by the same parser, its
    values get the same types, choices and checks as flags typed by hand. Keys in ``ignore`` (flags of
    the task's other scripts) and ``_comment`` keys are skipped; any other unknown key is an error."""
    by_dest = {}
    for a in p._actions:
        if a.option_strings and a.dest not in by_dest:
            by_dest[a.dest] = a
    argv, unknown = [], []
    for k, v in cfg.items():
        if k.startswith("_"):
            continue
        a = by_dest.get(k)
        if a is None:
            if k not in set(ignore):
                unknown.append(k)
            continue
        opt = next((o for o in a.option_strings if o.startswith("--")), a.option_strings[0])
        if isinstance(a, argparse.BooleanOptionalAction):
            if not isinstance(v, bool):
                raise UserError(f"{source}: {k} = {v!r} is not true / false", f"write \"{k}\": true or false")
            argv.append(opt if v else "--no-" + opt[2:])
        elif a.nargs == 0:   # store_true / store_false / store_const
            if not isinstance(v, bool):
                raise UserError(f"{source}: {k} = {v!r} is not true / false", f"write \"{k}\": true or false")
            if v == (a.const is not False):   # store_true: true sets it; store_false: false does
                argv.append(opt)
        elif v is None:
            continue
        else:
            toks = [_token(x) for x in v] if isinstance(v, (list, tuple)) else [_token(v)]
            try:
                p._get_values(a, toks)   # the type and choices checks of the command line
            except (argparse.ArgumentError, TypeError, ValueError) as e:
                msg = getattr(e, "message", None) or str(e)
                raise UserError(f"{source}: {k} = {v!r} is not accepted ({msg})",
                                f"fix the value in the file ({opt} takes the same values on the command line)") from None
            argv += [opt] + toks
    if unknown:
        raise UserError(f"{source} sets {', '.join(sorted(unknown))}, which this script has no flag for",
                        "use the flag names of --help (dest spelling, e.g. batch_size)")
    return argv


def _token(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer() and abs(v) < 1e16:
        return repr(v)
    return str(v)


def read_config(path: str, flag: str = "--config") -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path} is not a JSON object of flag values ({e})",
                        "write it as {\"flag_name\": value, ...}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{flag} {path} is not a JSON object", "write it as {\"flag_name\": value, ...}")
    return cfg


def parse_with_config(p: argparse.ArgumentParser, argv: Optional[Sequence[str]], resolve: Callable[[str], str],
                      ignore: Iterable[str] = (), flag: str = "config") -> Tuple[argparse.Namespace, dict]:
    """Parse ``argv``; a ``--config`` preset's values go in front of it as flags (the command line wins:
    argparse keeps the last value), so they are validated exactly like typed flags. ``resolve`` maps the
    flag's value to a JSON path. Returns ``(args, the preset's values)``."""
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = p.parse_known_args(argv)
    cfg = {}
    if getattr(pre, flag, ""):
        path = resolve(getattr(pre, flag))
        cfg = read_config(path, f"--{flag}")
        argv = config_argv(p, {k: v for k, v in cfg.items() if k != flag}, f"--{flag} {path}", ignore) + argv
    return p.parse_args(argv), cfg


# ---------------------------------------------------------------------------------------- run folders
def is_run_folder(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, f)) for f in RUN_FILES)


_REPLACE = set()  # folders whose earlier run --fresh moves aside when the new run starts writing


def claim_run_folder(folder: str, args, *, resuming: bool = False, root_flag: str = "--save_folder",
                     can_resume: bool = True) -> str:
    """Make ``folder`` this run's: a folder holding another run is an error unless the run resumes it
    or ``--fresh`` was given. The old files then move to ``<folder>.replaced-<time>`` (nothing is
    deleted) only when the run starts writing (:func:`start_run`), so a command that fails on its
    inputs first leaves them where they were."""
    _REPLACE.discard(os.path.abspath(folder))  # what an earlier call in this process (that failed) planned
    if resuming or not is_run_folder(folder):
        return folder
    if getattr(args, "fresh", False):
        _REPLACE.add(os.path.abspath(folder))
        return folder
    keep = "--resume auto to continue it, " if can_resume else ""
    raise UserError(f"{folder} already holds a run ({', '.join(f for f in RUN_FILES if os.path.exists(os.path.join(folder, f)))})",
                    f"pass {keep}--fresh to start over (the old files are kept aside), or another {root_flag}")


def start_run(folder: str):
    """Called by every process where a run starts writing into ``folder``: rank 0 moves a ``--fresh``
    run's predecessor aside (:func:`claim_run_folder`), then all processes wait for it (whatever each
    one found in the folder, so none waits alone)."""
    from . import dist
    key = os.path.abspath(folder)
    if key in _REPLACE:
        _REPLACE.discard(key)
        if dist.is_main() and is_run_folder(folder):
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            aside = f"{folder.rstrip(os.sep)}.replaced-{stamp}"
            k = 1
            while os.path.exists(aside):
                k += 1
                aside = f"{folder.rstrip(os.sep)}.replaced-{stamp}-{k}"
            os.replace(folder, aside)
            log(f"--fresh: the earlier run in {folder} moved to {aside}")
    dist.barrier()


def resume_path(resume: str, folder: str, fresh: bool = False) -> str:
    """``--resume`` as a path: ``auto`` is the run folder's checkpoint when there is one, else ``""``
    (a new run). ``fresh`` (``--fresh``) starts over whatever ``auto`` finds; with a named checkpoint it is
    a contradiction."""
    if fresh:
        if resume not in ("", "auto", None):
            raise UserError(f"--fresh and --resume {resume} contradict each other",
                            "drop one: --resume continues that run, --fresh starts a new one")
        return ""
    if resume != "auto":
        return resume or ""
    path = os.path.join(folder, CHECKPOINT)
    if os.path.exists(path):
        return path
    log(f"--resume auto: no {path} yet, starting a new run")
    return ""


def require_training_state(ckpt: dict, path: str):
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        raise UserError(f"--resume {path} is a model file without training state (epoch, optimizer)",
                        "resume from checkpoint.pth.tar, or pass the file as --init to start a new run")


def ft_suffix(method: str, default: str) -> str:
    """The fine-tuning run folder's suffix: ``_ft`` for the task's default method, ``_ft_<method>``
    (``+`` written ``-``) for another, so two methods never share a folder."""
    return "_ft" if method == default else "_ft_" + method.replace("+", "-")


# ---------------------------------------------------------------------------------------- metrics files
def metrics_name(res: Dict, prefix: str = "metrics_snn") -> str:
    """``<prefix>_<neuron>_T<T>[_settle<K>].json`` for an SNN result, ``<prefix>.json`` for an ANN one."""
    if res.get("neuron") is None:
        return prefix + ".json"
    return f"{prefix}_{res['neuron']}_T{res['T']}" + (f"_settle{res['settle']}" if res.get("settle") else "") + ".json"


def eval_dir(path: str, fallback: str) -> str:
    """Where an evaluation of checkpoint ``path`` writes its metrics: beside the checkpoint, or
    ``fallback`` when that folder is read-only."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.access(folder, os.W_OK):
        return os.path.dirname(path) or "."
    log(f"{folder} is not writable: metrics go to {fallback}")
    return fallback


def write_metrics(args, rec: Dict, default_path: str, plot: Optional[Callable[[Dict, str], object]] = None) -> str:
    """Write ``rec`` to ``--metrics-out`` or ``default_path`` (rank 0), and its figures with ``--plot``."""
    from . import dist
    from .metrics import write_json
    path = getattr(args, "metrics_out", "") or default_path
    if dist.is_main():
        write_json(path, rec)
        log(f"metrics -> {path}")
        if getattr(args, "plot", False) and plot is not None:
            for png in plot(rec, path) or []:
                log(f"plot -> {png}")
    return path


def stamp(rec: Dict, args) -> Dict:
    from .cli import plain_args
    rec.update(created=datetime.datetime.now().isoformat(timespec="seconds"), args=plain_args(args))
    return rec


# ---------------------------------------------------------------------------------------- training helpers
def check_finite(loss: torch.Tensor, epoch: int, it: int):
    """Stop every rank with a one-line error when the loss is NaN / inf on any rank."""
    from . import dist
    bad = not bool(torch.isfinite(loss.detach()))
    if dist.any_rank(bad):
        what = "inf" if bad and math.isinf(loss.item()) else "NaN"
        raise UserError(f"loss became {what} at epoch {epoch} iter {it}", "lower --lr or check the data")


OPTIMIZERS = ("sgd", "adam")


def add_optimizer_arg(p, default: str = "sgd"):
    """``--optimizer``: SGD with momentum (the paper's) or Adam (fewer steps to a good model: short CPU runs)."""
    p.add_argument("--optimizer", default=default, choices=OPTIMIZERS,
                   help=f"sgd (the original's, momentum --momentum) or adam (converges in fewer steps: short CPU "
                        f"runs; default {default})")


def make_optimizer(params, name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD with momentum, or Adam with PyTorch's fused kernel where the parameters' device has one (CPU,
    CUDA): the same update as the per-tensor loop, rounded differently, several times faster a step on a
    CPU (2 against 14 ms for yolov2_tiny at width 0.5)."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name != "adam":
        raise UserError(f"--optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}", "pick one of them")
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)


def add_amp_arg(p, default: Optional[bool] = False, help: Optional[str] = None):
    """``--amp / --no-amp``: the training forward pass in bfloat16 autocast (``default`` None: decided later,
    by :func:`amp_default`)."""
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=default,
                   help=help or "mixed precision: run the training forward pass in bfloat16 autocast (weights, gradients, "
                        "optimizer state and checkpoints stay float32; evaluation runs in float32); faster on a GPU "
                        "and on a CPU with bfloat16 instructions (AVX-512 BF16, AMX), slower on other CPUs; default off")


def bf16_fast(device) -> bool:
    """Whether ``device`` runs bfloat16 convolutions natively: a CUDA GPU with bf16 support, or a CPU on
    which oneDNN has bfloat16 kernels."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def amp_default() -> bool:
    """The demos' ``--amp`` default: on where the device the scripts pick (a GPU if there is one, else the
    CPU) runs bfloat16 natively."""
    return bf16_fast("cuda" if torch.cuda.is_available() else "cpu")


def check_amp(amp: bool, device):
    """``--amp`` on a device: a one-line error on a GPU without bfloat16, a warning on a CPU without fast
    bfloat16 kernels (autocast works there, but emulated and slower than float32)."""
    if not amp:
        return
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--amp needs bfloat16, which this GPU does not support", "leave out --amp")
    if device.type == "cpu" and not bf16_fast(device):
        from .dist import warn_once
        warn_once("--amp: this CPU has no native bfloat16 kernels; mixed precision will be slower than float32")


def autocast(device, enabled: bool):
    """bfloat16 autocast on ``device``'s type when ``enabled`` (``--amp``), else a no-op context."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bool(enabled))


def amp_forward(model: nn.Module, x: torch.Tensor, amp: bool) -> torch.Tensor:
    """``model(x)`` of a training step, in bfloat16 autocast with ``amp`` and returned as float32, so the
    loss is computed in float32 either way."""
    with autocast(x.device, amp):
        out = model(x)
    return out.float() if amp else out


def sgd_step(model: nn.Module, x, y, loss_fn: Callable, optimizer, epoch: int, it: int, amp: bool = False):
    """One training step: forward (:func:`amp_forward`), loss (NaN / inf on any rank stops every rank),
    backward, update. Returns ``(output, loss)``."""
    out = amp_forward(model, x, amp)
    loss = loss_fn(out, y)
    check_finite(loss, epoch, it)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return out, loss


def save_epoch(state: Dict, out_dir: str, is_best: bool, summary: Dict):
    """After an epoch (rank 0): the checkpoint (``model_best`` too when ``is_best``) and ``history.json``
    (``summary`` plus the ``history`` of ``state``)."""
    from .checkpoint import save_checkpoint
    from .metrics import write_json
    save_checkpoint(state, out_dir, is_best)
    write_json(os.path.join(out_dir, "history.json"), {**summary, "history": state["history"]})


def best_epoch(history: List[Dict], key: str, start: int, epochs: int, start_flag: str = "--start_epoch") -> Dict:
    """The epoch record with the best ``key`` (the last one when none was evaluated); a one-line error
    when nothing was trained."""
    if not history:
        raise UserError(f"nothing was trained (the run starts at epoch {start} of --epochs {epochs})",
                        f"raise --epochs to continue it (or lower {start_flag})")
    evaluated = [h for h in history if key in h]
    return max(evaluated, key=lambda h: h[key]) if evaluated else history[-1]


def loader_generators(loader) -> Dict[str, torch.Generator]:
    """The ``torch.Generator`` of a training loader (its workers' seeds, and the shuffling where the
    sampler uses it), if it has one (a ``DataLoader``, or a wrapper holding one as ``.loader``): saved in
    the checkpoint's RNG state, so a resumed run draws what the uninterrupted one would."""
    for obj in (loader, getattr(loader, "loader", None)):
        g = getattr(obj, "generator", None)
        if isinstance(g, torch.Generator):
            return {"train_loader": g}
    return {}


def set_loader_epoch(loader, epoch: int):
    """Reshuffle a loader's sampler for this epoch (``set_epoch``; no-op for samplers without one)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


class ReshuffledLoader:
    """Iterating it again starts a new sampler epoch (the fine-tuner walks the training set once per
    layer and epoch)."""

    def __init__(self, loader):
        self.loader, self.epoch = loader, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        set_loader_epoch(self.loader, self.epoch)
        self.epoch += 1
        return iter(self.loader)


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int, channels: int = 3) -> float:
    """Multiply-accumulates of the conv / linear layers for one ``input_size`` square image."""
    total = [0.0]

    def hook(m, inp, out):
        if isinstance(m, nn.Linear):
            total[0] += out.numel() * m.in_features
        else:
            total[0] += out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(1, channels, input_size, input_size, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total[0]


def ann_energy(macs: float) -> Dict:
    from snn import E_MAC_PJ
    return {"e_mac_pJ": E_MAC_PJ, "ann_uJ": macs * E_MAC_PJ * 1e-6}


# ---------------------------------------------------------------------------------------- images on disk
def image_files(src: str, flag: str = "--input", exts: Sequence[str] = IMAGE_EXTS) -> List[str]:
    """An image file, or the images of a folder (sorted)."""
    if not src or not os.path.exists(src):
        raise UserError(f"{flag} {src!r} does not exist", "pass an image file or a folder of images")
    if os.path.isdir(src):
        files = sorted(os.path.join(src, f) for f in os.listdir(src) if f.lower().endswith(tuple(exts)))
        if not files:
            raise UserError(f"{flag} {src} holds no images ({', '.join(exts)})", "pass another folder")
        return files
    return [src]


def read_each(files: Sequence[str], read: Callable[[str], object]) -> Iterator[Tuple[str, object]]:
    """``(path, read(path))`` for each file; a file that cannot be read or decoded is skipped with a
    one-line warning (a single file named on its own is an error)."""
    from . import dist
    skipped = 0
    for f in files:
        try:
            img = read(f)
        except (OSError, ValueError, RuntimeError, UserError) as e:
            why = e.what if isinstance(e, UserError) else f"cannot read {f} ({' '.join(str(e).split())[:200]})"
            if len(files) == 1:
                raise UserError(why, "pass an image file PIL can decode") from None
            dist.warn_once(f"skipped: {why}")
            skipped += 1
            continue
        yield f, img
    if skipped:
        log(f"{skipped} of {len(files)} files skipped (unreadable)")


def image_size_from(ckpt: dict, *keys: str) -> Optional[int]:
    """The first of ``keys`` a checkpoint (or its recorded ``args``) holds."""
    for k in keys:
        if ckpt.get(k) is not None:
            return int(ckpt[k])
    a = ckpt.get("args") or {}
    for k in keys:
        if isinstance(a, dict) and a.get(k) is not None:
            return int(a[k])
    return None
