"""Where onnxzip's parallel work runs: in this process, or as tasks on a Ray cluster.

Three kinds of work split into independent pieces: a sweep over the samples (calibration
ranges, histograms, channel moments: one piece per shard of consecutive batches), the accuracy
guard's per-layer sensitivity (one piece per layer) and anything else expressed as
``engine.map(fn, items, context)``. ``Local`` runs the pieces one after another in this process;
``RayCluster`` runs them as Ray tasks (one CPU each, onnxruntime given one intra-op thread per
CPU) and hands the results back **in item order**, whatever order they finish in.

Why the results are bit-identical with and without Ray: every piece is a pure function of its
inputs (the shard's batches are cut by the driver, from the same stream, with a size fixed by
the samples and the batch size, never by the number of workers), onnxruntime gives the same
bits at any intra-op thread count on the CPU provider, and partial results are merged by the
caller in item order, so no floating-point sum depends on which worker finished first.

Faults: a task whose worker dies (killed, out of memory, a node lost) is run again by Ray, up to
``MAX_RETRIES`` times; being pure, the retry gives the same result. The driver holds at most
``INFLIGHT_PER_CPU`` pieces per cluster CPU in the object store at once. If the driver itself
dies, Ray ends its tasks with it, and since onnxzip writes its outputs only at the end (through a
temporary file and a rename), nothing partial is left behind.

Ray is an optional extra (``pip install 'onnxzip[ray]'``): nothing here imports it until a
cluster is asked for.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import math
import os
import socket
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from onnxzip import progress
from onnxzip.errors import InputError, first_line

logger = logging.getLogger(__name__)

MAX_RETRIES = 3
INFLIGHT_PER_CPU = 2
CONNECT_TIMEOUT_S = 5.0
# What a Ray worker keeps between tasks: a map's context and what pieces build from it (the
# session of a sweep's statistics model); older entries are dropped.
WORKER_CACHE_ENTRIES = 4


class ClusterError(InputError):
    """Ray is not installed, the cluster cannot be reached, or its workers kept dying (exit 2)."""


class Local:
    """Runs every piece in this process, in order."""

    workers = 1

    def map(
        self,
        fn: Callable[[Any, Any], Any],
        items: Iterable,
        context: Any = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "item",
    ) -> Iterator:
        """Yields ``fn(context, item)`` for each item, in order."""
        for item in progress.bar(items, total=total, desc=desc, unit=unit):
            yield fn(context, item)


def _parse_address(address: str) -> tuple[str, int] | None:
    """(host, port) of an explicit address, None for ``auto``/``local``."""
    if address in ("auto", "local"):
        return None
    text = address.removeprefix("ray://")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"Ray address '{address}': expected auto, local or HOST:PORT")
    return host.strip("[]"), int(port)


def _reachable(host: str, port: int) -> str | None:
    """Why ``host:port`` takes no TCP connection (None: it does). Checked before Ray is asked,
    since Ray retries an unreachable address for minutes."""
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


class RayCluster:
    """Runs pieces as Ray tasks.

    Args:
        address: ``local`` (start a private Ray instance on this machine, stopped by
            ``close``), ``auto`` (the cluster this machine belongs to, or ``RAY_ADDRESS``), or
            ``HOST:PORT`` / ``ray://HOST:PORT`` of a running cluster.
        num_cpus: CPUs of the private instance (``local`` only; default: all of this machine's).
    """

    def __init__(self, address: str = "local", *, num_cpus: int | None = None):
        try:
            import ray
        except ImportError:
            raise ClusterError(
                "--ray needs Ray, which is not installed: pip install 'onnxzip[ray]'"
            ) from None
        self._ray = ray
        self.address = address
        target = _parse_address(address)
        if target is not None:
            why = _reachable(*target)
            if why is not None:
                raise ClusterError(f"Ray cluster at {address}: cannot connect ({why})")
        # onnxzip's own source travels with the job, so every worker runs the driver's code.
        runtime_env = {"py_modules": [str(Path(__file__).resolve().parents[1])]}
        kwargs: dict[str, Any] = {
            "log_to_driver": False,
            "configure_logging": False,
            "runtime_env": runtime_env,
        }
        if address == "local":
            # A private instance, bound to loopback (with Ray's default token authentication,
            # whose notice about being the default is not shown).
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
                logging.ERROR
            )
            kwargs.update(
                num_cpus=num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
            )
        else:
            kwargs["address"] = address
        self._owns = not ray.is_initialized()
        try:
            if self._owns:
                ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ClusterError(f"Ray cluster at {address}: {first_line(exc)}") from exc
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self._task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES)(_run_piece)
        # Each worker imports onnxzip and onnxruntime once, now, all in parallel, rather than
        # inside the first pieces of the first sweep.
        list(self.map(_warm_up, range(self.workers), desc="starting the workers"))
        logger.info("Ray cluster %s: %d CPUs", address, self.workers)

    def map(
        self,
        fn: Callable[[Any, Any], Any],
        items: Iterable,
        context: Any = None,
        *,
        total: int | None = None,
        desc: str = "",
        unit: str = "item",
    ) -> Iterator:
        """Yields ``fn(context, item)`` for each item, in item order; ``context`` is put in the
        object store once and shared by every task."""
        ray = self._ray
        # Put once; each worker fetches and unpickles it once per map (a ref inside a list is
        # not resolved by Ray before the task runs, so a worker that holds it skips the fetch).
        shared = (new_key(), [ray.put((fn, context))])
        limit = INFLIGHT_PER_CPU * self.workers
        source = iter(items)
        pending: deque = deque()  # refs in item order
        exhausted = False
        bar = progress.bar(None, total=total, desc=desc, unit=unit)
        try:
            while True:
                while not exhausted and len(pending) < limit:
                    try:
                        item = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append(self._task.remote(shared, item))
                if not pending:
                    return
                result = self._get(pending.popleft(), desc)
                bar.update(1)
                yield result
        finally:
            bar.close()
            for ref in pending:  # an error or an interrupt: the rest is not wanted
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)

    def _get(self, ref, desc: str):
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise
        except (
            ray.exceptions.WorkerCrashedError,
            ray.exceptions.NodeDiedError,
            ray.exceptions.OutOfMemoryError,
            ray.exceptions.ObjectLostError,
        ) as exc:
            raise ClusterError(
                f"Ray: {desc or 'a task'} failed {MAX_RETRIES + 1} times as its worker died: "
                f"{first_line(exc)}"
            ) from exc

    def close(self) -> None:
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()


# -- streams cut into pieces -------------------------------------------------------------------

SHARD_SAMPLES = 64  # samples per shard of a sweep over the data (whole batches; at least one)


def shard_plan(batch_size: int, batches: int | None) -> tuple[int, int | None]:
    """(batches per shard, shards) for a stream of ``batches`` runs of ``batch_size`` samples
    (the count None when unknown): ``SHARD_SAMPLES`` samples of whole batches, at least one."""
    per_shard = max(1, math.ceil(SHARD_SAMPLES / batch_size))
    return per_shard, None if batches is None else math.ceil(batches / per_shard)


def shards(batches: Iterable, per_shard: int) -> Iterator[list]:
    """Consecutive runs of ``per_shard`` items (the last may be shorter). The size comes from
    the samples and the batch size, never from the number of workers, so the partial sums of
    a sweep, and their merge, are the same wherever it runs."""
    shard: list = []
    for batch in batches:
        shard.append(batch)
        if len(shard) == per_shard:
            yield shard
            shard = []
    if shard:
        yield shard


# -- inside a worker ---------------------------------------------------------------------------

_IN_WORKER = False
_CACHE: OrderedDict = OrderedDict()


def _run_piece(shared, item):
    """The Ray task: ``fn(context, item)`` with onnxruntime held to this task's one CPU; the
    context is fetched from the object store by the first task of the map on this worker."""
    global _IN_WORKER
    _IN_WORKER = True
    import ray

    key, box = shared
    fn, context = cached(key, lambda: ray.get(box[0]))
    return fn(context, item)


def _warm_up(_context, _item) -> None:
    import onnxzip.quantize  # noqa: F401  (and with it statistics, runtime, onnxruntime)


def worker_threads() -> int | None:
    """onnxruntime intra-op threads for a session made here: one inside a Ray task (it was given
    one CPU), onnxruntime's default in the driver."""
    return 1 if _IN_WORKER else None


def cached(key: str, factory: Callable[[], Any]) -> Any:
    """A per-process cache for what every piece of one job rebuilds (an onnxruntime session):
    in a Ray worker it survives between tasks of the job, in the driver until ``forget``."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = factory()
    _CACHE[key] = value
    while len(_CACHE) > WORKER_CACHE_ENTRIES:
        _CACHE.popitem(last=False)
    return value


def forget(key: str) -> None:
    _CACHE.pop(key, None)


def new_key() -> str:
    return uuid.uuid4().hex


# -- which engine is active --------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("onnxzip_engine", default=None)
_LOCAL = Local()


def active():
    """The engine library calls run their pieces on (``Local`` unless ``using`` set one)."""
    return _ACTIVE.get() or _LOCAL


def accepts_engine(function):
    """Gives a library entry point an ``engine=`` keyword: the block runs ``using(engine)``."""

    @functools.wraps(function)
    def wrapper(*args, engine=None, **kwargs):
        with using(engine):
            return function(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def using(engine):
    """Runs the block with ``engine`` active: a ``Local`` or ``RayCluster``, ``None`` (keep the
    active one), or a string: ``"ray"`` or ``"local"`` (a private Ray instance on this machine),
    ``"auto"`` or a Ray address (see ``RayCluster``). A cluster opened here is closed at the end."""
    opened = None
    if engine is None:
        yield active()
        return
    if isinstance(engine, str):
        opened = engine = RayCluster("local" if engine == "ray" else engine)
    token = _ACTIVE.set(engine)
    try:
        yield engine
    finally:
        _ACTIVE.reset(token)
        if opened is not None:
            opened.close()


__all__ = [
    "ClusterError",
    "Local",
    "RayCluster",
    "SHARD_SAMPLES",
    "accepts_engine",
    "active",
    "cached",
    "forget",
    "shards",
    "using",
    "worker_threads",
]
