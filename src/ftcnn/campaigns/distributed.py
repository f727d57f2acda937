"""Running a campaign's trials in parallel (design §9).

Trials are independent and each draws its faults from (seed, point, trial),
so where a trial runs does not change its result. Three executors share one
interface, ``map(tasks) -> results as they finish``:

- ``LocalExecutor``: this process (the default);
- ``ProcessExecutor``: ``workers`` spawned processes on this machine, each
  with its own copy of the model and ``threads // workers`` torch threads
  (``threads``: the campaign's, else every core);
- ``RayExecutor``: Ray actors, on a local Ray started for the run
  (``ray=True``) or an existing cluster (``ray_address``). Ray is optional:
  ``pip install 'ftcnn[ray]'``.

In every case the driver alone writes SQLite, one commit per finished trial,
so killing it loses no committed trial and running it again resumes.

How many torch threads each process takes is ``ftcnn.campaigns.parallelism``'s policy (issue 24);
``apply_threads`` sets it, ``execution_record`` says in the summary what ran and why.
"""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import pickle
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from itertools import islice
from typing import Any, Iterable, Iterator, Protocol

import torch
from torch import nn

from ftcnn.campaigns import combined, parallelism
from ftcnn.campaigns.parallelism import worker_threads
from ftcnn.campaigns.trials import CampaignConfig, Runner, TrialResult, check_limit, cores

Task = tuple[float, int]
IN_FLIGHT_PER_WORKER = 2   # chunks queued per worker, so none waits for the driver
ROUNDS_PER_WORKER = 4      # with --trials auto: trials per round = workers * this


class Executor(Protocol):
    round_size: int

    def map(self, tasks: Iterable[Task]) -> Iterator[TrialResult]: ...

    def close(self) -> None: ...


def model_params(model: nn.Module | None) -> int | None:
    """Parameters of ``model`` (None when it is not known yet), as the thread policy weighs it."""
    return None if model is None else sum(p.numel() for p in model.parameters())


def apply_threads(threads: int | None, model: nn.Module | None = None, workers: int = 1) -> int:
    """Set this process's torch intra-op threads (``threads``, else the policy's choice,
    ``parallelism.plan``), remember why for the summary, and return the number set. The CLI calls
    it at the start of every long command."""
    if threads is not None:
        check_limit("threads", threads)  # 10^5 threads crashed torch (and starved the machine)
    chosen = parallelism.remember(parallelism.plan(model_params(model), threads, workers))
    torch.set_num_threads(chosen.threads)
    return chosen.threads


def execution_record(config: CampaignConfig, threads: int, pool: Executor | None = None) -> dict[str, Any]:
    """How a campaign ran (not identity): workers, torch threads per process, and who chose them
    and why (``threads_policy``; its name says "threads": it depends on the machine, not the numbers).
    ``threads``: what this process's trials started with, when they ran here; ``pool``: the executor
    they ran on (its changes of threads, if it made any)."""
    rebalanced = getattr(pool, "rebalance", None)
    if isinstance(rebalanced, parallelism.Rebalance):
        return {"workers": config.workers, "threads": threads, "threads_policy": rebalanced.record()}
    if config.parallel:
        per_worker = worker_threads(config.workers, config.threads)
        chosen = parallelism.plan(None, config.threads, config.workers)
        return {"workers": config.workers, "threads": per_worker, "threads_policy": chosen.record()}
    if config.threads is not None:
        chosen = parallelism.plan(None, config.threads)
    else:
        last = parallelism.applied()
        chosen = last if last is not None and last.threads == threads and last.workers == 1 else \
            parallelism.Plan(threads, 1, "caller", "torch's threads as the caller set them")
    return {"workers": config.workers, "threads": threads, "threads_policy": chosen.record()}


@contextlib.contextmanager
def using_threads(threads: int | None) -> Iterator[None]:
    """``threads`` torch threads inside the block (None: unchanged), restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def chunks(tasks: Iterable[Task], size: int) -> Iterator[list[Task]]:
    """``tasks`` ``size`` at a time, read as they are needed: a campaign's tasks may be a
    million trials per point, which must not be held in memory before the first one runs."""
    it = iter(tasks)
    while chunk := list(islice(it, size)):
        yield chunk


def _worker_config(config: CampaignConfig) -> CampaignConfig:
    return replace(config, workers=1, ray=False, ray_address=None)


class LocalExecutor:
    """Trials in this process, ``runner.batch`` at a time; threads the policy chose follow the
    machine between chunks (``parallelism.Rebalance``)."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.round_size = runner.batch
        self.rebalance = parallelism.rebalance(torch.get_num_threads())

    def map(self, tasks: Iterable[Task]) -> Iterator[TrialResult]:
        for chunk in chunks(tasks, self.runner.batch):
            yield from self.runner.run_many(chunk)
            if self.rebalance is not None and (threads := self.rebalance.due()) is not None:
                torch.set_num_threads(threads)

    def close(self) -> None:
        pass


# --- worker processes ---------------------------------------------------------

_RUNNER: Runner | None = None


def _init_worker(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 config: CampaignConfig, threads: int) -> None:
    """Prepare this worker's runner on private copies: tensors that arrive through
    multiprocessing or Ray may share memory with other workers, and faults are
    injected in place."""
    global _RUNNER
    torch.set_num_threads(threads)
    model, inputs, labels = copy.deepcopy(model), inputs.clone(), labels.clone()
    _RUNNER = combined.campaign_runner(model, inputs, labels, _worker_config(config))


def _init_from_bytes(payload: bytes, threads: int) -> None:
    _init_worker(*pickle.loads(payload), threads)  # our own bytes, made by the driver


def _run_chunk(tasks: list[Task]) -> list[TrialResult]:
    assert _RUNNER is not None, "worker not initialised"
    return _RUNNER.run_many(tasks)


class ProcessExecutor:
    """``config.workers`` spawned processes (spawn, not fork: a forked OpenMP
    runtime can hang), each preparing its own runner once."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 config: CampaignConfig) -> None:
        self.workers = config.workers
        self.chunk = config.batch_trials or 1
        self.round_size = self.workers * ROUNDS_PER_WORKER * self.chunk
        self.pool = ProcessPoolExecutor(
            max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_from_bytes,
            # plain pickle copies the tensors; multiprocessing's own pickler would move
            # them to shared memory that every worker then writes its faults into
            initargs=(pickle.dumps((model, inputs, labels, config)),
                      worker_threads(self.workers, config.threads)))

    def map(self, tasks: Iterable[Task]) -> Iterator[TrialResult]:
        queue = chunks(tasks, self.chunk)
        running: set[Any] = set()
        limit = self.workers * IN_FLIGHT_PER_WORKER
        while True:
            while len(running) < limit and (chunk := next(queue, None)) is not None:
                running.add(self.pool.submit(_run_chunk, chunk))
            if not running:
                return
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                yield from future.result()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)  # results are committed; let them exit


# --- Ray --------------------------------------------------------------------------

def import_ray() -> Any:
    """Ray, or a one-line error saying how to get it."""
    try:
        import ray
    except ImportError:
        raise ValueError("Ray is not installed; install it with: pip install 'ftcnn[ray]'") from None
    return ray


def _actor_class(ray: Any) -> Any:
    @ray.remote(num_cpus=1)
    class TrialActor:
        """Holds one prepared runner (model, golden, shortcut cache) for many trials."""

        def __init__(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                     config: CampaignConfig, threads: int) -> None:
            _init_worker(model, inputs, labels, config, threads)

        def run(self, tasks: list[Task]) -> list[TrialResult]:
            return _run_chunk(tasks)

    return TrialActor


class RayExecutor:
    """Ray actors, one per CPU the run gets (``workers`` on a local Ray, all the
    cluster's CPUs with an address); results are taken with ``ray.wait`` as they finish."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 config: CampaignConfig) -> None:
        ray = self.ray = import_ray()
        self.started = False
        if not ray.is_initialized():
            if config.ray_address:
                ray.init(address=config.ray_address, logging_level="ERROR", log_to_driver=False)
            else:
                ray.init(num_cpus=max(config.workers, 1) if config.workers > 1 else cores(),
                         include_dashboard=False, logging_level="ERROR", log_to_driver=False)
                self.started = True
        n = config.workers if config.workers > 1 else max(1, int(ray.cluster_resources().get("CPU", 1)))
        threads = worker_threads(n, config.threads) if not config.ray_address else 1
        payload = [ray.put(v) for v in (model, inputs, labels, config)]
        self.actors = [_actor_class(ray).remote(*payload, threads) for _ in range(n)]
        self.chunk = config.batch_trials or 1
        self.round_size = n * ROUNDS_PER_WORKER * self.chunk

    def map(self, tasks: Iterable[Task]) -> Iterator[TrialResult]:
        ray = self.ray
        queue = chunks(tasks, self.chunk)
        running: dict[Any, Any] = {}  # object ref -> actor
        free = [a for a in self.actors for _ in range(IN_FLIGHT_PER_WORKER)]
        while True:
            while free and (chunk := next(queue, None)) is not None:
                actor = free.pop()
                running[actor.run.remote(chunk)] = actor
            if not running:
                return
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                free.append(running.pop(ref))
                yield from ray.get(ref)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()


@contextlib.contextmanager
def executor(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, config: CampaignConfig,
             runner: Runner) -> Iterator[Executor]:
    """The executor ``config`` asks for, closed on exit."""
    if config.ray or config.ray_address:
        pool: Executor = RayExecutor(model, inputs, labels, config)
    elif config.workers > 1:
        pool = ProcessExecutor(model, inputs, labels, config)
    else:
        pool = LocalExecutor(runner)
    try:
        yield pool
    finally:
        pool.close()
