"""The resource policy (pipeline/execute/resources.py) on clusters of several shapes, without Ray: the numbers a
run's model pool, its render tasks and a fine-tuning job's workers get, exactly."""

from __future__ import annotations

from pathlib import Path

import pytest

from docpipe.config import FinetuneConfig, ModelOptions, RunConfig
from docpipe.errors import ConfigError
from docpipe.execute.resources import (RunResources, TrainResources, check_actor_memory, run_resources,
                                        train_resources)
from docpipe.model.engine import wants_continuous

GIB = 2**30


def config(model: dict | None = None, **options) -> RunConfig:
    return RunConfig(inputs=["in"], output="out", model=ModelOptions(**(model or {})), **options)


def test_cpu_only_one_single_threaded_actor_per_core_and_a_quarter_core_for_rendering():
    assert run_resources({"CPU": 16.0, "memory": 64 * GIB}, config()) == RunResources(
        actors=16, actor_cpus=0.75, actor_gpus=0.0, actor_memory=4 * GIB, render_cpus=0.25, calls_in_flight=1,
        streams=False, cpu_threads=1)


def test_cpu_only_fewer_actors_than_cores_get_the_cores_as_threads():
    policy = run_resources({"CPU": 2.0}, config(num_actors=1))
    assert (policy.actors, policy.actor_cpus, policy.cpu_threads) == (1, 0.75, 2)


def test_cpu_only_more_actors_than_cores_share_them_down_to_a_quarter():
    assert run_resources({"CPU": 3.0}, config(num_actors=8)).actor_cpus == 0.34375  # (3 - 0.25) / 8
    tight = run_resources({"CPU": 1.0}, config(num_actors=8))
    assert (tight.actor_cpus, tight.cpu_threads) == (0.25, 1)


def test_fractional_and_missing_cpu_counts():
    policy = run_resources({"CPU": 2.5}, config())
    assert (policy.actors, policy.actor_cpus, policy.cpu_threads) == (2, 0.75, 1)
    bare = run_resources({}, config())  # a cluster that reports nothing counts as one core
    assert (bare.actors, bare.actor_cpus, bare.actor_gpus, bare.cpu_threads) == (1, 0.75, 0.0, 1)


def test_one_gpu_one_continuous_actor_with_calls_enough_for_256_pages():
    assert run_resources({"CPU": 8.0, "GPU": 1.0, "memory": 32 * GIB}, config()) == RunResources(
        actors=1, actor_cpus=1.0, actor_gpus=1.0, actor_memory=4 * GIB, render_cpus=1.0, calls_in_flight=16,
        streams=True, cpu_threads=None)  # 256 pages / 16 rows per call


def test_eight_gpus_shared_by_two_actors_each():
    policy = run_resources({"CPU": 96.0, "GPU": 8.0}, config(actors_per_gpu=2))
    assert (policy.actors, policy.actor_gpus, policy.actor_cpus, policy.render_cpus) == (16, 0.5, 1.0, 1.0)
    assert policy.calls_in_flight == 16 and policy.streams


def test_gpu_calls_follow_max_pages_in_flight_and_rows_per_call():
    assert run_resources({"GPU": 1}, config({"max_pages_in_flight": 64})).calls_in_flight == 4  # 64 / 16
    # 100 pages in blocks of 32 (batch 8 x sort window 4): 4 calls, rounded up
    assert run_resources({"GPU": 1}, config({"max_pages_in_flight": 100, "batch_size": 8})).calls_in_flight == 4
    # never fewer than calls_in_flight asks for
    assert run_resources({"GPU": 1}, config({"max_pages_in_flight": 8, "calls_in_flight": 3})).calls_in_flight == 3


def test_generate_takes_one_call_at_a_time_and_continuous_on_a_cpu_takes_calls_in_flight():
    generate = run_resources({"CPU": 8, "GPU": 2}, config({"engine": "generate"}))
    assert (generate.streams, generate.calls_in_flight) == (False, 1)
    continuous = run_resources({"CPU": 8}, config({"engine": "continuous", "calls_in_flight": 3}))
    assert (continuous.streams, continuous.calls_in_flight) == (True, 3)  # not sized from GPU memory


def test_explicit_overrides_from_the_config_stand():
    policy = run_resources({"CPU": 16, "GPU": 2}, config(num_actors=3, actor_memory_gb=1.5))
    assert (policy.actors, policy.actor_memory, policy.actor_gpus) == (3, int(1.5 * GIB), 1.0)
    assert run_resources({"CPU": 16}, config({"cpu_threads": 4})).cpu_threads == 4


def test_auto_means_continuous_on_a_gpu_decided_once():
    assert [wants_continuous(engine, on_gpu) for engine in ("auto", "generate", "continuous")
            for on_gpu in (False, True)] == [False, True, False, False, True, True]


def test_an_actor_bigger_than_every_node_is_refused_on_a_local_instance():
    check_actor_memory(config(actor_memory_gb=4), 4 * GIB)  # fits exactly
    with pytest.raises(ConfigError) as err:
        check_actor_memory(config(actor_memory_gb=6), 5.25 * GIB)
    assert str(err.value) == ("actor_memory_gb is 6 but this machine's Ray offers 5.2 GiB: the model actors could "
                              "never start (--actor-memory-gb)")


def finetune(workers: int, **model) -> FinetuneConfig:
    return FinetuneConfig(train="train.parquet", output="out", num_workers=workers, model=ModelOptions(**model))


def test_training_workers_on_gpus_take_one_gpu_and_one_cpu_each():
    assert train_resources({"CPU": 32, "GPU": 4}, finetune(4)) == TrainResources(
        workers=4, use_gpu=True, worker_cpus=1.0, backend="nccl", cpu_threads=None)


def test_training_workers_on_cpus_share_the_cores():
    assert train_resources({"CPU": 8}, finetune(2)) == TrainResources(
        workers=2, use_gpu=False, worker_cpus=1.0, backend="gloo", cpu_threads=4)
    assert train_resources({"CPU": 2}, finetune(4)) == TrainResources(
        workers=4, use_gpu=False, worker_cpus=0.5, backend="gloo", cpu_threads=1)
    assert train_resources({"CPU": 3}, finetune(4)).worker_cpus == 0.75
    assert train_resources({"CPU": 8}, finetune(2, cpu_threads=2)).cpu_threads == 2  # the config's stands


def test_the_policy_needs_no_ray():
    """Decided from plain numbers: the module imports no Ray (tests/test_layering.py checks the whole tree)."""
    import subprocess
    import sys

    code = "import sys, docpipe.execute.resources; assert 'ray' not in sys.modules and 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0
