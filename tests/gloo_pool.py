"""A pool of real ``torch.distributed`` processes (gloo, CPU) for the data-parallel tests: spawned once per test run,
fed case names through queues, each case run on every rank; hard timeouts so that a hang fails instead of eating CI.

The cases are the functions of :mod:`gloo_cases` (imported by name in the workers).
"""

from __future__ import annotations

import datetime
import queue
import socket
import traceback

import torch.multiprocessing as mp

CASE_TIMEOUT_S = 120
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, inbox, outbox) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        import gloo_cases

        outbox.put((rank, "ready", None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        outbox.put((rank, "error", traceback.format_exc()))
        return
    while True:
        name = inbox.get()
        if name is None:
            break
        try:
            outbox.put((rank, "ok", getattr(gloo_cases, name)()))
        except BaseException:  # noqa: BLE001
            outbox.put((rank, "error", traceback.format_exc()))
    dist.destroy_process_group()


class GlooPool:
    """``world`` spawned ranks; :meth:`run` one case on all of them -> the list of their results by rank."""

    def __init__(self, world: int = 2):
        ctx = mp.get_context("spawn")
        self.world = world
        self.closed = False
        self.outbox = ctx.Queue()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        port = free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.inboxes[r], self.outbox), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()
        self._collect("start", START_TIMEOUT_S)

    def _collect(self, what: str, timeout: float) -> list:
        results = [None] * self.world
        for _ in range(self.world):
            try:
                rank, status, value = self.outbox.get(timeout=timeout)
            except queue.Empty:
                self.close()
                raise TimeoutError(f"{what}: no answer from every rank within {timeout} s (a hang?)") from None
            if status == "error":  # the other ranks may wait in a collective: end the pool, fail what follows fast
                self.close()
                raise RuntimeError(f"{what} failed on rank {rank}:\n{value}")
            results[rank] = value
        return results

    def run(self, name: str) -> list:
        if self.closed:
            raise RuntimeError(f"{name}: the process pool was closed by an earlier failure")
        for box in self.inboxes:
            box.put(name)
        return self._collect(name, CASE_TIMEOUT_S)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for box in self.inboxes:
            box.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
