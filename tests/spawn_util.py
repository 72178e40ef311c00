"""Run a function in N spawned processes and leave each one with ``os._exit`` once it has returned.

Gloo keeps C++ worker threads whose static destructors can abort a finished process at interpreter
exit ("terminate called without an active exception") on a loaded machine; the results are already
on disk by then, so a worker that returned skips that teardown.
"""
import os
import sys

import torch.multiprocessing as mp


def _run(rank, fn, args):
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, nprocs, *args):
    mp.spawn(_run, args=(fn, args), nprocs=nprocs, join=True)
