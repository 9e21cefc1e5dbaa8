"""The resource policy: how a run's model pool and render tasks, or a fine-tuning job's workers, share a cluster.

A pure decision from the cluster's resources (``ray.cluster_resources()``: ``{"CPU": 16, "GPU": 2, "memory":
...}``) and the config. No Ray here: the Ray Data plan (execute/plan.py) and Ray Train (execute/train.py) read
the cluster and hand the numbers in, so the policy is tested with plain dicts (tests/test_resources.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from docpipe.config import FinetuneConfig, RunConfig
from docpipe.errors import ConfigError
from docpipe.model.engine import wants_continuous
from docpipe.model.sizing import DEFAULT_MAX_PAGES

GIB = 2**30
# Without GPUs the model is the bottleneck and rendering needs a few percent of a core.
CPU_RENDER_SHARE = 0.25
# A continuous actor on a GPU takes calls enough to fill its pages in flight, up to this many at once.
MAX_GPU_CALLS = 16


@dataclass(frozen=True)
class RunResources:
    """One run's model pool and render tasks."""

    actors: int  # model actors: a fixed-size pool, since model start-up is expensive
    actor_cpus: float  # logical CPUs per model actor
    actor_gpus: float  # GPUs per model actor; 0 without GPUs
    actor_memory: int  # bytes of host memory per model actor, for staging weights
    render_cpus: float  # logical CPUs per render task
    calls_in_flight: int  # calls a model actor takes at once (blocks of rows_per_call pages)
    streams: bool  # the model runs the continuous engine (several calls at once, each in its own thread)
    cpu_threads: int | None  # torch threads per model actor; None: torch's default (the config's when it sets one)


@dataclass(frozen=True)
class TrainResources:
    """One fine-tuning job's Ray Train workers."""

    workers: int
    use_gpu: bool  # one GPU per worker
    worker_cpus: float  # logical CPUs per worker
    backend: str  # torch.distributed backend: nccl on GPUs, gloo on CPUs
    cpu_threads: int | None  # torch threads per worker; None: torch's default (the config's when it sets one)


def run_resources(cluster: Mapping[str, float], config: RunConfig) -> RunResources:
    """The model pool and render share for a run on a cluster with these resources."""
    gpus = int(cluster.get("GPU", 0))
    cpus = cluster.get("CPU", 1)
    cpu_threads = config.model.cpu_threads
    if gpus:
        actors = config.num_actors or gpus * config.actors_per_gpu
        actor_cpus, actor_gpus, render_cpus = 1.0, 1 / config.actors_per_gpu, 1.0
    else:
        # The render tasks get a small logical share and the actors the rest. One single-threaded actor per core
        # avoids torch's intra-op loss (on 2 cores, two threads ran the tiny model 1.7x as fast as one).
        # The shares are per core, not per cluster, so every node keeps room for a render task: sized from
        # the cluster total, actors filled each node of a multi-node cluster and rendering never started.
        actors = config.num_actors or max(1, int(cpus))
        render_cpus, actor_gpus = CPU_RENDER_SHARE, 0.0
        actor_cpus = max(0.25, min(1 - render_cpus, (cpus - render_cpus) / actors))
        if cpu_threads is None:
            cpu_threads = max(1, round(cpus / actors))
    # generate: one call per actor at a time: a busy actor must not queue blocks that an idle one could take
    # (measured: with two in flight, one of two CPU actors sat idle). The continuous engine instead takes
    # calls_in_flight calls at once, each in its own thread, so new pages join the decode batch while earlier
    # ones finish: it never drains between blocks. Either way an actor holds at most that many blocks.
    # On a GPU the continuous engine sizes itself from memory (up to max_pages_in_flight): it gets calls enough to
    # fill that; an actor that fell back to generate runs them one at a time (see execute/stages.py).
    streams = wants_continuous(config.model.engine, on_gpu=gpus > 0)
    calls = config.model.calls_in_flight if streams else 1
    if streams and gpus:
        wanted = config.model.max_pages_in_flight or DEFAULT_MAX_PAGES
        calls = min(MAX_GPU_CALLS, max(calls, -(-wanted // config.model.rows_per_call)))
    return RunResources(actors=actors, actor_cpus=actor_cpus, actor_gpus=actor_gpus,
                        actor_memory=int(config.actor_memory_gb * GIB), render_cpus=render_cpus,
                        calls_in_flight=calls, streams=streams, cpu_threads=cpu_threads)


def check_actor_memory(config: RunConfig, largest_node_memory: float) -> None:
    """On a local instance, which can't grow, an actor that fits no node would wait forever: say so instead.
    (A cluster may be about to add the node it needs, so there the request stands: don't call this.)"""
    if int(config.actor_memory_gb * GIB) > largest_node_memory:
        raise ConfigError(f"actor_memory_gb is {config.actor_memory_gb:g} but this machine's Ray offers "
                          f"{largest_node_memory / GIB:.1f} GiB: the model actors could never start "
                          "(--actor-memory-gb)")


def train_resources(cluster: Mapping[str, float], config: FinetuneConfig) -> TrainResources:
    """Ray Train's workers for a fine-tuning job on a cluster with these resources."""
    gpus = int(cluster.get("GPU", 0))
    cpus = cluster.get("CPU", 1)
    workers = config.num_workers
    cpu_threads = config.model.cpu_threads
    if gpus:
        worker_cpus = 1.0
    else:
        worker_cpus = max(0.5, min(1.0, cpus / workers))
        if cpu_threads is None:  # one torch thread per core share: more only contend (as for a run's CPU actors)
            cpu_threads = max(1, int(cpus // workers))
    return TrainResources(workers=workers, use_gpu=bool(gpus), worker_cpus=worker_cpus,
                          backend="nccl" if gpus else "gloo", cpu_threads=cpu_threads)
