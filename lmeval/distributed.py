"""Data-parallel runs under ``torchrun`` or ``accelerate launch``: detect, shard, gather.

A launcher starts one process (rank) per device and sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` in each one's environment; both torchrun and accelerate launch do.
:func:`start` reads them and returns a :class:`ProcessGroup` that joins the ranks with
torch.distributed (gloo on CPU, nccl on CUDA). Without those variables it returns a
:class:`SingleProcess`, which has the same methods and never imports or calls
torch.distributed.

Work is split at the granularity of scoring groups (see :func:`shard_groups`), so each
batch is the batch a single process would form and per-document values can be
bitwise identical. Ranks score unequal amounts, so no collective runs while they
score: progress goes through the key-value store (:class:`TokenCounter`), and the
results are gathered to rank 0 once every rank has finished.
"""

from __future__ import annotations

import contextlib
import datetime
import heapq
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm import tqdm

from lmeval.errors import ConfigError, LmevalError

logger = logging.getLogger(__name__)

LAUNCH_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")
#: How long a collective waits for the slowest rank. The final gather waits while the
#: other ranks finish their shards, which the greedy balance keeps to about one group
#: of work, but a slow first model load on one machine also counts against it.
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)
#: Seconds between two reads of the token counter by rank 0's progress bar.
PROGRESS_INTERVAL = 0.5

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """The rank of this process among those a launcher started."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def detect_launch(environ: dict[str, str] | None = None) -> Launch | None:
    """Return the launch described by the environment, or None for a single process.

    ``WORLD_SIZE=1`` counts as a single process: there is nothing to share.

    Raises:
        ConfigError: when only some of the variables are set, or one is not a valid
            integer for its role.
    """
    environ = os.environ if environ is None else environ
    present = [name for name in LAUNCH_VARIABLES if name in environ]
    if not present:
        return None
    if len(present) < len(LAUNCH_VARIABLES):
        missing = [name for name in LAUNCH_VARIABLES if name not in environ]
        raise ConfigError(
            f"environment variables {', '.join(present)} are set but {', '.join(missing)} "
            "missing; start lmeval with torchrun or accelerate launch, or unset them to run "
            "as one process"
        )
    values = {name: _integer_variable(environ, name) for name in LAUNCH_VARIABLES}
    world_size, rank = values["WORLD_SIZE"], values["RANK"]
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(
            f"invalid launch: RANK={rank} with WORLD_SIZE={world_size}; RANK must be in "
            f"0..WORLD_SIZE-1"
        )
    if world_size == 1:
        return None
    local_world_size = world_size
    if "LOCAL_WORLD_SIZE" in environ:
        local_world_size = _integer_variable(environ, "LOCAL_WORLD_SIZE")
    return Launch(rank, world_size, values["LOCAL_RANK"], max(1, local_world_size))


def _integer_variable(environ, name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={environ[name]!r} is not an integer; "
            "start lmeval with torchrun or accelerate launch"
        ) from None


def is_main_process() -> bool:
    """Return whether this process is rank 0, or runs alone; reads only the environment."""
    return os.environ.get("RANK", "0") == "0"


def threads_per_rank(threads: int | None, local_world_size: int) -> int:
    """Return the CPU threads of one process: ``threads``, else an equal share of cores."""
    if threads:
        return threads
    cores = len(os.sched_getaffinity(0))
    return max(1, cores // local_world_size)


def rank_device(device: str, launch: Launch) -> str:
    """Return the device of this rank: ``cuda`` and ``auto`` become ``cuda:LOCAL_RANK``.

    Raises:
        ConfigError: for ``cuda:N``, which would put every rank on the same GPU.
    """
    if device.startswith("cuda:"):
        raise ConfigError(
            f"--device {device} under torchrun would put all {launch.world_size} ranks on "
            "one GPU; pass --device cuda, and each rank takes the GPU of its LOCAL_RANK"
        )
    if device not in ("cuda", "auto"):
        return device  # cpu, or an invalid name that load_model reports
    import torch

    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{launch.local_rank}"


# Sharding ----------------------------------------------------------------------------


def shard_groups(costs: Sequence[int], world_size: int) -> list[list[int]]:
    """Assign groups to ranks: largest cost first, each to the least loaded rank.

    Args:
        costs: the cost (tokens to score) of each group, in run order.
        world_size: the number of ranks.

    Returns:
        For each rank, the indices of its groups in ascending order. Ranks beyond the
        number of groups get none. Ties go to the lower rank, so every rank computes
        the same assignment.
    """
    loads = [(0, rank) for rank in range(world_size)]
    heapq.heapify(loads)
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        shards[rank].append(index)
        heapq.heappush(loads, (load + costs[index], rank))
    return [sorted(shard) for shard in shards]


# Process groups ----------------------------------------------------------------------


class SingleProcess:
    """The process group of a run without a launcher: rank 0 of 1, no communication."""

    rank = 0
    world_size = 1
    local_world_size = 1
    is_main = True
    backend = None

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    def gather(self, value: T) -> list[T] | None:
        return [value]

    def broadcast(self, value: T) -> T:
        return value

    def run_on_main(self, function: Callable[[], T]) -> T:
        return function()

    def barrier(self) -> None:
        pass

    def token_counter(self) -> TokenCounter | None:
        return None

    def close(self) -> None:
        pass


class ProcessGroup:
    """The ranks of a torchrun or accelerate launch, joined by torch.distributed.

    Args:
        launch: this process's rank, from :func:`detect_launch`.
        backend: "gloo" or "nccl".
        device: the rank's device; nccl needs it to be the current CUDA device.
    """

    def __init__(self, launch: Launch, backend: str, device: str) -> None:
        import torch
        import torch.distributed as dist

        self.rank = launch.rank
        self.world_size = launch.world_size
        self.local_world_size = launch.local_world_size
        self.is_main = launch.rank == 0
        self.backend = backend
        self.device = device
        self._counters = 0
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        # A caller (a training script) may have joined the ranks already; lmeval then
        # uses its process group and leaves it open.
        self._owned = not dist.is_initialized()
        if self._owned:
            dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        logger.debug(
            "rank %d of %d joined the %s process group", self.rank, self.world_size, backend
        )

    def gather(self, value: T) -> list[T] | None:
        """Return every rank's ``value`` on rank 0, in rank order; None on other ranks."""
        import torch.distributed as dist

        values = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, values, dst=0)
        return values

    def broadcast(self, value: T) -> T:
        """Return rank 0's ``value`` on every rank."""
        import torch.distributed as dist

        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run_on_main(self, function: Callable[[], T]) -> T:
        """Call ``function`` on rank 0 and return its result, or raise its error, on all.

        A check that only rank 0 can make (the output directory) then fails on every
        rank at once instead of leaving the others waiting at the next collective.
        """
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                outcome = ("ok", function())
            except LmevalError as error:
                outcome = ("error", error)
        outcome = self.broadcast(outcome)
        if outcome[0] == "error":
            if not self.is_main:
                # Rank 0 reports this error, so the command line prints it once.
                outcome[1].reported_by_rank_zero = True
            raise outcome[1]
        return outcome[1]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def token_counter(self) -> TokenCounter:
        """Return a new counter of scored tokens, shared by all ranks.

        Every rank must call this the same number of times, so that they agree on
        each counter's key.
        """
        self._counters += 1
        return TokenCounter(f"lmeval/tokens/{self._counters}")

    def close(self) -> None:
        import torch.distributed as dist

        if self._owned and dist.is_initialized():
            dist.destroy_process_group()


def start(device: str, device_map: str | None = None) -> SingleProcess | ProcessGroup:
    """Join the other ranks of a launch, or return a :class:`SingleProcess` without one.

    The backend is nccl when the rank's device is CUDA, else gloo. With a device map
    the model spans devices, so results travel through gloo on the CPU.

    Raises:
        ConfigError: on an invalid launch environment, or a device that ranks cannot
            share.
    """
    launch = detect_launch()
    if launch is None:
        return SingleProcess(device)
    if device_map is not None and launch.local_world_size > 1:
        raise ConfigError(
            f"--device-map {device_map} spreads one model over every GPU of a machine, but "
            f"torchrun started {launch.local_world_size} processes per machine; run one "
            "process per machine (torchrun --nproc-per-node 1) with --device-map"
        )
    rank_device_name = device if device_map is not None else rank_device(device, launch)
    # NOTE: the nccl path has not run here (no GPU on the test machine); gloo on the CPU
    # is what the tests cover.
    backend = "nccl" if rank_device_name.startswith("cuda") and device_map is None else "gloo"
    return ProcessGroup(launch, backend, rank_device_name)


# Progress ----------------------------------------------------------------------------


class TokenCounter:
    """A count of scored tokens summed over ranks in the launch's key-value store.

    Each rank adds its tokens after every batch (:meth:`add`), which costs one
    message to the store and never waits for another rank. Rank 0 reads the total
    from a thread (:meth:`follow`), so its bar moves while it waits for the others.
    """

    def __init__(self, key: str) -> None:
        import torch.distributed as dist

        # A client of its own: the store of the process group is not public API.
        self._store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=60),
        )
        self._key = key
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, count: int) -> int:
        """Add this rank's ``count`` tokens and return the total over all ranks."""
        with self._lock:
            return int(self._store.add(self._key, count))

    def follow(self, update: Callable[[int], None]) -> None:
        """Call ``update(total)`` every :data:`PROGRESS_INTERVAL` seconds until :meth:`stop`."""

        def poll() -> None:
            while not self._stop.wait(PROGRESS_INTERVAL):
                update(self.add(0))

        self._thread = threading.Thread(target=poll, name="lmeval-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@contextlib.contextmanager
def joined(
    group: SingleProcess | ProcessGroup | None, device: str, device_map: str | None = None
) -> Iterator[SingleProcess | ProcessGroup]:
    """Use ``group``, or start one (see :func:`start`) and close it on exit."""
    if group is not None:
        yield group
        return
    group = start(device, device_map)
    try:
        yield group
    finally:
        group.close()


@contextlib.contextmanager
def shared_progress(
    group: SingleProcess | ProcessGroup, total: int, enabled: bool, description: str
) -> Iterator[Callable[[int], Any]]:
    """Show one progress bar, on rank 0, of the tokens scored by all ranks.

    Yields the callback each rank calls with the tokens of every batch it scores.
    """
    bar = tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        disable=not (enabled and group.is_main),
        desc=description,
    )
    counter = group.token_counter()
    if counter is None:
        with bar:
            yield bar.update
        return

    def show(scored: int) -> None:
        bar.update(scored - bar.n)

    if group.is_main:
        counter.follow(show)
    try:
        yield counter.add
    finally:
        counter.stop()
        if group.is_main:
            show(counter.add(0))
        bar.close()
