"""User-facing errors: one line on stderr, exit status 2, no traceback.

A script's ``main(argv)`` raises :class:`UserError` (or one of the library errors listed in
:func:`user_error_types`) for anything the *user* can fix -- a bad flag, a missing data folder, a
checkpoint that does not fit the model, a diverging loss. :func:`run_cli` turns those into::

    error: <what is wrong> — <what to do>

Everything else is a bug and keeps its traceback.

Under a launcher (``torchrun`` / ``torch.distributed.launch``: every rank runs the same ``main`` and
usually hits the same error) the line is printed once, by rank 0; every rank exits with status 2, and
the line is also written to torchrun's per-rank error file (``TORCHELASTIC_ERROR_FILE``), so that
torchrun's own failure summary names the error instead of a hint about enabling tracebacks.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Optional, Sequence, Tuple, Type

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
DASH = "—"


class UserError(Exception):
    """Something the user can fix. ``str(e)`` is ``"<what> — <hint>"`` when a hint is given."""

    def __init__(self, what: str, hint: Optional[str] = None):
        self.what, self.hint = what, hint
        super().__init__(f"{what} {DASH} {hint}" if hint else what)


# library errors that are the user's to fix, with the hint appended when the message has none
_HINTS = {
    "CheckpointMismatchError": "check that --arch / --wbit (and the dataset's number of classes) match the "
                               "checkpoint, or pass the right --init",
    "ConversionError": "convert a model trained with quantized activations (--bit 2/3/4/5)",
    "FileNotFoundError": "check the path",
    "FileExistsError": "a file stands where an output folder goes: pass another path",
    "NotADirectoryError": "part of the path is a file, not a folder: pass another path",
    "IsADirectoryError": "a folder stands where a file goes: pass a file path",
    "PermissionError": "pass a path this user may write / read",
    "FloatingPointError": "lower the learning rate or check the data",
    "OutOfMemoryError": "lower -b/--batch-size (or use fewer time steps)",
}


def user_error_types() -> Tuple[Type[BaseException], ...]:
    """:class:`UserError` plus the library errors that mean bad input (imported lazily)."""
    types = [UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
             FloatingPointError]
    try:
        import quant
        types.append(quant.CheckpointMismatchError)
    except ImportError:  # pragma: no cover - quant is part of this project
        pass
    try:
        import snn
        types.append(snn.ConversionError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch
        types.append(torch.OutOfMemoryError)
    except (ImportError, AttributeError):  # pragma: no cover
        pass
    return tuple(types)


def worker_message(msg: str) -> str:
    """The message of an error raised in a ``DataLoader`` worker, which PyTorch re-raises with the worker's
    traceback as its text (``Caught X in DataLoader worker process N. Original Traceback ... X: <message>``);
    any other text as it is."""
    if "Original Traceback" not in msg:
        return msg
    last = msg.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1].strip() if ": " in last else last.strip()


def format_error(e: BaseException) -> str:
    """The one-line ``error: ...`` message for a user error (one raised in a ``DataLoader`` worker, which
    PyTorch re-raises with the worker's traceback as its text: that error's own message)."""
    if isinstance(e, UserError):
        msg = worker_message(str(e))
    elif isinstance(e, OSError) and e.filename:
        msg = f"{e.strerror or 'not found'}: {e.filename}"
    else:
        msg = str(e) or type(e).__name__
    hint = _HINTS.get(type(e).__name__)
    if hint and not isinstance(e, UserError) and DASH not in msg:
        msg = f"{msg} {DASH} {hint}"
    return "error: " + " ".join(msg.split())  # one line, whatever the message held


def launcher_rank() -> int:
    """The rank a launcher gave this process (``RANK``), 0 without a launcher."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def report_error(line: str):
    """Print ``line`` on rank 0 only; under torchrun also record it in this rank's error file."""
    if launcher_rank() == 0:
        print(line, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:  # the summary then falls back to torchrun's own text
            pass


def run_cli(main: Callable[[Optional[Sequence[str]]], object], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)``; user errors print one line (rank 0) and exit 2, Ctrl-C exits 130. Returns 0."""
    try:
        main(argv)
    except user_error_types() as e:
        report_error(format_error(e))
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        report_error(f"error: interrupted {DASH} rerun with --resume auto to continue from the last checkpoint")
        sys.exit(EXIT_INTERRUPTED)
    return 0
