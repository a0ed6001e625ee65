"""Where independent simulations run: in this process, on a local process pool, or on Ray.

`Runner` is a context manager with one method, `unordered(fn, jobs)`: it calls `fn(job)` for every
job and yields `(key, result)` pairs as they finish. `fn` is a top-level function and every job
carries its own seeds, so the results do not depend on where or in which order a job ran: the
same seeds give the same rows on either backend. `unordered(fn, jobs, group=...)` keeps each pool
process to one group of jobs while it has any (jobs of a group share what a process memoises).
Ray is an optional extra (`pip install -e '.[ray]'`); it is imported only when asked for.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait

from simulator.errors import UserError

RAY_HINT = "pip install -e '.[ray]'"


def local_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1


def import_ray():
    """The `ray` module, or a one-line UserError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--ray and --ray-address need Ray, which the core install leaves out; install it with {RAY_HINT}") from None
    return ray


RAY_CONNECT_TIMEOUT_S = 5.0  # ray.init itself retries an absent head for minutes


def check_reachable(address: str, timeout_s: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """A TCP connection to a Ray head's `host:port` (or `ray://host:port`) opens within `timeout_s`,
    else one UserError line. `auto` and addresses without a port are left to Ray."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        if address != "auto":
            raise UserError(f"--ray-address must be host:port, ray://host:port or auto, got {address!r}")
        return
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise UserError(f"cannot reach Ray at {address}: {exc.strerror or exc}") from None


class Runner:
    """Run jobs on `workers` local processes (1: in this process), or on Ray: `ray=True` starts a
    local Ray with `workers` CPUs for the life of the runner, `ray_address` joins a running cluster
    (whose nodes must have this package installed). Use as `with Runner(...) as r:`."""

    def __init__(self, workers: int | None = None, ray: bool = False, ray_address: str | None = None):
        self.workers = local_cores() if workers is None else workers
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        self.use_ray = ray or ray_address is not None
        self.ray_address = ray_address
        self._ray = None
        self._pool: ProcessPoolExecutor | None = None
        self._lanes: list[ProcessPoolExecutor] | None = None  # one single-process pool per worker, for grouped jobs
        if self.use_ray:  # before any work: Ray installed, the cluster reachable
            import_ray()
            if ray_address:
                check_reachable(ray_address)

    @property
    def backend(self) -> str:
        if self.use_ray:
            return f"ray ({self.ray_address})" if self.ray_address else f"ray (local, {self.workers} CPUs)"
        return "in process" if self.workers == 1 else f"process pool ({self.workers} workers)"

    def __enter__(self) -> Runner:
        return self

    def _start_ray(self):
        """Ray, started (local) or joined (`ray_address`) on first use: a run with nothing to
        simulate starts nothing."""
        if self._ray is None:
            ray = import_ray()
            if ray.is_initialized():  # this process already joined a Ray (a notebook, a test): use it, leave it running
                return ray
            try:
                if self.ray_address:
                    ray.init(address=self.ray_address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
                else:
                    ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
            except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
                where = self.ray_address or "a local Ray"
                reason = " ".join(str(exc).split())[:200]
                raise UserError(f"cannot start or reach Ray at {where}: {reason}") from None
            self._ray = ray
        return self._ray

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
        for lane in self._lanes or ():
            lane.shutdown(cancel_futures=True)
        self._lanes = None
        if self._ray is not None:
            self._ray.shutdown()
            self._ray = None

    def unordered(self, fn: Callable, jobs: dict[Hashable, object], group: Callable[[object], Hashable] | None = None) -> Iterator[tuple[Hashable, object]]:
        """(key, fn(job)) for every item of `jobs`, in the order they finish. `group(job)`: jobs
        of one group share work a process keeps (memos), so on the process pool each process
        keeps to one group while it has jobs, and a free process takes a group no other works on
        (the first such in order) before it joins one."""
        if not jobs:
            return
        if self.use_ray:
            yield from self._ray_unordered(fn, jobs)
        elif self.workers == 1 or len(jobs) == 1:
            for key, job in jobs.items():
                yield key, fn(job)
        elif group is not None:
            yield from self._pool_grouped(fn, jobs, group)
        else:
            yield from self._pool_unordered(fn, jobs)

    def _pool_grouped(self, fn: Callable, jobs: dict, group: Callable[[object], Hashable]) -> Iterator[tuple[Hashable, object]]:
        if self._lanes is None:
            self._lanes = [ProcessPoolExecutor(max_workers=1) for _ in range(self.workers)]
        queues: dict[Hashable, deque] = {}
        for key, job in jobs.items():
            queues.setdefault(group(job), deque()).append(key)
        working: list[Hashable | None] = [None] * len(self._lanes)  # each lane's group
        running: dict[Future, tuple[int, Hashable]] = {}

        def feed(lane: int) -> None:
            if not queues:
                return
            g = working[lane]
            if g not in queues:
                g = next((h for h in queues if h not in working), next(iter(queues)))
            working[lane] = g
            key = queues[g].popleft()
            if not queues[g]:
                del queues[g]
            running[self._lanes[lane].submit(fn, jobs[key])] = (lane, key)

        for lane in range(len(self._lanes)):
            feed(lane)
        try:
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    lane, key = running.pop(future)
                    feed(lane)
                    yield key, future.result()
        finally:
            for future in running:
                future.cancel()

    def _pool_unordered(self, fn: Callable, jobs: dict) -> Iterator[tuple[Hashable, object]]:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.workers)
        futures: dict[Future, Hashable] = {self._pool.submit(fn, job): key for key, job in jobs.items()}
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield futures[future], future.result()
        finally:
            for future in pending:
                future.cancel()

    def _ray_unordered(self, fn: Callable, jobs: dict) -> Iterator[tuple[Hashable, object]]:
        ray = self._start_ray()
        remote = ray.remote(num_cpus=1)(fn)
        refs = {remote.remote(job): key for key, job in jobs.items()}
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                for ref in done:
                    yield refs[ref], ray.get(ref)
        finally:
            for ref in pending:
                ray.cancel(ref)
