"""Multi-process runs: joining one, and the few collectives the library needs across hosts.

Bottom of the import graph (nothing of pali_jax but errors below it): checkpointing, sharding,
fine-tuning and the CLIs all use it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils


def initialize_distributed(force: bool = False) -> bool:
    """Joins a multi-process run: calls `jax.distributed.initialize()` when this process was
    launched as one of several (or when `force`), before anything touches a device.

    Detected launches: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), Slurm and
    Open MPI with more than one task, GKE TPU slices (TPU_WORKER_HOSTNAMES lists several hosts).
    A Cloud TPU VM pod slice sets none of these: pass force (the CLIs' --distributed); JAX then
    reads the topology from the TPU metadata server. Returns whether it initialized: False too
    when the process has joined already (an earlier call, or the caller's own initialize()).
    """
    if jax.distributed.is_initialized():
        return False
    env = os.environ
    explicit = bool(env.get("JAX_COORDINATOR_ADDRESS"))
    launched = (
        explicit
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )
    if not (launched or force):
        return False
    kwargs: dict[str, Any] = {}
    if explicit:
        # jax reads JAX_COORDINATOR_ADDRESS itself but not the process count and id.
        for key, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
            if key in env:
                kwargs[arg] = int(env[key])
    jax.distributed.initialize(**kwargs)
    return True


def to_host(x: Any, dtype: Any = None) -> np.ndarray:
    """A whole array as numpy (cast to `dtype` first, on the devices), on every process. An array
    split across processes is gathered (`multihost_utils.process_allgather`: every process must
    make the same call, and the array is whole on each device for a moment)."""
    if not isinstance(x, jax.Array):
        return np.asarray(x, dtype)
    x = x if dtype is None else x.astype(dtype)
    if x.is_fully_addressable:
        return np.asarray(x)
    return multihost_utils.process_allgather(x, tiled=True)


def same_on_every_process(value: int) -> bool:
    """Whether every process passed the same integer; True in a single-process run. Every process
    must call it (a collective)."""
    if jax.process_count() == 1:
        return True
    values = multihost_utils.process_allgather(np.int64(value))
    return bool((values == values[0]).all())


def wait_for_every_process(name: str) -> None:
    """Returns once every process has called it with the same `name` (a barrier); at once in a
    single-process run."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
