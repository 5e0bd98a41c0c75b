"""Where a run's models train: in this process, in a local process pool, or as Ray tasks on a cluster.

One :class:`Executor` runs the members of an ensemble and the folds of a cross-validation (through
:func:`~pyro_langevin.members.train_members`); the search (:mod:`pyro_langevin.nlb.tune`) shares
its Ray connection and resource checks (:func:`connect_ray`, :func:`check_ray_resources`)::

    Executor()                                   # one model after the other, in this process
    Executor(workers=2)                          # two worker processes (CPU), one model each
    Executor(address="auto", cpus_per_member=1)  # Ray tasks on the cluster this machine belongs to

On Ray nothing is scheduled here: each model is one ``ray.remote`` task with its resources
(fractions allowed); Ray places it and, when its worker or node dies, runs it again
(``max_retries``). The data and configuration go to the object store once. :meth:`Executor.map`
returns, for every item, where it ran (:class:`~pyro_langevin.executor.Placement`: backend,
Ray node id, host, process, seconds). Ray is imported only when a cluster is asked for.
"""

from __future__ import annotations

import concurrent.futures as futures
import logging
import math
import multiprocessing
import os
import platform
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from pyro_langevin.errors import InputError

__all__ = ["ExecutorError", "Executor", "Placement", "import_ray", "connect_ray", "check_ray_resources", "BACKENDS"]


class ExecutorError(InputError):
    """A setting of where models train that cannot work (resources, Ray address, Ray missing or unreachable)."""


#: ``serial``: in this process; ``processes``: a local pool of spawned processes; ``ray``: Ray tasks.
BACKENDS = ("serial", "processes", "ray")


@dataclass(frozen=True)
class Placement:
    """Where one item ran: ``backend`` (:data:`BACKENDS`), the Ray ``node_id`` (None off Ray), the
    ``host`` name, the process id ``pid`` and the wall ``seconds`` of the call there."""

    backend: str
    node_id: Optional[str]
    host: str
    pid: int
    seconds: float

    @classmethod
    def here(cls, backend: str, seconds: float) -> "Placement":
        """This process's placement (its Ray node id when ``backend`` is ``ray``)."""
        node = None
        if backend == "ray":
            import ray

            node = ray.get_runtime_context().get_node_id()
        return cls(backend, node, platform.node(), os.getpid(), round(float(seconds), 1))

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Executor:
    """How a run's models are trained at once (see the module docstring).

    Attributes
    ----------
    workers : int
        Without ``address``: models trained at once in spawned worker processes (CPU only; 1 trains
        them one after the other in this process).
    address : str, optional
        A Ray cluster: ``"auto"`` (the cluster of the local ``ray start``) or ``"HOST:PORT"``. A Ray
        instance already initialised in this process is used as it is.
    cpus_per_member, gpus_per_member : float
        Ray resources of one model (fractions allowed: 0.5 CPU runs two models per core); a model
        that holds a GPU trains on ``cuda``, and its torch threads are ``max(1, int(cpus_per_member))``.
    max_retries : int
        Ray runs a model again this many times when its worker process or node dies (an exception
        raised by the model's own code is not retried).
    """

    workers: int = 1
    address: Optional[str] = None
    cpus_per_member: float = 1.0
    gpus_per_member: float = 0.0
    max_retries: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise ExecutorError(f"workers must be an integer >= 1, got {self.workers!r}")
        for name, low in (("cpus_per_member", 0.0), ("gpus_per_member", 0.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
                raise ExecutorError(f"--{name.replace('_', '-')} must be a number >= 0, got {value!r}")
        if self.cpus_per_member <= 0:
            raise ExecutorError(f"--cpus-per-member must be > 0, got {self.cpus_per_member!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ExecutorError(f"max_retries must be an integer >= 0, got {self.max_retries!r}")
        if self.address is not None and not str(self.address).strip():
            raise ExecutorError("--address must be 'auto' or HOST:PORT, got an empty string")

    @property
    def on_ray(self) -> bool:
        """Whether models run as Ray tasks."""
        return self.address is not None

    @property
    def device(self) -> Optional[str]:
        """The device a Ray task trains on (``cuda`` when it holds a GPU); None off Ray (the request's)."""
        if not self.on_ray:
            return None
        return "cuda" if self.gpus_per_member > 0 else "cpu"

    @property
    def threads(self) -> int:
        """torch CPU threads of one model on Ray."""
        return max(1, int(self.cpus_per_member))

    def backend(self, n_items: int, device_type: str = "cpu") -> str:
        """The backend :meth:`map` uses for ``n_items`` items on ``device_type``."""
        if self.on_ray:
            return "ray"
        return "processes" if self.workers > 1 and n_items > 1 and device_type == "cpu" else "serial"

    def describe(self, n_items: int, device_type: str = "cpu") -> str:
        """One line: how ``n_items`` models will be trained."""
        backend = self.backend(n_items, device_type)
        if backend == "ray":
            return (f"training {n_items} models as Ray tasks ({self.cpus_per_member:g} CPU, {self.gpus_per_member:g} GPU "
                    f"each) on {self.address}")
        if backend == "processes":
            return f"training {n_items} models in {min(self.workers, n_items)} worker processes"
        return f"training {n_items} model{'s' if n_items > 1 else ''} in this process"

    @contextmanager
    def connected(self) -> Iterator[None]:
        """With ``address``: join the cluster and check the resources now (one line if either fails),
        before any work; :meth:`map` inside the block reuses the connection, closed on leaving (when
        this call opened it). Without ``address``: nothing."""
        if not self.on_ray:
            yield
            return
        ray = import_ray()
        started = connect_ray(self.address)
        try:
            check_ray_resources(self.cpus_per_member, self.gpus_per_member, per="member")
            yield
        finally:
            if started:
                ray.shutdown()

    def map(self, fn: Callable[..., Any], items: Sequence[Any], *shared: Any, device_type: str = "cpu",
            on_result: Optional[Callable[[int, Any, Placement], None]] = None) -> List[Tuple[Any, Placement]]:
        """``fn(item, *shared)`` for every item; results with their :class:`Placement`, in item order.

        ``fn`` must be a module-level function (it is pickled to other processes). ``shared`` objects
        (the data, the configuration) go to Ray's object store once. ``on_result(i, result, placement)``
        is called in this process as each item finishes. When anything fails or the run is
        interrupted, the items still queued or running are cancelled before the error is re-raised.
        """
        backend = self.backend(len(items), device_type)
        done: Dict[int, Tuple[Any, Placement]] = {}

        def finish(i: int, pair: Tuple[Any, Placement]) -> None:
            done[i] = pair
            if on_result is not None:
                on_result(i, *pair)

        if backend == "serial":
            for i, item in enumerate(items):
                finish(i, _placed(backend, fn, item, *shared))
        elif backend == "processes":
            ctx = multiprocessing.get_context("spawn")  # fork would copy torch's thread pools
            with futures.ProcessPoolExecutor(max_workers=min(self.workers, len(items)), mp_context=ctx) as pool:
                jobs = {pool.submit(_placed, backend, fn, item, *shared): i for i, item in enumerate(items)}
                try:
                    for job in futures.as_completed(jobs):
                        finish(jobs[job], job.result())
                except BaseException:
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
        else:
            self._map_ray(fn, items, shared, finish)
        return [done[i] for i in range(len(items))]

    def _map_ray(self, fn: Callable[..., Any], items: Sequence[Any], shared: Sequence[Any],
                 finish: Callable[[int, Tuple[Any, Placement]], None]) -> None:
        ray = import_ray()
        pending: Dict[Any, int] = {}
        with self.connected():
            try:
                refs = [ray.put(x) for x in shared]
                task = ray.remote(_placed).options(num_cpus=self.cpus_per_member, num_gpus=self.gpus_per_member,
                                                   max_retries=self.max_retries, retry_exceptions=False)
                pending = {task.remote("ray", fn, item, *refs): i for i, item in enumerate(items)}
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    i = pending.pop(ready[0])
                    finish(i, ray.get(ready[0]))
            except BaseException as exc:
                for ref in pending:  # an error or Ctrl-C here: stop the other models too
                    ray.cancel(ref, force=True)
                cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
                if isinstance(cause, Exception):  # the task's own error (bad input: one line), not Ray's wrapper
                    raise cause from None
                raise


def _placed(backend: str, fn: Callable[..., Any], item: Any, *shared: Any) -> Tuple[Any, Placement]:
    """Run ``fn(item, *shared)`` where this is called; return its result and where it ran."""
    t0 = time.perf_counter()
    result = fn(item, *shared)
    return result, Placement.here(backend, time.perf_counter() - t0)


# ----- Ray: import, connection, resources (shared with the search, nlb/tune.py) -----
def _quiet_ray() -> None:
    """No dashboard, no usage stats, Ray's old reporter API (we print our own lines), quiet loggers;
    tasks at the usual priority (Ray's default worker niceness 15 starves them on a busy machine:
    10x slower next to other jobs)."""
    settings = {
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_worker_niceness": "0", "RAY_AIR_NEW_OUTPUT": "0", "RAY_DEDUP_LOGS": "1",
        "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "PYTHONWARNINGS": "ignore::DeprecationWarning",
    }
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    for name in ("ray", "ray.tune", "ray.train", "ray.air"):
        logging.getLogger(name).setLevel(logging.ERROR)


def import_ray():
    """``ray`` (with Ray Tune), quietened; an :class:`ExecutorError` with the
    install command when it is missing."""
    _quiet_ray()
    try:
        import ray
        from ray import tune  # noqa: F401
    except ImportError:
        raise ExecutorError("ray[tune] is not installed; install it with: pip install 'pyro-langevin[tune]'") from None
    return ray


def connect_ray(address: Optional[str], cpus: Optional[int] = None) -> bool:
    """Start a local Ray instance (``address`` None) or join a cluster; True when this call started it
    (the caller then shuts it down).

    An instance already running in this process (``ray.init`` by the caller) is used as it is.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address not in (None, "auto", "local"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise ExecutorError(f"--address {address}: no Ray head node reachable there ({exc}); "
                              "start one with `ray start --head` or omit --address for a local instance") from None
    kwargs: Dict[str, Any] = dict(logging_level=logging.ERROR, log_to_driver=False)
    if address is None:
        kwargs.update(include_dashboard=False, num_cpus=cpus)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ExecutorError(f"--address {address}: cannot connect to Ray ({exc})") from None
    return True


def check_ray_resources(cpus: float, gpus: float, per: str = "trial") -> None:
    """Refuse (one line naming ``--cpus-per-{per}`` / ``--gpus-per-{per}``) a request for more CPUs
    or GPUs per task than the whole cluster has: such a task would wait forever."""
    import ray

    have = ray.cluster_resources()
    for what, wanted in (("CPU", cpus), ("GPU", gpus)):
        if wanted > have.get(what, 0.0):
            raise ExecutorError(f"--{what.lower()}s-per-{per} {wanted:g}: the Ray cluster has {have.get(what, 0.0):g} "
                              f"{what}s, so no {per} could start")
