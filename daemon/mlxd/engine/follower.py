"""A follower rank of a process group (see :mod:`.distributed`): no HTTP, no store; it
applies rank 0's broadcast operations to its own runner until rank 0 says stop."""

from __future__ import annotations

import time
from typing import Any

from ..config import ModelSettings
from ..logs import get_logger
from .batch import BatchRunner, Job
from .distributed import IDLE_SLEEP, Group, kv_weight
from .loader import load
from .promptcache import PromptCache
from .protocol import GenerationRequest

log = get_logger("mlxd.distributed")


def follow(group: Group, engine_settings: Any) -> int:
    """A follower rank's whole life: apply rank 0's operations until it says stop (0) or the
    group breaks (1)."""
    group.init()
    log.info("distributed.follower", rank=group.rank, ranks=group.size)
    runner: BatchRunner | None = None
    tuning = engine_settings
    try:
        while True:
            op = group.receive()
            kind = op[0]
            if kind == "stop":
                log.info("distributed.stopped", rank=group.rank)
                return 0
            if kind == "idle":  # rank 0 has nothing to do: sleep, not poll (see IDLE_TICK)
                time.sleep(IDLE_SLEEP)
                continue
            if kind == "load":
                if runner is not None:
                    runner.close()
                entry = ModelSettings.model_validate(op[1])
                lm = load(entry, group=group)
                cache = PromptCache(tuning.prompt_cache_bytes)
                cache.weigh = kv_weight(lm.config)
                slots = tuning.model_copy(update={"max_batch_size": op[2]})  # rank 0's
                runner = BatchRunner(lm, slots, cache, group=group)
                log.info("distributed.loaded", rank=group.rank, **lm.describe())
                continue
            if kind == "retune":
                tuning = tuning.model_copy(update={"prompt_cache_bytes": op[1]})
                if runner is not None:
                    runner.prompt_cache.resize(op[1])
                continue
            if runner is None:
                continue
            if kind == "add":
                _, job_id, prompt, params, reasoning, in_think, now = op
                request = GenerationRequest(runner.lm, prompt, params, reasoning, in_think)
                runner.add(Job(job_id, request, _nowhere), now=now)
            elif kind == "remove":
                job = runner.active.get(op[1])
                if job is not None:
                    runner.remove(job)
            elif kind == "step":
                runner.step(now=op[1], failed=op[2])
            elif kind == "fail_all":
                runner.fail_all_local()
    except RuntimeError as exc:  # the group lost a rank: nothing more to follow
        log.error("distributed.lost", rank=group.rank, error=str(exc))
        return 1


def _nowhere(event: Any) -> None:
    """A follower's job events: rank 0 answers the client."""
