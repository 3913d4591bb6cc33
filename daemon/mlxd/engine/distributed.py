"""One model served by a group of MLX processes (``mlx.launch``): rank 0 serves HTTP and leads,
the other ranks follow in lockstep.

MLX's own distributed backend carries everything (``mx.distributed``: ring over TCP, JACCL
over RDMA, MPI); mlxd adds no transport. Each rank holds a shard of the model
(:func:`shard`: tensor parallelism through mlx-lm's ``Model.shard``, or pipeline stages,
mlx-lm's ``pipeline`` where the model has one, otherwise :func:`_pipeline` for any model
whose layers take ``(h, mask, cache)``), so every forward pass is a collective.

Lockstep: the rank-0 engine drives one :class:`~mlxd.engine.batch.BatchRunner`; each runner
operation that touches MLX (load, add a job, cancel, step, fail all, retune the prompt cache,
stop) is first broadcast by :class:`Group.send` and the followers
(:func:`mlxd.engine.follower.follow`) apply it
to their own runner, built from the same code. Everything a runner decides from is in the
broadcast: the clock (deadlines), the jobs' parameters, the jobs whose grammar or sampler
failed (rank 0 alone runs logits processors), and the prompt-cache budget (entries are
weighed by tokens, not by each rank's bytes, so every rank evicts the same entries). The
ranks agree on each sampled token: rank 0's sampler decides and an ``all_sum`` of its token
with the followers' zeros hands it to every rank inside the step's graph
(:func:`agreeing`), so the async pipeline of decode steps stays intact.

A lost rank makes a collective raise (the ring backend reports a closed peer); a hung one
makes it wait forever, so :class:`Watchdog` fails the jobs after ``step_timeout`` seconds.
Either way the group is broken: requests get 503 naming it, ``/health`` says which ranks,
and a restart of the group recovers.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..logs import get_logger

log = get_logger("mlxd.distributed")

#: Seconds between an idle rank 0's heartbeats, and how long a follower sleeps after one.
#: A rank waiting in a ring collective polls its sockets (a full core); an idle follower
#: sleeps instead, and joins the next collective just before rank 0 sends it. The first
#: operation after an idle spell waits up to ``IDLE_SLEEP`` for the followers to wake.
IDLE_TICK = 0.25
IDLE_SLEEP = IDLE_TICK - 0.01

#: Environment set by ``mlx.launch`` for each rank (ring: the hostfile; MPI/NCCL: their own).
_LAUNCH_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launched() -> bool:
    """True when this process was started by ``mlx.launch`` (or mpirun) as one of a group."""
    return any(name in os.environ for name in _LAUNCH_ENV)


@dataclass
class GroupState:
    """What ``/health`` shows about the group (written by whichever thread notices)."""

    size: int
    backend: str
    sharding: str
    state: str = "ok"  # ok | broken
    error: str | None = None
    suspects: list[int] = field(default_factory=list)
    #: Each rank's MLX memory once its shard is loaded (bytes, by rank).
    memory: list[int] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ranks": self.size,
            "backend": self.backend,
            "sharding": self.sharding,
            "state": self.state,
        }
        if self.memory:
            out["rank_memory_bytes"] = self.memory
        if self.error is not None:
            out["error"] = self.error
            out["ranks_lost"] = self.suspects
        return out


class Group:
    """This process's place in the group and the one broadcast channel (rank 0 → all)."""

    def __init__(self, rank: int, backend: str, sharding: str, step_timeout: float) -> None:
        self.rank = rank
        self.backend = backend
        self.size = _launched_size()
        self.step_timeout = step_timeout
        self.status = GroupState(self.size, backend, sharding)
        self.group: Any = None
        #: Engine thread: seconds since the epoch at which the current collective began.
        self.busy_since: float | None = None

    @classmethod
    def join(cls, backend: str, sharding: str, step_timeout: float) -> Group | None:
        """This process's place in the group it was launched into; None when alone. The
        group itself is joined by :meth:`init`, on the thread that will use it (MLX's
        streams are per thread: a group used from another thread crashes the process)."""
        if not launched():
            return None
        rank = next(int(os.environ[n]) for n in _LAUNCH_ENV if n in os.environ)
        return cls(rank, backend, sharding, step_timeout)

    def init(self) -> None:
        import mlx.core as mx

        self.group = mx.distributed.init(strict=True, backend=self.backend)
        self.rank = self.group.rank()
        self.size = self.status.size = self.group.size()

    @property
    def broken(self) -> bool:
        return self.status.state == "broken"

    def neighbours(self) -> list[int]:
        """The ranks rank 0 talks to directly on a ring: where a lost connection points."""
        return sorted({1 % self.size, (self.size - 1) % self.size} - {0})

    def mark_broken(self, error: str) -> None:
        if self.broken:
            return
        self.status.state = "broken"
        self.status.suspects = self.neighbours()
        self.status.error = (
            f"the model's process group is broken ({error}); rank(s) "
            f"{', '.join(map(str, self.status.suspects))} of {self.size} stopped answering. "
            "Restart the group (mlxd distributed --run, or the service)"
        )
        log.error("distributed.broken", error=error, suspects=self.status.suspects)

    # -- the broadcast ------------------------------------------------------------------
    def send(self, op: tuple[Any, ...]) -> None:
        """Rank 0: hand ``op`` to every follower (they apply it in the same order)."""
        self._share(op)

    def receive(self) -> tuple[Any, ...]:
        """A follower: the next operation from rank 0."""
        op = self._share(None)
        assert op is not None
        return op  # type: ignore[no-any-return]

    def _share(self, obj: Any) -> Any:
        import mlx.core as mx

        group = self.group
        outer = self.busy_since is not None  # inside a step the engine already set it
        if not outer:
            self.busy_since = time.time()
        try:
            if self.rank == 0:
                data = mx.array(pickle.dumps(obj))  # type: ignore[arg-type]
                mx.eval(mx.distributed.all_sum(mx.array(data.size), group=group))
                mx.eval(mx.distributed.all_sum(data, group=group))
                return obj
            size: Any = mx.distributed.all_sum(mx.array(0), group=group).item()
            data = mx.distributed.all_sum(mx.zeros(int(size), dtype=mx.uint8), group=group)
            mx.eval(data)
            return pickle.loads(data)  # type: ignore[arg-type]
        finally:
            if not outer:
                self.busy_since = None

    def loaded(self) -> None:
        """Every rank, once its shard is loaded: wait for the others (a barrier) and learn
        each rank's MLX memory, which rank 0 reports per rank."""
        import mlx.core as mx

        mine = mx.array([mx.get_active_memory()], dtype=mx.int64)
        every = mx.distributed.all_gather(mine, group=self.group, stream=mx.cpu)
        values: list[int] = every.tolist()  # type: ignore[assignment]
        self.status.memory = [int(v) for v in values]


def _launched_size() -> int:
    """The group's size as mlx.launch describes it (0: known once joined)."""
    for name in ("MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile:
        import json

        try:
            with open(hostfile) as f:
                return len(json.load(f))
        except (OSError, ValueError, TypeError):
            return 0
    return 0


def agreeing(sampler: Callable[[Any], Any] | None, group: Group) -> Callable[[Any], Any]:
    """A sampler every rank runs: rank 0's ``sampler`` picks, the followers (``None``) add
    zeros, and the ``all_sum`` gives every rank rank 0's tokens."""
    import mlx.core as mx

    def sample(logprobs: Any) -> Any:
        if sampler is not None:
            token = sampler(logprobs).astype(mx.int32)
        else:
            # Zeros computed from the logits, not from their shape alone: a collective that
            # depends on nothing may be scheduled before the forward's own collectives, and
            # then the ranks wait on different ones (a deadlock, measured).
            token = mx.argmax(logprobs, axis=-1).astype(mx.int32) * 0
        return mx.distributed.all_sum(token, group=group.group).astype(mx.uint32)

    return sample


def kv_weight(config: dict[str, Any]) -> Callable[[list[int], list[Any]], int]:
    """Prompt-cache entry weight every rank computes alike: the whole model's KV bytes for
    the entry's tokens (each rank holds only part of them, a different part per rank)."""
    text = config.get("text_config", config)
    layers = int(text.get("num_hidden_layers") or 1)
    heads = int(text.get("num_attention_heads") or 1)
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or int(text.get("hidden_size") or heads) // heads)
    per_token = 2 * layers * kv_heads * head_dim * 4

    def weigh(tokens: list[int], cache: list[Any]) -> int:
        return len(tokens) * per_token

    return weigh


# -- sharding ---------------------------------------------------------------------------
def shard(model: Any, group: Group, sharding: str) -> str:
    """Keep this rank's part of ``model`` (before its weights are evaluated); returns the
    sharding used. ``auto``: pipeline stages (every model with a layer list), else tensor."""
    inner: Any = getattr(model, "model", None)
    can_pipeline = inner is not None and isinstance(getattr(inner, "layers", None), list)
    if sharding == "auto":
        sharding = "pipeline" if can_pipeline else "tensor"
    if sharding == "tensor":
        if not hasattr(model, "shard"):
            raise ValueError("this model type has no tensor parallelism; use sharding = 'pipeline'")
        _check_heads(model, group.size)
        model.shard(group.group)
    else:
        if not can_pipeline:
            raise ValueError("this model type cannot be split into pipeline stages")
        if len(inner.layers) < group.size:
            raise ValueError(f"{len(inner.layers)} layers cannot make {group.size} stages")
        if hasattr(inner, "pipeline"):
            inner.pipeline(group.group)
        else:
            _pipeline(inner, group)
    group.status.sharding = sharding
    return sharding


def _check_heads(model: Any, n: int) -> None:
    args = getattr(model, "args", None)
    for name in ("num_attention_heads", "num_key_value_heads"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value % n:
            raise ValueError(
                f"tensor parallelism over {n} ranks needs {name} ({value}) divisible by {n}; "
                "use another number of ranks or sharding = 'pipeline'"
            )


def _pipeline(inner: Any, group: Group) -> None:
    """Pipeline stages for a model without mlx-lm's ``pipeline``: as mlx-lm splits (rank 0
    runs the last layers), the first local layer receives the hidden state from the rank
    before it, the last one sends it on, and an ``all_gather`` gives every rank the output."""
    import mlx.core as mx
    import mlx.nn as nn

    rank, size = group.rank, group.size
    layers = inner.layers
    base, extra = divmod(len(layers), size)
    split = [base + (1 if r < extra else 0) for r in range(size)]
    start = sum(split[rank + 1 :])
    end = start + split[rank]

    class Stage(nn.Module):  # type: ignore[misc]
        def __init__(self, layer: Any, first: bool, last: bool) -> None:
            super().__init__()
            self.layer = layer
            self.first = first
            self.last = last
            self.use_sliding = getattr(layer, "use_sliding", False)

        def __call__(self, x: Any, mask: Any = None, cache: Any = None) -> Any:
            if self.first and rank < size - 1:
                x = mx.distributed.recv_like(x, rank + 1, group=group.group)
            h = self.layer(x, mask, cache=cache)
            if self.last:
                if rank != 0:
                    h = mx.distributed.send(h, rank - 1, group=group.group)
                    if cache is not None and getattr(cache, "keys", None) is not None:
                        cache.keys = mx.depends(cache.keys, h)
                h = mx.distributed.all_gather(h, group=group.group)[: h.shape[0]]
            return h

    local = layers[start:end]
    inner.layers = [Stage(layer, i == 0, i == len(local) - 1) for i, layer in enumerate(local)]
    if hasattr(inner, "fa_idx"):
        inner.fa_idx = 0
    if hasattr(inner, "swa_idx") and inner.swa_idx is not None:
        found = [i for i, s in enumerate(inner.layers) if s.use_sliding]
        inner.swa_idx = found[0] if found else None
    log.info("distributed.stage", rank=rank, layers=f"{start}-{end - 1}", of=len(layers))


# -- failure ----------------------------------------------------------------------------
class Watchdog:
    """Rank 0: a collective that has not returned after ``step_timeout`` seconds means a
    rank hangs; ``on_hang`` fails the jobs from this thread (the engine thread is stuck)."""

    def __init__(self, group: Group, on_hang: Callable[[str], None]) -> None:
        self.group = group
        self.on_hang = on_hang
        self._thread = threading.Thread(target=self._run, name="mlxd-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self.group.broken:
            time.sleep(min(1.0, self.group.step_timeout / 4))
            since = self.group.busy_since
            if since is not None and time.time() - since > self.group.step_timeout:
                self.on_hang(f"no answer within step_timeout = {self.group.step_timeout:g} s")
                return
