"""The backend's parallel=True kernels, callable from any Python thread and from a forked child.

Numba's threading layers are not all safe for either: "workqueue" (where neither TBB nor an OpenMP
runtime is found) aborts the process when two threads enter parallel code at once, and GNU OpenMP
("omp", the usual layer of a pip install on Linux) kills a forked child that enters parallel code
after its parent did ("fork() called from a process already using GNU OpenMP"). The layer is the
process's, shared with the user's own Numba code, so it is not ours to choose. Instead every
kernel call takes one lock (a kernel already uses every thread: running them one at a time costs
nothing; re-entrant, for a signal handler calling a kernel while the interrupted call compiles),
and in a child forked after the parent ran OpenMP-parallel code (pyqkern._numba_fork) the
kernels run as serial twins, compiled there on first use (same arithmetic, so the same bytes:
results never depend on the thread count).
"""
from __future__ import annotations

import os
import threading

from numba import njit

from .._numba_fork import forked_from_omp

_lock = threading.RLock()


def _after_fork_in_child():
    global _lock
    _lock = threading.RLock()  # another parent thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Kernel:
    def __init__(self, fn, opts):
        self._fn, self._opts = fn, opts
        self._par = njit(parallel=True, **opts)(fn)
        self._ser = None

    def __call__(self, *args):
        with _lock:
            if not forked_from_omp():
                return self._par(*args)
            if self._ser is None:  # not cached: Numba's cache key does not tell parallel from serial
                self._ser = njit(**dict(self._opts, cache=False))(self._fn)
            return self._ser(*args)


def pjit(**opts):
    """njit(parallel=True, **opts) for a kernel called from Python (not from other jitted code)."""
    return lambda fn: _Kernel(fn, opts)
