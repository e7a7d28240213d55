"""Device and thread choices shared by every wing that runs a model: precision for the device, torch threads on CPU."""
from __future__ import annotations


def precision_for(precision: str, on_gpu: bool, bf16_supported: bool = True) -> str:
    """'bf16' or 'fp32'. auto follows the device: CPU autocast in bf16 is slow and lossy, so CPU runs in fp32."""
    if precision == "auto":
        return "bf16" if on_gpu and bf16_supported else "fp32"
    return precision


def cpu_threads(cores: int, local_workers: int, requested: str | None = None) -> int:
    """Intra-op threads for one worker: OMP_NUM_THREADS as the user set it when starting the run, else the node's
    cores shared evenly by the workers on it. Ray sets OMP_NUM_THREADS=1 in every worker that has one CPU
    reserved, which leaves the other cores idle when fewer workers than cores share a node."""
    if requested and requested.strip().isdigit() and int(requested) > 0:
        return int(requested)
    return max(1, cores // max(1, local_workers))


def use_threads(threads: int | None) -> None:
    """torch's intra-op threads in a CPU actor: Ray sets OMP_NUM_THREADS=1 for an actor holding one CPU, which
    leaves the machine's other cores idle when there are fewer actors than cores."""
    if threads:
        import torch

        torch.set_num_threads(threads)
