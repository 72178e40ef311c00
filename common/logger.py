"""Console / TensorBoard output, on the main process only."""
from __future__ import annotations

import sys
from typing import Iterable, Optional

from . import dist


def log(msg: str):
    """Print on the main process (through tqdm, so progress bars stay intact)."""
    if dist.is_main():
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stdout)
        sys.stdout.flush()


def progress(iterable: Iterable, desc: str, enabled: bool = True, total: Optional[int] = None, leave: bool = False):
    """A tqdm bar on the main process when ``enabled``; the bare iterable otherwise.

    The bar must not change what the loop computes: it is the plain ``tqdm.tqdm``, which iterates
    ``iterable`` once, when the loop does. (``tqdm.auto`` outside a notebook is ``tqdm.asyncio``, whose
    constructor calls ``iter(iterable)`` eagerly: for a ``DataLoader`` that is an extra, discarded epoch
    iterator -- it draws a base seed from torch's global RNG (so every later shuffle and augmentation
    changed with ``--progress``) and, with workers, starts a second set of worker processes.)
    """
    if not (enabled and dist.is_main()):
        return iterable
    from tqdm import tqdm
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, desc=desc, total=total, leave=leave, dynamic_ncols=True, file=sys.stderr)


class TensorBoard:
    """``SummaryWriter`` on the main process when ``log_dir`` is set; every call is a no-op otherwise."""

    def __init__(self, log_dir: Optional[str]):
        self.writer = None
        if log_dir and dist.is_main():
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=log_dir)

    def scalars(self, step: int, prefix: str = "", **values):
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None:
                self.writer.add_scalar(f"{prefix}{k}", float(v), step)

    def text(self, tag: str, text: str, step: int = 0):
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
