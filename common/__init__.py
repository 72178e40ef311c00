"""Task-independent helpers shared by the classification / detection / segmentation scripts.

* :mod:`common.errors`     -- ``UserError`` and ``run_cli`` (one-line ``error: ...`` messages, exit 2);
* :mod:`common.cli`        -- one-line-error ``ArgumentParser``, script ``sys.path`` fix;
* :mod:`common.checkpoint` -- atomic checkpoint writes, safe (``weights_only``) loads;
* :mod:`common.dist`       -- device selection, DDP set-up (torchrun / torch.distributed.launch);
* :mod:`common.metrics`    -- meters reduced over ranks, atomic JSON (top-k accuracy: `classification.metrics`);
* :mod:`common.plots`      -- PNG figures (metric vs t, per-layer statistics, training curves);
* :mod:`common.logger`     -- rank-0 console output, tqdm bars, TensorBoard.

Nothing here imports ``snn`` at import time (task scripts named ``snn.py`` must be able to fix
``sys.path`` first, see :func:`common.cli.unshadow_script_dir`).
"""
from .errors import UserError, run_cli

__all__ = ["UserError", "run_cli"]
