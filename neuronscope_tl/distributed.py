"""Data-parallel and neuron-parallel passes under ``torchrun`` (``torch.distributed``).

Launched by ``torchrun --nproc-per-node N`` (and ``--nnodes`` for several hosts), every process runs the same
program on the same inputs, and the passes split their work between the ranks:

* **Data-parallel.** :func:`neuronscope_tl.engine.run` builds the batches exactly as one process would, gives each
  rank a deterministic share of them (:func:`share`, balanced by padded tokens), and afterwards :func:`reduce`
  folds every accumulator across the ranks: activation statistics, scores with their gradient sums and top
  contexts, perplexity sums, and Gram matrices. Every pass that goes through the engine is data-parallel without
  knowing it (scoring, the calibration behind curves, prune and search, neuron importance, the perplexity of
  :func:`~neuronscope_tl.evaluation.window_nll`). Simulated pruning
  (:func:`~neuronscope_tl.impact.measure_plans`) asks the engine for no sharing: every rank measures every batch.
* **Neuron-parallel.** :func:`~neuronscope_tl.ablation.ablate_each` (and so
  :func:`~neuronscope_tl.scoring.validate_scores`) gives each rank whole stacks of neurons and sums the measured
  rows, each of which only one rank filled (:func:`sum_disjoint`): the table is the one process's, row for row.

**Reduction.** Each activation of a batch is computed by one rank in the very batch one process would use, so the
values are the same bits. An accumulator's state is gathered from every rank and folded in rank order with the
accumulator's own merge (``merge_shard`` where it has one, else ``merge``), so every rank ends with the same result:
counts, maxima and top contexts exactly as one process finds them, floating sums up to their order of addition.
Gram matrices are too large to gather (fp32, 26 GB for Llama-3-8B); they are summed in place with ``all_reduce``,
one layer at a time, on the model's device (NCCL on CUDA) or in host memory (gloo).

**Faults.** The process group starts at the first pass (after every input has been checked, identically on every
rank), with a collective timeout (:data:`TIMEOUT_ENV`, default :data:`DEFAULT_TIMEOUT_S` seconds). After its
share of each pass a rank tells the others whether it raised (:func:`shard_work`): the rank that raised re-raises
its error, the others raise :class:`DistributedError` naming it. A rank that is killed or hangs makes the others'
next collective fail (closed connection, or the timeout); each rank records in the process group's store how
many collectives it entered, so the survivors name the ranks that never reached the failed one.

**Writes.** Only rank 0 writes the command line's output (:func:`is_writer`); the other ranks run the same
command with their output in a scratch directory that is removed (:func:`neuronscope_tl.cli.rank_output`).

Without torchrun (no ``WORLD_SIZE`` above 1 and no process group) nothing here talks to anyone: :func:`share`
returns every item, :func:`reduce` and the sums return their input.
"""

from __future__ import annotations

import datetime
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

TIMEOUT_ENV = "NEURONSCOPE_TIMEOUT_S"
# Long enough for one rank's share of a large pass to finish while the others wait at its end.
DEFAULT_TIMEOUT_S = 1800.0
DEVICES = ("cpu", "cuda")
_STEP_KEY = "neuronscope/collectives/{rank}"
# This process's collectives so far (their count is also written to the store), whether the count has been
# started in the current process group, and the seconds spent in them.
_steps = {"count": 0, "started": False, "seconds": 0.0}


class DistributedError(RuntimeError):
    """Another rank failed, was killed or stopped answering; the message names it."""


@dataclass(frozen=True)
class Rank:
    """Where this process stands: its rank, the number of ranks, and its GPU index on its host."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}.") from None


def current() -> Rank:
    """This process's rank: from the process group when one is running, else from torchrun's environment
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); rank 0 of 1 without either."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE - 1] and WORLD_SIZE >= 1; got RANK={rank}, WORLD_SIZE={world}.")
    return Rank(rank, world, _env_int("LOCAL_RANK", rank))


def active() -> bool:
    """Whether this process is one of several ranks."""
    return current().active


def is_writer() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return current().rank == 0


def timeout_s() -> float:
    """The collective timeout in seconds: ``NEURONSCOPE_TIMEOUT_S`` (a number > 0), else the default."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None or text == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {text!r}.")
    return value


# ---------------------------------------------------------------------------------------------- devices


def check_device(device: Union[str, torch.device, None]) -> str:
    """``cpu``, ``cuda`` or ``cuda:N`` (a visible GPU); None means ``cpu``. ValueError naming the valid devices."""
    if device is None:
        return "cpu"
    text = str(device)
    kind, _, index = text.partition(":")
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    valid = "cpu" if n_gpus == 0 else f"cpu, cuda or cuda:0..cuda:{n_gpus - 1}"
    if kind not in DEVICES or (kind == "cpu" and index) or (index and not index.isdigit()):
        raise ValueError(f"unknown device {text!r}; valid devices here are {valid}.")
    if kind == "cuda" and (n_gpus == 0 or (index and int(index) >= n_gpus)):
        raise ValueError(f"device {text!r} is not available ({n_gpus} CUDA GPUs visible); valid devices here are {valid}.")
    return text


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """The torch device to load onto: ``cuda`` under torchrun means this rank's ``LOCAL_RANK`` GPU."""
    text = check_device(device)
    if text != "cuda":
        return torch.device(text)
    here = current()
    index = here.local_rank if here.active else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {index} has no GPU: {torch.cuda.device_count()} CUDA GPUs visible on this host; "
            f"start at most that many processes per node."
        )
    return torch.device("cuda", index)


# ---------------------------------------------------------------------------------------------- sharing work


def share(costs: Sequence[float], rank: Optional[Rank] = None) -> List[int]:
    """The indices of the items this rank takes, in their given order.

    Items are dealt largest cost first, each to the least loaded rank (ties: the lower index, the lower rank), so
    the split depends on the costs alone and every rank computes the same one. One process takes every item.
    """
    here = rank or current()
    if not here.active:
        return list(range(len(costs)))
    load = [0.0] * here.world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(here.world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += float(costs[i])
    return [i for i, r in enumerate(owner) if r == here.rank]


def shard(items: Sequence, costs: Optional[Sequence[float]] = None) -> list:
    """This rank's items (:func:`share`; equal costs when none are given)."""
    chosen = share([1.0] * len(items) if costs is None else costs)
    return [items[i] for i in chosen]


# ---------------------------------------------------------------------------------------------- process group


def start() -> Rank:
    """Join the process group once (``env://``, as torchrun sets it up) with the collective timeout; gloo, and
    NCCL for CUDA tensors when a GPU is visible. A process group the caller started is used as it is."""
    here = current()
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build; run without torchrun.")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s())
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(here.local_rank % torch.cuda.device_count())
        try:
            dist.init_process_group(backend, timeout=timeout)
        except RuntimeError as exc:
            raise DistributedError(
                f"rank {here.rank}: the process group did not start within {timeout_s():g} s: not "
                f"every one of the {here.world_size} ranks reached its first pass. Cause: {_first_line(exc)}"
            ) from None
        here = current()
    if not _steps["started"]:
        _steps["started"] = True
        _record_step(here, 0)
    return here


def _store():
    return dist.distributed_c10d._get_default_store()


def _record_step(here: Rank, count: int) -> None:
    _steps["count"] = count
    try:
        _store().set(_STEP_KEY.format(rank=here.rank), str(count))
    except Exception:  # the store is only used to name a failed rank; a collective will report the failure
        pass


def _behind(here: Rank, step: int) -> str:
    """Which ranks never reached collective ``step``, read from the store."""
    late, unknown = [], []
    for r in range(here.world_size):
        if r == here.rank:
            continue
        key = _STEP_KEY.format(rank=r)
        try:
            reached = int(_store().get(key)) if _store().check([key]) else -1
        except Exception:
            unknown.append(r)
            continue
        if reached < 0:
            late.append(f"rank {r} (never joined: it failed, was killed or hangs before its first pass)")
        elif reached < step:
            late.append(f"rank {r} (stopped after collective {reached}: it raised, was killed or hangs)")
    if late:
        return "; ".join(late) + " never reached it"
    if unknown:
        return f"the store that records each rank's progress cannot be read; ranks {unknown} may have stopped"
    return "every rank reached it, so a rank stopped during it"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _collective(what: str, fn):
    """Run one collective; a failure becomes a DistributedError naming the ranks that never reached it."""
    here = current()
    step = _steps["count"] + 1
    _record_step(here, step)
    t0 = time.perf_counter()
    try:
        return fn()
    except DistributedError:
        raise
    except RuntimeError as exc:
        raise DistributedError(
            f"rank {here.rank}: collective {step} ({what}) failed: {_behind(here, step)}. Cause: {_first_line(exc)}"
        ) from None
    finally:
        _steps["seconds"] += time.perf_counter() - t0


def collective_seconds() -> float:
    """Seconds this process has spent in collectives (waiting for slower ranks included)."""
    return _steps["seconds"]


def _gather(what: str, obj) -> list:
    parts = [None] * current().world_size
    _collective(what, lambda: dist.all_gather_object(parts, obj))
    return parts


def _agree(what: str, error: Optional[BaseException]) -> None:
    """Every rank says whether its share of ``what`` raised; a rank that did not raise raises DistributedError
    naming those that did."""
    here = current()
    status = None if error is None else f"{type(error).__name__}: {error}"
    failed = [(r, s) for r, s in enumerate(_gather(f"{what}: status", status)) if s is not None]
    if failed and error is None:
        named = "; ".join(f"rank {r} raised {s}" for r, s in failed)
        raise DistributedError(f"rank {here.rank}: stopping because {named} (during {what}).")


@contextmanager
def shard_work(what: str) -> Iterator[None]:
    """This rank's share of a pass; afterwards the ranks agree that none raised (see :func:`_agree`).

    Starts the process group on first use. Without torchrun, just runs the body.
    """
    if not active():
        yield
        return
    start()
    try:
        yield
    except Exception as exc:
        try:
            _agree(what, exc)
        except DistributedError:
            pass  # this rank's own error is the one to report
        raise
    _agree(what, None)


# ---------------------------------------------------------------------------------------------- reductions


def reduce(accumulators: Sequence, device: Union[str, torch.device] = "cpu") -> None:
    """Fold each accumulator of a data-parallel pass across the ranks, in place; every rank ends with the result.

    An accumulator whose whole state is sums (``summed = True``: a ``sums`` dict of tensors and an integer
    ``count``, as the Gram accumulator) is summed with ``all_reduce``, one tensor at a time on ``device``; every
    other accumulator is gathered and folded in rank order with its ``merge_shard`` (or ``merge``).
    """
    if not active():
        return
    for acc in accumulators:
        if getattr(acc, "summed", False):
            _sum_in_place(acc, torch.device(device))
        else:
            _gather_and_merge(acc)


def _gather_and_merge(acc) -> None:
    parts = _gather(f"gather {type(acc).__name__}", acc)
    total = parts[0]
    fold = getattr(total, "merge_shard", None) or total.merge
    for part in parts[1:]:
        fold(part)
    acc.__dict__.update(total.__dict__)


def _sum_in_place(acc, device: torch.device) -> None:
    for key in list(acc.sums):
        buffer = acc.sums[key].to(device)
        _collective(f"sum {type(acc).__name__} {key}", lambda: dist.all_reduce(buffer))
        acc.sums[key] = buffer.to(acc.sums[key].device)
    acc.count = int(sum_values(acc.count)[0])


def sum_values(*values: float) -> Tuple[float, ...]:
    """Each number summed over the ranks (float64); unchanged without torchrun."""
    if not active():
        return tuple(values)
    buffer = torch.tensor([float(v) for v in values], dtype=torch.float64)
    _collective("sum values", lambda: dist.all_reduce(buffer))
    return tuple(buffer.tolist())


def sum_tensor(tensor: Tensor, what: str = "sum tensor") -> Tensor:
    """A tensor summed over the ranks with ``all_reduce`` (a new tensor on the same device); unchanged without
    torchrun."""
    if not active():
        return tensor
    buffer = tensor.detach().cpu().clone()
    _collective(what, lambda: dist.all_reduce(buffer))
    return buffer.to(tensor.device)


def sum_disjoint(tensor: Tensor) -> Tensor:
    """A tensor whose every entry was filled by at most one rank (zeros elsewhere), summed over the ranks: the
    whole tensor, exactly (adding zeros rounds nothing). Unchanged without torchrun."""
    return sum_tensor(tensor, "gather rows")


def stop() -> None:
    """Leave the process group, if this process started or joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _steps.update(count=0, started=False, seconds=0.0)
