"""Command-line plumbing shared by every task script."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import DASH, EXIT_USER_ERROR


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``error: ... — ...``), exit status 2."""

    def error(self, message):
        from .errors import report_error
        report_error(f"error: {' '.join(message.split())} {DASH} run '{self.prog} --help' for the options")
        sys.exit(EXIT_USER_ERROR)


def unshadow_script_dir(script_file: str):
    """Drop the running script's folder from ``sys.path``.

    Python puts a script's own folder first on ``sys.path``, so ``classification/cifar10/snn.py``
    would shadow the ``snn`` package for every module the script imports. Call this before importing
    anything that imports ``snn`` (``common`` itself never does at import time).
    """
    here = os.path.dirname(os.path.realpath(script_file))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]


def usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plain_args(args) -> dict:
    """``argparse.Namespace`` -> dict of plain (checkpoint- and JSON-safe) values."""
    out = {}
    for k, v in vars(args).items():
        if v is None or isinstance(v, (bool, int, float, str)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out
