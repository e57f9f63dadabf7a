"""More than one process: ``torchrun --nproc_per_node N -m pyevo.search ...``.

A run launched by torchrun (its ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` in the environment) starts one process group: NCCL when the run's device is CUDA
(each rank on ``cuda:LOCAL_RANK``), gloo on the CPU, with the finite ``distributed.timeout``. Without
torchrun nothing here runs: :data:`SINGLE` stands for the one process and every helper is the plain
single-process code path.

What each stage does under torchrun:

* **Distillation and retraining** are data parallel and give what one process gives with the same
  seed and the same *global* batch (the configured ``batch_size``; each rank computes
  ``batch_size / world_size`` of it, and a batch the world size does not divide is refused before
  anything starts). Every rank draws the *same* global batch from the same seeded generator
  (:func:`pyevo.diffusion.noisy_batch`) and keeps its own contiguous slice of it (:meth:`Context.shard`).
  That deterministic shard of every global batch plays the role of a ``DistributedSampler``: a sampler
  would draw a different stream of images per rank, and the run would no longer equal the
  one-process run it is checked against. The gradients are the full batch's: a loss that is a mean
  over equal shards averages exactly (DDP's gradient mean); the NSR, a ratio of sums over the whole
  batch, is not such a mean, so each rank divides its numerator by the *global* denominator
  (all-reduced; it carries no gradient) and scales by the world size (:meth:`Context.nsr`). Losses
  and checks of finite values are taken on the global figures, so every rank sees the same values
  and stops together. Retraining wraps the student in ``DistributedDataParallel``; distillation
  averages the super-blocks' gradients once per step (:meth:`Context.average_gradients`, the same
  mean DDP takes): its sandwich rule runs several paths per block with one backward each, some paths
  use no parameter at all, and DDP expects one forward and one backward per step. The optimiser,
  learning-rate schedule and EMA then take identical steps on every rank.
* **The per-block searches** are independent: blocks go to ranks largest first (the teacher block's
  MACs), each to the least-loaded rank (:func:`assign_blocks`); each rank scores its blocks on the
  same held-out set and times its candidates on its own device (its latency table keyed by that
  device), and the results are gathered on every rank.
* **Rank 0 alone writes** the run folder and the latency table; the other ranks write nothing but
  their own blocks' search generations (``search/<key>/<block>/``, one owner per block, so that a
  killed rank's searches resume too), and end after retraining (evaluation and the report are rank
  0's). On ``--resume`` rank 0 decides which stages are done and sends what it read back to the others.
* **A failing rank stops the job.** Errors raised where the ranks meet (:meth:`Context.agree`) end
  every rank with the failing rank's error, printed once; a rank that dies is seen by torchrun, which
  stops the others; a rank that stops answering (a lost node) ends the others' waits after the
  timeout, at a collective or through its missing heartbeat (:meth:`Context.wait_for_all`, used
  where ranks legitimately wait long for one another: rank 0's checks, the search).
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import torch

from pyevo.config import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """Another rank stopped answering, or a collective failed."""


class PeerFailed(RuntimeError):
    """Another rank raised where the ranks meet; that rank reports its own error."""

    def __init__(self, rank: int, kind: str, message: str):
        super().__init__(f"rank {rank} failed: {kind}: {message}")
        self.rank, self.kind, self.message = rank, kind, message


def quiet(error: BaseException) -> BaseException:
    """Mark ``error`` as one another rank prints (the CLI prints an error once per job)."""
    error.pyevo_quiet = True
    return error


def launched() -> bool:
    """Whether this process was started by torchrun (or an equivalent launcher)."""
    return all(name in os.environ for name in LAUNCH_ENV)


def rank_from_env() -> int:
    return int(os.environ.get("RANK", "0")) if launched() else 0


@dataclass
class Context:
    """This process's place in the job; one process (``SINGLE``) when not launched by torchrun."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    active: bool = False  # a process group is up
    timeout_s: float = 1800.0
    device: str = "cpu"
    ranks: list[dict] = field(default_factory=list)  # per rank: its device and that device's name
    _waits: int = 0
    _heartbeat: threading.Event | None = None
    _keys: str = "pyevo"  # this job's prefix in the launcher's store (a run's own, agreed at set-up)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int] | None:
        """(rank, world size) for :func:`pyevo.diffusion.noisy_batch`, or None in one process."""
        return (self.rank, self.world_size) if self.active else None

    # ----------------------------------------------------------------- collectives
    @contextlib.contextmanager
    def collective(self, what: str):
        """A failed or timed-out collective (gloo and NCCL raise RuntimeError) as a DistributedError;
        in one process (no process group) nothing is caught."""
        if not self.active:
            yield
            return
        try:
            yield
        except DistributedError:
            raise
        except RuntimeError as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise DistributedError(f"rank {self.rank}: {what} failed: {first}") from error

    def _comm(self, tensor: torch.Tensor) -> torch.Tensor:
        device = torch.device(self.device) if torch.device(self.device).type == "cuda" else torch.device("cpu")
        return tensor.to(device)

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``values`` (detached, float64), on the CPU."""
        import torch.distributed as dist

        tensor = self._comm(values.detach().to(torch.float64).reshape(-1).clone())
        if self.active:
            with self.collective("an all-reduce"):
                dist.all_reduce(tensor)
        return tensor.cpu()

    def average_gradients(self, parameters: Iterable[torch.Tensor], bucket: int = 1 << 25) -> None:
        """Every parameter's gradient replaced by its mean over ranks, as DDP's would be.

        Parameters without a gradient keep none (every rank trained the same paths, so they are the
        same parameters everywhere) and the optimiser leaves them alone, as in one process.
        """
        if not self.active:
            return
        import torch.distributed as dist

        grads = [p.grad for p in parameters if p.grad is not None]
        groups: dict[tuple, list[torch.Tensor]] = {}
        for grad in grads:
            groups.setdefault((grad.dtype, grad.device), []).append(grad)
        for group in groups.values():
            start = 0
            while start < len(group):
                part, size = [], 0
                while start < len(group) and (not part or size + group[start].numel() <= bucket):
                    part.append(group[start])
                    size += group[start].numel()
                    start += 1
                flat = torch.cat([g.reshape(-1) for g in part])
                with self.collective("the gradient all-reduce"):
                    dist.all_reduce(flat)
                flat /= self.world_size
                offset = 0
                for grad in part:
                    grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
                    offset += grad.numel()

    def broadcast_object(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        with self.collective("a broadcast from rank 0"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj: Any) -> list:
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list = [None] * self.world_size
        with self.collective("an all-gather"):
            dist.all_gather_object(out, obj)
        return out

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers copied into ``module`` on every rank, in place."""
        if not self.active:
            return
        import torch.distributed as dist

        with torch.no_grad(), self.collective("the weights' broadcast from rank 0"):
            for tensor in module.state_dict().values():
                comm = self._comm(tensor)
                dist.broadcast(comm, src=0)
                if comm is not tensor:
                    tensor.copy_(comm)

    def data_parallel(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under DistributedDataParallel (its gradients averaged over ranks in the backward)."""
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device = torch.device(self.device)
        # find_unused_parameters: a student's block may hold parameters its forward leaves unused
        # (a teacher's unused embedding, say); DDP then marks them itself instead of waiting for them.
        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                       find_unused_parameters=True)

    # ----------------------------------------------------------------- losses and checks
    def nsr(self, pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[torch.Tensor], list[float]]:
        """Per block, this rank's share of the full batch's NSR and the full batch's NSR itself.

        ``pairs`` are (numerator, denominator) of each block's NSR over this rank's shard (sums of
        squares). The full batch's NSR is sum_r num_r / sum_r den_r; with the denominator's global sum
        (a constant: it holds no student output), ``world_size * num_r / D`` averaged over ranks (what
        DDP does to the gradients) has the full-batch NSR's gradient.
        """
        nums = torch.stack([num.detach() for num, _ in pairs])
        dens = torch.stack([den.detach() for _, den in pairs])
        total = self.all_reduce_sum(torch.cat([nums.reshape(-1), dens.reshape(-1)]))
        count = len(pairs)
        global_den = total[count:].clamp_min(torch.finfo(torch.float32).tiny)
        shares = [self.world_size * num / global_den[i].to(num.device, num.dtype) for i, (num, _) in enumerate(pairs)]
        return shares, (total[:count] / global_den).tolist()

    def mean(self, values: Sequence[float] | torch.Tensor) -> list[float]:
        """The mean over ranks of each value (each rank's value of a loss over its equal shard)."""
        tensor = values if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.float64)
        return (self.all_reduce_sum(tensor) / self.world_size).tolist()

    def check_teacher_finite(self, prediction: torch.Tensor, timesteps: torch.Tensor, stage: str, step: int) -> None:
        """:func:`pyevo.training.check_teacher_finite` over the global batch (every rank raises alike)."""
        from pyevo.training import check_teacher_finite, teacher_nonfinite_error

        if not self.active:
            return check_teacher_finite(prediction, timesteps, stage, step)
        bad = ~torch.isfinite(prediction.flatten(1)).all(dim=1)
        if float(self.all_reduce_sum(bad.sum().reshape(1))[0]) == 0:
            return None
        steps = [t for part in self.all_gather_object([int(t) for t in timesteps[bad].tolist()]) for t in part]
        raise self.shared(teacher_nonfinite_error(steps, stage, step))

    def shared(self, error: BaseException) -> BaseException:
        """An error every rank raises alike: rank 0 prints it."""
        return error if self.is_main else quiet(error)

    # ----------------------------------------------------------------- meeting points
    def agree(self, fn: Callable[[], T]) -> T:
        """``fn()`` on every rank; if it raised on any rank, every rank ends: the failing rank with its
        own error (printed by the lowest failing rank only), the others with :class:`PeerFailed`."""
        if not self.active:
            return fn()
        try:
            value, failure = fn(), None
        except Exception as error:  # noqa: BLE001 - shared with the other ranks, then raised again
            value, failure = None, error
        self.wait_for_all()
        outcomes = self.all_gather_object(None if failure is None else (type(failure).__name__, str(failure)))
        failed = [(rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None]
        if not failed:
            return value
        first, (kind, message) = failed[0]
        if failure is not None:
            if self.rank != first:
                quiet(failure)
            raise failure
        raise quiet(PeerFailed(first, kind, message))

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 alone, its value (or its failure) on every rank."""
        if not self.active:
            return fn()
        return self.broadcast_object(self.agree(lambda: fn() if self.is_main else None))

    def gather(self, fn: Callable[[], T]) -> list[T]:
        """``fn()`` on every rank (failures agreed as :meth:`agree`), every rank's value on every rank."""
        value = self.agree(fn)
        return self.all_gather_object(value)

    def wait_for_all(self) -> None:
        """Return once every rank got here; a rank whose heartbeat stops for ``timeout_s`` ends the wait
        with :class:`DistributedError`. Unlike a collective, the wait itself has no time limit: a rank
        may search its blocks for hours while the others wait for it."""
        if not self.active:
            return
        store = _store()
        if store is None:
            return
        self._waits += 1
        keys = [f"{self._keys}/wait/{self._waits}/{rank}" for rank in range(self.world_size)]
        store.set(keys[self.rank], "1")
        beats = {rank: (-1, time.monotonic()) for rank in range(self.world_size) if rank != self.rank}
        while beats:
            for rank in list(beats):
                if store.check([keys[rank]]):
                    del beats[rank]
                    continue
                beat = int(store.add(f"{self._keys}/alive/{rank}", 0))
                last, since = beats[rank]
                if beat != last:
                    beats[rank] = (beat, time.monotonic())
                elif time.monotonic() - since > self.timeout_s:
                    raise DistributedError(f"rank {rank} has not answered for {self.timeout_s:g} s "
                                           "(distributed.timeout): it died or hangs; see its own output")
            if beats:
                time.sleep(0.2)

    # ----------------------------------------------------------------- life
    def leave(self) -> None:
        """Leave the process group (once no rank needs another): this process goes on alone, and a
        library that syncs over a live group by itself (torchmetrics) sees none. ``world_size`` and
        ``ranks`` still describe the job."""
        self.close()

    def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.set()
            self._heartbeat = None
        if self.active:
            import torch.distributed as dist

            self.active = False
            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = Context()


def _store():
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def _beat(stop: threading.Event, rank: int, interval: float, keys: str = "pyevo") -> None:
    store = _store()
    while store is not None and not stop.is_set():
        try:
            store.add(f"{keys}/alive/{rank}", 1)
        except Exception:  # noqa: BLE001 - the store is gone: the job is ending
            return
        stop.wait(interval)


def setup(config):
    """(this process's :class:`Context`, its config): ``config`` itself without torchrun; under torchrun
    the batches checked against the world size, the process group started, and on CUDA the config's
    device made this rank's ``cuda:LOCAL_RANK``. Nothing is written."""
    from pyevo.latency import device_name

    if not launched():
        error = _device_error(config.device)
        if error is not None:
            raise error
        return replace(SINGLE, device=config.device, ranks=[_rank_entry(0, config.device, device_name)]), config
    world, rank, local = (int(os.environ[name]) for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    error = _check(config, world, local)
    if error is not None:
        raise error if rank == 0 else quiet(error)
    import torch.distributed as dist

    device, backend, extra = config.device, "gloo", {}
    if device.startswith("cuda"):
        device, backend = f"cuda:{local}", "nccl"
        torch.cuda.set_device(local)
        extra["device_id"] = torch.device(device)
    timeout = config.distributed.timeout
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout), rank=rank, world_size=world, **extra)
    context = Context(world, rank, local, True, timeout, device)
    # Keys of this run alone: a second run in the same job (same store) never reads the first one's.
    context._keys = f"pyevo/{context.broadcast_object(uuid.uuid4().hex)}"
    context._heartbeat = threading.Event()
    threading.Thread(target=_beat, args=(context._heartbeat, rank, max(0.05, min(5.0, timeout / 4)), context._keys),
                     daemon=True, name="pyevo-heartbeat").start()
    context.ranks = context.all_gather_object(_rank_entry(rank, device, device_name))
    log.info("rank %d of %d on %s (%s)", rank, world, device, backend)
    return context, replace(config, device=device)


def _rank_entry(rank: int, device: str, device_name) -> dict:
    return {"rank": rank, "device": device, "device_name": device_name(device)}


def _check(config, world: int, local: int) -> ConfigError | None:
    for key, size in (("distill.batch_size", config.distill.batch_size),
                      ("retrain.batch_size", config.retrain.batch_size)):
        if size % world:
            return ConfigError(f"{key} {size} cannot be split over {world} ranks: the global batch is shared out "
                               f"evenly (batch_size / world size per rank); make it a multiple of {world}")
    if config.device.startswith("cuda"):
        if not torch.cuda.is_available():
            return _device_error(config.device)
        if config.device not in ("cuda", f"cuda:{local}"):
            return ConfigError(f"under torchrun each rank runs on cuda:LOCAL_RANK; pass --device cuda, "
                               f"not {config.device!r}")
        if local >= torch.cuda.device_count():
            return ConfigError(f"LOCAL_RANK {local} but this machine has {torch.cuda.device_count()} CUDA "
                               "device(s): start at most that many processes per node")
    return None


def _device_error(device: str) -> ConfigError | None:
    """Why the run's ``--device`` cannot be used on this machine (None if it can): the one check of it,
    made before anything touches the device."""
    if not device.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        return ConfigError(f"device {device!r} asked for, but this torch sees no CUDA device")
    index, count = torch.device(device).index, torch.cuda.device_count()
    if index is not None and index >= count:
        return ConfigError(f"device {device!r} asked for, but this machine has {count} CUDA device(s) "
                           f"(cuda:0 to cuda:{count - 1})")
    return None


def assign_blocks(macs: Mapping[str, float], world_size: int) -> dict[str, int]:
    """Block -> rank: largest block first (by ``macs``), each to the least-loaded rank (lowest on ties)."""
    order = list(macs)
    load = [0.0] * world_size
    owner = {}
    for name in sorted(order, key=lambda n: (-macs[n], order.index(n))):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += macs[name]
    return {name: owner[name] for name in order}
