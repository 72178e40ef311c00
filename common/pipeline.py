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
from typing import Callable, List, Mapping, Optional, Protocol

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
    return p


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


__all__ = ["Metric", "default_inputs", "convert", "add_snn_args", "evaluate", "evaluate_snn", "finetune",
           "save_finetuned", "load_backbone"]
