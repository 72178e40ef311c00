"""The task-agnostic SNN pipeline: checkpoint -> convert (T, signed / unsigned) -> evaluate with the
task's metric (ANN and SNN on the same images, the metric after every time step) -> fine-tune with the
task's score -> save in ANN format.

A task supplies only its model, data, loss and a *metric*: an object with

* ``update(output, batch)`` -- the model's output for one batch (on the device, the structure the model
  returns: a tensor, a tuple or a dict) and the batch as the loader gave it (targets included);
* ``compute() -> dict``     -- the metric over everything seen, reduced over the DDP ranks (the task's
  primary key in it, e.g. ``"top1"``, ``"map"``, ``"miou"``).

:func:`evaluate_snn` calls ``make_metric()`` once for the ANN and once per time step of the SNN; the
SNN's figure is the one after the last step. Nothing here imports :mod:`snn` at import time (scripts
named ``snn.py`` must be able to fix ``sys.path`` first).
"""
from __future__ import annotations

import os
import time
from typing import Callable, List, Mapping, Optional, Protocol, Sequence

import torch
import torch.nn as nn

from . import dist
from .checkpoint import atomic_save, load_checkpoint
from .errors import UserError
from .logger import log as _log
from .logger import progress as _progress


class Metric(Protocol):  # pragma: no cover - a description
    def update(self, output, batch) -> None: ...

    def compute(self) -> dict: ...


def default_inputs(batch):
    """The model input(s) of a loader batch: ``batch[0]`` of a tuple / list (``(images, targets)``),
    ``batch["image"]`` (or ``"images"`` / ``"input"``) of a dict, else the batch itself."""
    from snn.finetune import default_inputs as pick
    return pick(batch)


def _to_device(x, device):
    from snn.prefix_cache import _to_device as move  # one definition (the fine-tuner's)
    return move(x, device)


def _as_args(x) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _batches(loader, max_batches: Optional[int]):
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        yield batch


def _total(loader, max_batches):
    n = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None:
        n = max_batches if n is None else min(n, max_batches)
    return n


# ---------------------------------------------------------------------------------------- conversion
def convert(ann: nn.Module, *, T: Optional[int] = None, signed: bool = True, chunk: Optional[int] = None,
            settle: int = 0, backend: Optional[str] = None):
    """:func:`snn.convert` with one-line errors (``ConversionError`` is a user error)."""
    import snn
    if chunk is not None and chunk < 1:
        raise UserError(f"--chunk {chunk} must be at least 1", "pass a positive number of steps, or omit it")
    if T is not None and T < 1:
        raise UserError(f"--T {T} must be at least 1", "pass a positive number of time steps, or omit it (2^bit - 1)")
    if settle:
        if settle < 0:
            raise UserError(f"--settle {settle} must not be negative", "pass the number of extra steps K >= 0")
        if not signed:
            raise UserError("--settle needs signed neurons (it lets each neuron cancel spikes until its count "
                            "equals the quantized ANN's level)", "drop -u/--unsigned, or drop --settle")
    kw = {"settle": settle} if settle else {}
    if backend is not None:
        kw["backend"] = backend
    net = snn.convert(ann, T=T, signed=signed, chunk=chunk, **kw)
    return net


def convert_trained(model: nn.Module, ckpt: Mapping, args, name: str, device=None):
    """The SNN of a trained checkpoint's ANN with the flags of :func:`add_snn_args`: ``--T``, else the
    T a fine-tuned checkpoint was tuned at, else 2^bit - 1; logs what was built."""
    T = args.T if args.T is not None else (ckpt.get("T") if ckpt.get("snn_finetuned") else None)
    net = convert(model, T=T, signed=not args.unsigned, chunk=args.chunk, settle=getattr(args, "settle", 0) or 0)
    _log(f"converted {name} -> SNN, T={net.T}, {'signed' if net.signed else 'unsigned'} IF neurons "
         f"({len(net.neurons())} spiking layers)")
    return net.to(device) if device is not None else net


def add_snn_args(p):
    """The conversion flags of every SNN evaluation / fine-tuning script."""
    p.add_argument("-u", "--unsigned", action="store_true",
                   help="traditional (unsigned) IF neurons; default signed (may emit -theta)")
    p.add_argument("--T", type=int, default=None, help="time steps (default 2^bit - 1)")
    p.add_argument("--chunk", type=int, default=None, metavar="K",
                   help="simulate at most K time steps at once (bounded memory; same result)")
    p.add_argument("--settle", type=int, default=0, metavar="K",
                   help="run K extra steps with the input and every bias / BN shift off, so each neuron's count "
                        "moves to the quantized ANN's level (signed neurons only; default 0 = the paper's SNN)")
    p.add_argument("--tune-malloc", action="store_true",
                   help="keep freed memory in the process heap (glibc mallopt, process-wide): the SNN "
                        "reallocates the same large spike trains every batch; a little faster on the CPU (opt-in)")
    return p


def tune_malloc_if_asked(args, log: Callable[[str], None] = None) -> bool:
    """``--tune-malloc`` (opt-in, :func:`add_snn_args`): keep freed blocks in the heap instead of returning
    them to the OS and page-faulting them back (glibc). Never applied unless the flag is given."""
    if not getattr(args, "tune_malloc", False):
        return False
    from quant.fused import tune_malloc
    ok = tune_malloc()
    (log or _log)("--tune-malloc: " + ("freed memory stays in the process heap" if ok
                                       else "not applied (no glibc mallopt here)"))
    return ok


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, loader, make_metric: Callable[[], object], *, inputs: Callable = None,
             device=None, progress: bool = True, desc: str = "eval", max_batches: Optional[int] = None) -> dict:
    """A plain (ANN) evaluation: the metric's dict over the loader."""
    device = device or dist.context().device
    pick = inputs or default_inputs
    model.eval()
    metric = make_metric()
    for batch in _progress(_batches(loader, max_batches), desc, progress, total=_total(loader, max_batches)):
        metric.update(model(*_as_args(_to_device(pick(batch), device))), batch)
    return metric.compute()


@torch.no_grad()
def evaluate_snn(ann: nn.Module, net, loader, make_metric: Callable[[], object], *, key: str,
                 inputs: Callable = None, device=None, progress: bool = True, desc: str = "snn eval",
                 max_batches: Optional[int] = None) -> dict:
    """ANN and SNN side by side on the same images (:class:`snn.Monitor`).

    Returns ``{key: SNN after the last step, "ann_<key>": ANN, "per_step_<key>": [t = 1..T(+settle)],
    "snn": the SNN's metric dict, "ann": the ANN's, "T", "neuron", "settle", "samples", "layers"
    (per spiking layer: firing_rate, agreement, mean_abs_error, mse, threshold), "sops", "snn_macs",
    "ann_macs", "energy", "seconds"}``.
    """
    import snn
    device = device or dist.context().device
    pick = inputs or default_inputs
    ann.eval()
    net.eval()
    ann_metric = make_metric()
    steps_metrics: Optional[List] = None
    t0 = time.time()
    with snn.Monitor(ann, net) as mon:
        for batch in _progress(_batches(loader, max_batches), desc, progress, total=_total(loader, max_batches)):
            x = _as_args(_to_device(pick(batch), device))
            ann_out, sim = mon.run(*x, lazy=True)
            ann_metric.update(ann_out, batch)
            if steps_metrics is None:
                steps_metrics = [make_metric() for _ in range(len(sim))]
            for t, m in enumerate(steps_metrics, 1):
                m.update(sim.output(t), batch)
        stats = mon.summary()
    if steps_metrics is None:
        raise UserError("the evaluation loader is empty", "check the data root / split")
    per_step = [m.compute() for m in steps_metrics]
    ann_res = ann_metric.compute()
    final = per_step[-1]
    if key not in final:
        raise KeyError(f"the metric's compute() has no {key!r} (keys: {sorted(final)})")
    out = {key: final[key], f"ann_{key}": ann_res[key], f"per_step_{key}": [r[key] for r in per_step],
           "snn": final, "ann": ann_res, "settle": int(getattr(net, "settle", 0)), "seconds": time.time() - t0}
    out.update({k: stats[k] for k in ("T", "neuron", "samples", "layers", "sops", "snn_macs", "ann_macs",
                                      "energy")})
    return out


# ---------------------------------------------------------------------------------------- fine-tuning
MIN_STEPS = 50  # --min-steps: SGD steps per fine-tuning epoch at least (docs/fidelity.md, "Regimes")


def add_method_args(p, *, default: str = "fastsnn", losses: Sequence[str] = ("mse", "kl"),
                    default_loss: str = "mse", loss_help: str = "",
                    epochs_default: int = 1, epochs_help: str = ""):
    """The fine-tuning method flags shared by every ``snn_ft.py``: ``--method`` (stages of
    :data:`snn.finetune.STAGES` joined by '+'), the end-to-end stage's ``--e2e-batches / --e2e-epochs /
    --e2e-lr / --e2e-loss`` (``losses``: the names the task accepts; ``kl`` / ``mse`` compare with the
    ANN's output, a task's own name -- ``ce``, ``yolo`` -- is its training loss on the labels) and the
    layer-wise accept test ``--ft-accept score|local``, ``--local-batches``."""
    p.add_argument("--method", default=default, metavar="STAGES",
                   help="fine-tuning method: stages joined by '+' from fastsnn (the original layer-wise algorithm), "
                        "bias (bias correction), bnstats (BN statistics from SNN rates), e2e (an end-to-end "
                        "straight-through pass after the layer-wise stages, loss --e2e-loss; last); "
                        f"default {default}; --method fastsnn is the original algorithm")
    p.add_argument("--e2e-batches", "--e2e_batches", dest="e2e_batches", type=int, default=None, metavar="N",
                   help="batches per epoch of the end-to-end stage (default: those of the layer-wise stage, "
                        "--max-iters; a full pass when that is not given)")
    p.add_argument("--e2e-loss", "--e2e_loss", dest="e2e_loss", default=default_loss, choices=tuple(losses),
                   help=loss_help or "loss of the end-to-end stage: kl = KL divergence to the quantized ANN's "
                                     "logits, mse = squared error to its output")
    p.add_argument("--e2e-epochs", "--e2e_epochs", dest="e2e_epochs", type=int, default=epochs_default, metavar="N",
                   help=epochs_help or f"epochs of the end-to-end stage, each kept only if the accept / revert "
                                       f"score improves (default {epochs_default})")
    p.add_argument("--e2e-lr", "--e2e_lr", dest="e2e_lr", type=float, default=None, metavar="LR",
                   help="learning rate of the end-to-end stage, cosine-decayed (default: --lr)")
    p.add_argument("--ft-accept", "--ft_accept", dest="ft_accept", choices=("auto", "score", "local"),
                   default="auto",
                   help="without --force, how a layer-wise step is judged: score = the whole SNN's score on "
                        "--score-batches training batches must improve (the original's test); local = the tuned "
                        "layer's own rate error against the ANN's activation must fall, on --local-batches training "
                        "batches drawn once (the end-to-end stage is judged by the score either way); auto "
                        "(default) = score for --method fastsnn (the original algorithm, unchanged), local for "
                        "every other method (the better measured, docs/fidelity.md)")
    p.add_argument("--local-batches", "--local_batches", dest="local_batches", type=int, default=8, metavar="N",
                   help="batches of the --ft-accept local test (default 8)")
    p.add_argument("--min-steps", "--min_steps", dest="min_steps", type=int, default=MIN_STEPS, metavar="N",
                   help="every layer-wise and end-to-end epoch makes at least N SGD steps: a fine-tuning set of fewer "
                        f"batches is cycled (default {MIN_STEPS}; 0: one pass per epoch; --method fastsnn, the original "
                        "algorithm, always makes one pass)")
    return p


def check_method(method: str, flag: str = "--method"):
    """A one-line error unless ``method`` is distinct stages of :data:`snn.finetune.STAGES` joined by
    '+', the end-to-end stage (if any) last -- before any data is read."""
    import importlib
    stages_ok = importlib.import_module("snn.finetune").STAGES  # snn.finetune is also the function
    stages = method.split("+")
    hint = f"choose stages of {', '.join(stages_ok)} joined by '+', e.g. fastsnn+e2e (fastsnn: the original)"
    if not all(st in stages_ok for st in stages) or len(set(stages)) != len(stages):
        raise UserError(f"{flag} {method!r} is not a method", hint)
    if "e2e" in stages and stages[-1] != "e2e":
        raise UserError(f"{flag} {method!r}: the end-to-end stage e2e must come last", hint)


def check_method_args(args):
    """One-line errors for the :func:`add_method_args` flags."""
    if getattr(args, "e2e_lr", None) is not None and args.e2e_lr < 0:
        raise UserError(f"--e2e-lr {args.e2e_lr} must not be negative", "pass a value >= 0")
    if getattr(args, "min_steps", 0) < 0:
        raise UserError(f"--min-steps {args.min_steps} must not be negative", "pass 0 (one pass per epoch) or more")
    for name in ("e2e_batches", "e2e_epochs", "local_batches"):
        v = getattr(args, name, 1)
        if v is not None and v < 1:
            raise UserError(f"--{name.replace('_', '-')} {v} must be at least 1", "pass a positive number")
    if getattr(args, "method", None) is not None:
        check_method(args.method)


def method_options(args) -> dict:
    """The JSON-ready settings of the :func:`add_method_args` flags that :func:`snn.finetune` takes: the
    accept test (only when not the default) and, for a method with the end-to-end stage, its ``e2e_*``
    settings (``--method fastsnn`` passes none, so it runs the original algorithm)."""
    opts = {}
    accept = accept_mode(getattr(args, "ft_accept", "score"), args.method)
    if accept != "score" and not getattr(args, "force", False):
        opts.update(accept=accept, local_batches=args.local_batches)
    if args.method != "fastsnn" and getattr(args, "min_steps", 0):
        opts["min_steps"] = args.min_steps
    if "e2e" not in args.method.split("+"):
        return opts
    return {**opts, "e2e_batches": args.e2e_batches, "e2e_epochs": args.e2e_epochs, "e2e_lr": args.e2e_lr,
            "e2e_loss": args.e2e_loss}


def accept_mode(mode: str, method: str) -> str:
    """``--ft-accept`` resolved: ``auto`` is ``score`` for ``--method fastsnn`` (the original algorithm and its
    accept / revert test) and ``local`` for every other method."""
    if mode == "auto":
        return "score" if method == "fastsnn" else "local"
    return mode


def finetune_options(args, task_losses: Optional[Mapping[str, Callable]] = None) -> dict:
    """:func:`method_options` as :func:`snn.finetune` takes them: a task loss named by ``--e2e-loss``
    (``task_losses``: name -> ``loss(output, ann_output, batch)``) replaced by its callable."""
    opts = dict(method_options(args))
    if opts.get("e2e_loss") in (task_losses or {}):
        opts["e2e_loss"] = task_losses[opts["e2e_loss"]]
    return opts


def method_text(args, max_batches=None, score: str = "the score") -> str:
    """A one-line description of the chosen method and its accept / revert test for the run's log
    (``score``: what the task's score is, e.g. "train top-1 (8 batches)")."""
    opts = method_options(args)
    if getattr(args, "force", False):
        acc = ", --force (every step kept)"
    elif "accept" in opts:
        acc = (f", layer-wise steps kept if the layer's error on {opts['local_batches']} batches falls"
               + (f", end-to-end epochs if {score} improves" if "e2e_loss" in opts else ""))
    else:
        acc = f", each step kept if {score} improves"
    if "e2e_loss" not in opts:
        return args.method + acc
    lr = opts["e2e_lr"] if opts["e2e_lr"] is not None else args.lr
    n = opts["e2e_batches"] if opts["e2e_batches"] is not None else (max_batches or "all")
    return (f"{args.method} (e2e: {n} batches x {opts['e2e_epochs']} epoch(s), lr {lr}, "
            f"loss {opts['e2e_loss']}){acc}")


def finetune(ann: nn.Module, net, loader, *, score: Optional[Callable] = None, inputs: Callable = None,
             epochs: int = 1, lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 1e-4,
             bn_mode: str = "recalibrate", max_batches: Optional[int] = None, cache="auto",
             cache_mb: float = 2048, layers: Optional[List[str]] = None, progress: bool = True,
             log: Callable[[str], None] = _log, tb=None, device=None, method: str = "fastsnn",
             method_options: Optional[Mapping] = None) -> List[dict]:
    """Layer-wise fine-tuning (:func:`snn.finetune`) of any converted network. ``score(net) -> float``
    (higher is better, e.g. the task's metric on a few training batches) decides whether a tuned layer
    is kept; ``None`` accepts every layer (``--force``). ``method``: :data:`snn.finetune.METHODS`
    (``"fastsnn"``: the original algorithm); ``method_options``: its further arguments (``bias_iters``,
    ``e2e_epochs``, ``e2e_lr``, ``e2e_loss``, ``schedule``, ...)."""
    import snn
    if epochs < 1:
        raise UserError(f"-n/--num_epochs {epochs} must be at least 1", "pass -n 1 or more")
    device = device or dist.context().device
    history = snn.finetune(ann, net, loader, epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
                           bn_mode=bn_mode, force=score is None, score_fn=score, device=device, log=log,
                           progress=progress, max_batches=max_batches, layers=layers, cache=cache,
                           cache_mb=cache_mb, inputs=inputs, method=method, **dict(method_options or {}))
    if tb is not None:
        for i, h in enumerate(history):
            last = h["epochs"][-1] if h["epochs"] else {}
            tb.scalars(i + 1, "finetune/", mse=last.get("loss_mean"), score=last.get("score"),
                       accepted=float(h["accepted"]))
    return history


def save_finetuned(path: str, net, meta: Mapping) -> str:
    """Write the fine-tuned SNN as an ANN checkpoint (``state_dict`` with the ANN's keys, loadable by
    the task's ANN class and converted again) plus ``meta``; atomic; main process only."""
    if dist.is_main():
        rec = dict(meta)
        rec.update(state_dict=net.ann_state_dict(), snn_finetuned=True, T=net.T,
                   neuron="signed" if net.signed else "unsigned")
        atomic_save(rec, path)
    return path


# ---------------------------------------------------------------------------------------- backbones
def _map_key(k: str, prefix_map: Optional[Mapping[str, str]]) -> Optional[str]:
    if not prefix_map:
        return k
    for old, new in prefix_map.items():
        if k.startswith(old):
            return None if new is None else new + k[len(old):]
    return k


def load_backbone(model: nn.Module, src, *, prefix_map: Optional[Mapping[str, Optional[str]]] = None,
                  log: Callable[[str], None] = _log, what: str = "--init") -> dict:
    """Explicit partial loading (a classification backbone into a detector / segmenter; the original
    used ``strict=False``): every checkpoint key whose name -- after ``prefix_map`` (``{"old.": "new.",
    "fc.": None}``: rename / drop prefixes, first match wins) and a leading ``module.`` -- and shape
    match the model is loaded; the model's other keys keep their initialisation (quantizer clips are
    reset to their defaults); keys the model does not have are ignored. One log line says what was
    loaded, initialised and ignored. A key present in both with another shape is an error (it means
    the wrong checkpoint or architecture), as is a checkpoint sharing no key with the model.

    ``src``: a checkpoint path or a state dict. Returns ``{"loaded", "initialised", "ignored"}`` (key lists).
    """
    if isinstance(src, (str, os.PathLike)):
        sd = load_checkpoint(str(src), what, "pass a classification checkpoint (model_best.pth.tar) or a "
                                             "torchvision state dict")["state_dict"]
        name = str(src)
    else:
        sd, name = src, "the given state dict"
    import quant
    sd = quant.strip_prefix(sd)
    mapped = {}
    for k, v in sd.items():
        nk = _map_key(k, prefix_map)
        if nk is not None:
            mapped[nk] = v
    own = model.state_dict()
    loaded, bad = [], []
    for k, v in own.items():
        if k in mapped:
            if tuple(mapped[k].shape) != tuple(v.shape):
                bad.append(f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}")
            else:
                loaded.append(k)
    if bad:
        raise UserError(f"{what} {name} does not fit the model: shape mismatch for {', '.join(bad[:3])}"
                        + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""),
                        "check --width / the architecture of the backbone checkpoint")
    if not loaded:
        raise UserError(f"{what} {name} shares no parameter name with the model",
                        "pass a backbone checkpoint of this architecture (or the matching key prefix map)")
    initialised = [k for k in own if k not in mapped]
    ignored = [k for k in mapped if k not in own]
    model.load_state_dict({k: mapped[k] for k in loaded}, strict=False)
    modules = dict(model.named_modules())
    for k in initialised:
        if k.endswith(("act_alpha", "wgt_alpha")):
            mod = modules.get(k.rsplit(".", 1)[0])
            if mod is not None and hasattr(mod, "reset_quantizer"):
                mod.reset_quantizer()

    def short(keys):
        return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
    log(f"{what}: loaded {len(loaded)} tensors from {name}; initialised {len(initialised)} "
        f"({short(initialised) or 'none'}); ignored {len(ignored)} ({short(ignored) or 'none'})")
    return {"loaded": loaded, "initialised": initialised, "ignored": ignored}


__all__ = ["Metric", "default_inputs", "convert", "add_snn_args", "tune_malloc_if_asked", "add_method_args",
           "check_method", "check_method_args", "method_options", "accept_mode", "finetune_options", "method_text",
           "evaluate", "evaluate_snn", "finetune", "save_finetuned", "load_backbone"]
