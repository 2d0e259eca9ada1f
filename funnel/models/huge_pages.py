"""Large embedding tables and their optimiser moments in transparent huge pages (Linux), opt-in.

A row-wise update at 40M rows reads and writes rows scattered over gigabytes: with 4 KiB
pages nearly every row access misses the TLB. Asking the kernel for 2 MiB pages
(``madvise(MADV_HUGEPAGE)``, honoured where ``/sys/kernel/mm/transparent_hugepage/enabled`` is
``madvise`` or ``always``) before the memory is first touched made LazyAdam's step on a
40M x 18 table about 30% faster on this project's test machine. But the first touch then
compacts memory for the huge pages: zeroing one 2.9 GB moment took 23-25 s against 6-13 s on
that (memory-starved) machine, a one-off cost that a short run never earns back. So it is off
unless ``FUNNEL_HUGE_PAGES=1`` is set (docs/performance.md, "Large tables"). Elsewhere, or for
small tensors, the memory is left as it is; values never change either way.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
from torch import Tensor

_HUGE = 2 * 2**20  # one huge page
_MIN_BYTES = 64 * 2**20  # smaller tensors: the TLB covers them well enough
_MADV_HUGEPAGE = 14


def _advise(t: Tensor) -> None:
    """Ask for huge pages over the whole 2 MiB pages inside ``t``'s memory (a no-op elsewhere)."""
    if os.environ.get("FUNNEL_HUGE_PAGES") != "1":
        return
    if sys.platform != "linux" or t.device.type != "cpu" or t.nbytes < _MIN_BYTES:
        return
    start = (t.data_ptr() + _HUGE - 1) & ~(_HUGE - 1)
    end = (t.data_ptr() + t.nbytes) & ~(_HUGE - 1)
    if end <= start:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)
    except (OSError, AttributeError):  # no libc madvise: the ordinary pages
        return


def empty(*shape: int, like: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialised tensor (of ``like``'s shape, dtype and device, or ``shape``) whose memory
    asked for huge pages before anything touched it: fill it before use."""
    t = (
        torch.empty_like(like, memory_format=torch.contiguous_format)
        if like is not None
        else torch.empty(*shape, dtype=dtype)
    )
    _advise(t)
    return t


def zeros_like(t: Tensor) -> Tensor:
    """``torch.zeros_like(t)`` in huge pages where large enough."""
    return empty(like=t).zero_()
