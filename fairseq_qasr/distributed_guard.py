"""Refuse distributed configurations that fairseq 0.12 would silently not run.

``fairseq-train --cpu --distributed-world-size 2 --distributed-init-method tcp://...`` spawns
``min(torch.cuda.device_count(), world_size)`` = 0 workers and exits 0 having trained nothing; ``pytorch_ddp``
rejects CPU modules and ``nccl`` needs GPUs. The plugin wraps fairseq's ``call_main`` (the entry every fairseq CLI
goes through after importing ``--user-dir``) and stops such runs with a message giving the command that works.
"""
from typing import Any, Callable, List, Optional

import torch

CPU_RECIPE = ("start one process per rank: --cpu --distributed-no-spawn --distributed-init-method tcp://HOST:PORT "
              "--distributed-world-size N --distributed-rank R --device-id 0 --distributed-backend gloo "
              "--ddp-backend legacy_ddp (see README, 'Distributed training')")


class DistributedConfigError(SystemExit):
    """A distributed configuration that would not train (a SystemExit: a message, no traceback)."""

    def __init__(self, message: str):
        super().__init__(f"fairseq-qasr: {message}")


def distributed_problems(cfg: Any, cuda_devices: Optional[int] = None) -> List[str]:
    """What would go wrong with this fairseq config's distributed settings (empty when fine)."""
    d = cfg.distributed_training
    if d.distributed_world_size <= 1 or getattr(cfg.common, "tpu", False):
        return []
    cuda_devices = torch.cuda.device_count() if cuda_devices is None else cuda_devices
    on_cpu = cfg.common.cpu or cuda_devices == 0
    problems = []
    if not d.distributed_no_spawn and cuda_devices == 0:
        problems.append(f"--distributed-world-size {d.distributed_world_size} without --distributed-no-spawn spawns "
                        f"one worker per CUDA device, and there are none: fairseq would exit 0 having trained nothing")
    if on_cpu and d.ddp_backend not in ("legacy_ddp", "no_c10d"):
        problems.append(f"--ddp-backend {d.ddp_backend} rejects CPU modules; use --ddp-backend legacy_ddp")
    if on_cpu and d.distributed_backend == "nccl":
        problems.append("--distributed-backend nccl needs GPUs; use --distributed-backend gloo")
    return problems


def install() -> None:
    """Wrap ``fairseq.distributed.utils.call_main`` once (idempotent)."""
    from fairseq.distributed import utils as dist_utils

    if getattr(dist_utils.call_main, "_qasr_guarded", False):
        return
    original: Callable = dist_utils.call_main

    def call_main(cfg, main, **kwargs):
        problems = distributed_problems(cfg)
        if problems:
            raise DistributedConfigError("distributed training would not run as asked:\n  - " + "\n  - ".join(problems)
                                         + f"\nOn CPUs, {CPU_RECIPE}.")
        return original(cfg, main, **kwargs)

    call_main._qasr_guarded = True
    dist_utils.call_main = call_main
