"""`docpipe finetune`: the training loop (pipeline/tools/finetune.py) in this process, or, with several workers,
under Ray Train (data-parallel, DDP over NCCL or gloo), its workers sized by execute/resources.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from docpipe.config import FinetuneConfig
from docpipe.execute.cluster import init_ray
from docpipe.execute.resources import train_resources
from docpipe.model.load import resolve_checkpoint
from docpipe.storage import register_secrets


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Examples checked and rendered here, before any training; then the training loop in this process, or,
    with num_workers > 1, in Ray Train workers."""
    from docpipe.tools.finetune import RECORD, prepare_examples, train

    register_secrets(config.storage)
    prepared = prepare_examples(config)
    if prepared.skipped:
        print(f"docpipe: skipped {prepared.skipped} invalid example(s) (--skip-invalid)", file=sys.stderr)
    if config.num_workers == 1:
        return train(config, prepared)

    # A locally built checkpoint (tiny-random) is built here, before the workers start: a worker that is not
    # rank 0 of torch.distributed would write it without weights (transformers saves on rank 0 only).
    resolve_checkpoint(config.model.name)
    init_ray()
    import ray
    from ray.train import RunConfig as TrainRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    policy = train_resources(ray.cluster_resources(), config)
    if policy.cpu_threads != config.model.cpu_threads:
        model = config.model.model_copy(update={"cpu_threads": policy.cpu_threads})
        config = config.model_copy(update={"model": model})
    output = Path(config.output).resolve()  # workers don't share the driver's working directory
    output.mkdir(parents=True, exist_ok=True)
    config = config.model_copy(update={"output": str(output)})
    trainer = TorchTrainer(
        _finetune_worker,
        train_loop_config={"config": config, "prepared": prepared},
        scaling_config=ScalingConfig(num_workers=policy.workers, use_gpu=policy.use_gpu,
                                     resources_per_worker={"CPU": policy.worker_cpus}),
        torch_config=TorchConfig(backend=policy.backend),
        # Ray Train's own run records; the adapter and docpipe's checkpoints go to the output itself.
        run_config=TrainRunConfig(name="docpipe-finetune", storage_path=str(output / "_ray_train")),
    )
    trainer.fit()
    return json.loads((output / RECORD).read_text())


def _finetune_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: torch.distributed is already set up; docpipe.tools.finetune.train does the rest."""
    from docpipe.tools.finetune import train

    train(loop_config["config"], loop_config["prepared"])
