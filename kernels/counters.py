"""The zeroed int32 counters with which a launch's last program knows it is last (the fused batch reductions of
:func:`fastlt.kernels.reduce.last_program_reduces`): one per stream, one more per launch captured in a CUDA graph."""

from __future__ import annotations

import threading

import torch

COUNTER_SLOTS = 4096
# 16 bytes apart: Triton specialises a pointer on 16-byte alignment, so every slot gets the kernel variant the first
# one compiled (a capture's fresh slot must not compile a new variant inside the capture)
_SLOT_STRIDE = 4


class CounterBank:
    """Zeroed int32 counters of one device (:func:`reduce_counter`): one per stream (per thread on the CPU), and one
    more for each launch captured into a CUDA graph (a graph replays its launch on whatever stream it is given, so it
    keeps a counter of its own). A launch leaves its counter at 0. Not thread-safe (nor is graph capture)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"  # (asked once: each read of device.type makes a new string)
        self.slots = torch.zeros(COUNTER_SLOTS * _SLOT_STRIDE, dtype=torch.int32, device=device)
        # the interpreter's (CPU) words, read on the host: a launch interrupted between its programs (an exception,
        # Ctrl-C) leaves its slot set, and every later reduction on that thread would read it (garbage losses)
        self.words = None if self.cuda else self.slots.numpy()
        self.taken = 0
        self.by_stream: dict[int, torch.Tensor] = {}

    def fresh(self) -> torch.Tensor | None:
        if self.taken == COUNTER_SLOTS:
            return None
        start = self.taken * _SLOT_STRIDE
        self.taken += 1
        return self.slots[start:start + 1]


BANKS: dict[torch.device, CounterBank] = {}


def reduce_counter(device: torch.device) -> torch.Tensor | None:
    """A (1,) int32 device counter, 0 between launches, for a launch whose last program reduces the batch
    (``REDUCE``), or None when none can be had: the first use on a device is inside a CUDA-graph capture (the bank
    must be allocated outside it), or a process captured more than 4096 such launches. Then the caller launches
    the reduction on its own. Launches on one stream share its counter; those on other streams do not."""
    bank = BANKS.get(device)
    if bank is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        bank = BANKS[device] = CounterBank(device)
    if bank.cuda:
        if torch.cuda.is_current_stream_capturing():
            return bank.fresh()
        key = torch._C._cuda_getCurrentRawStream(device.index)
    else:
        key = threading.get_ident()  # the interpreter runs a launch on the calling thread
    # (a small step's host path runs this every launch that reduces: no helper calls, ~2 us in a step's context)
    counter = bank.by_stream.get(key)
    if counter is None:
        counter = bank.by_stream[key] = bank.fresh()
    elif bank.words is not None:  # the interpreter: a slot an interrupted launch left set is cleared first
        at = counter.storage_offset()
        if bank.words[at] or bank.words[at + 1]:
            bank.words[at:at + _SLOT_STRIDE] = 0
    return counter
