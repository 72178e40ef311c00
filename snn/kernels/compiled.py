"""The torch.compile backend: the reference dynamics (:func:`~snn.kernels.reference.if_step`), unrolled
over the window's T steps and compiled by ``torch.compile`` (inductor: C++ / OpenMP on CPU, Triton on
CUDA), dynamic in the number of neurons.

Every variant (T, signed, bounded, residual, state in / out, in place) is its own function object with
its own code object, so each compiles once and none evicts another from dynamo's per-code cache. The
functions work on flat ``[T, N]`` views of the dense operands; in place, the result is written back
into the input current (inductor stores straight into it). Thresholds arrive as 0-dim tensors (no
recompilation when they change). A failure to compile (no C++ compiler, unsupported platform) raises
:class:`~snn.kernels.cpp.BackendUnavailable`; the dispatcher then falls back once, with a warning.
"""
from __future__ import annotations

import threading

import torch

from .cpp import BackendUnavailable
from .reference import if_constant_counts, if_step

_FNS = {}
_LOCK = threading.Lock()
_STATE = {"error": None}

# the loop, instantiated once per variant (exec gives every variant a new code object)
_SRC = '''
def loop(cur, res, v, n, theta, neg_level, scale, dst):
    """[T, N] currents (+ residual) -> spikes * scale, final state (flags baked in: %(key)s)."""
    if not VIN:
        v = torch.zeros_like(cur[0]) + theta * 0.5
        n = torch.zeros_like(v)
    elif not SIGNED:
        n = None
    outs = []
    for t in range(T):
        x = cur[t] + res[t] if RES else cur[t]
        s, v, n = if_step(v, n, x, theta, neg_level, SIGNED, BOUND)
        outs.append(s * scale)
    out = torch.stack(outs)
    if INPLACE:  # into the current itself or a given buffer (dst)
        dst.copy_(out)
        out = None
    if VOUT:
        return out, v, (n if SIGNED else None)
    return out, None, None
'''

_CONST_SRC = '''
def const(cur, theta, scale, dst):
    """Closed form of a constant-current layer, steps %(key)s."""
    n = if_constant_counts(cur, theta, T0, STEPS, TMAX)
    s = ((n[1:] - n[:-1]) * scale).reshape(STEPS * cur.shape[0], *cur.shape[1:])
    if DST:  # into a given buffer (its layout)
        dst.copy_(s)
        return None
    if CL:
        s = s.contiguous(memory_format=torch.channels_last)
    return s
'''


def _make(src, name, key, consts):
    g = {"torch": torch, "if_step": if_step, "if_constant_counts": if_constant_counts, **consts}
    code = compile(src % {"key": key}, f"<fastsnn-compiled-{name}-{key}>", "exec")
    exec(code, g)  # noqa: S102 - our own template, constants only
    # emulate_precision_casts: on CUDA inductor's Triton code then keeps every mul / add separately
    # rounded (no FMA contraction), as the reference computes them; on CPU it compiles with
    # -ffp-contract=off already
    return torch.compile(g[name], dynamic=True, fullgraph=True, options={"emulate_precision_casts": True})


def _get(kind, key, consts):
    k = (kind,) + key
    fn = _FNS.get(k)
    if fn is None:
        with _LOCK:
            fn = _FNS.get(k)
            if fn is None:
                fn = _make(_SRC if kind == "if" else _CONST_SRC, "loop" if kind == "if" else "const",
                           "_".join(map(str, key)), consts)
                _FNS[k] = fn
    return fn


def _guard(call):
    if _STATE["error"] is not None:
        raise BackendUnavailable(_STATE["error"])
    try:
        return call()
    except BackendUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - no compiler, unsupported platform ...
        msg = str(e).strip().splitlines()
        _STATE["error"] = (f"torch.compile of the IF kernel failed ({type(e).__name__}: "
                           f"{(msg[0] if msg else '')[:300]})")
        raise BackendUnavailable(_STATE["error"]) from e


def _flat(t, shape):
    return t.as_strided(shape, (shape[1], 1) if len(shape) == 2 else (1,))


def run(cur, th, neg, signed, residual, v, n, state, sc, inplace, bound, out=None):
    """:func:`snn.kernels.if_steps` compiled (operands already dense in ``cur``'s layout; ``th`` /
    ``neg`` / ``sc``: 0-dim tensors of ``cur``'s dtype; ``out``: a buffer of ``cur``'s layout to write
    the result into)."""
    T = cur.shape[0]
    N = cur[0].numel() if T else 0
    if T == 0 or N == 0:
        if out is not None:
            s, v2, n2 = _empty(cur, th, signed, v, n, state, False)
            return out, v2, n2
        return _empty(cur, th, signed, v, n, state, inplace)
    mode = 2 if out is not None else int(inplace)  # 0: new tensor, 1: into cur, 2: into out
    key = (T, int(signed), int(bound is not None), int(residual is not None), int(v is not None), int(state),
           mode)
    consts = {"T": T, "SIGNED": bool(signed), "BOUND": bound, "RES": residual is not None, "VIN": v is not None,
              "VOUT": bool(state), "INPLACE": mode > 0}
    if bound is not None:
        key = key + (int(bound),)
    fn = _get("if", key, consts)
    c = _flat(cur, (T, N))
    r = _flat(residual, (T, N)) if residual is not None else None
    vv = _flat(v, (N,)) if v is not None else None
    nn_ = _flat(n, (N,)) if (v is not None and signed) else None
    d = _flat(out, (T, N)) if mode == 2 else (c if mode == 1 else None)
    s, v2, n2 = _guard(lambda: fn(c, r, vv, nn_, th, neg, sc, d))
    s = out if mode == 2 else cur if mode == 1 else s.as_strided(cur.size(), cur.stride())  # cur's memory order
    if state:
        c0 = cur[0]
        v2 = v2.as_strided(c0.size(), c0.stride())
        n2 = n2.as_strided(c0.size(), c0.stride()) if signed else None
    return s, v2, n2


def _empty(cur, th, signed, v, n, state, inplace):
    from .reference import init_state
    out = cur if inplace else torch.empty_like(cur)
    if not state:
        return out, None, None
    v, n = init_state(cur if cur.shape[0] else cur.new_empty((1,) + cur.shape[1:]), th, signed, v, n)
    return out, v, n if signed else None


def run_const(current, th, t0, steps, T, sc, channels_last, out=None):
    cl = current.dim() == 4 and (channels_last or (current.is_contiguous(memory_format=torch.channels_last)
                                                   and not current.is_contiguous()))
    key = (int(t0), int(steps), int(T), int(cl), int(out is not None))
    fn = _get("const", key, {"T0": int(t0), "STEPS": int(steps), "TMAX": int(T), "CL": cl, "DST": out is not None})
    s = _guard(lambda: fn(current, th, sc, out))
    return out if out is not None else s
