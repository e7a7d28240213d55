"""Device and thread choices shared by every wing that runs a model: precision for the device, torch threads on CPU."""
from __future__ import annotations


def precision_for(precision: str, on_gpu: bool, bf16_supported: bool = True, cpu_bf16: bool = False) -> str:
    """'bf16' or 'fp32'. auto follows the device: bf16 on a GPU that has it, and on a CPU with bf16 matmul units
    (cpu_bf16: this_cpu_bf16_fast), where benchmarks/bf16_cpu.py measured a LoRA DPO run on SmolLM2-135M faster than
    fp32 with per-step losses within 0.01 of fp32's on average (AMX 1.38x, AVX-512 BF16 1.49x); fp32 on other
    CPUs, whose bf16 is emulated."""
    if precision == "auto":
        return "bf16" if (bf16_supported if on_gpu else cpu_bf16) else "fp32"
    return precision


# bf16 matmul units, each measured against fp32 with benchmarks/bf16_cpu.py (README, Performance): AMX (Sapphire
# Rapids and later: 1.38x, 2026-12-06) and AVX-512 BF16's dot products (Zen 4: 1.49x, 2026-12-06)
CPU_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


def cpu_bf16_fast(cpuinfo: str) -> bool:
    """Whether /proc/cpuinfo's text shows a CPU whose bf16 matmuls beat fp32: AMX or AVX-512 BF16 in its flags line
    (not in "vmx flags")."""
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return bool(CPU_BF16_FLAGS & set(flags))


def this_cpu_bf16_fast(path: str = "/proc/cpuinfo") -> bool:
    """cpu_bf16_fast for this machine; False where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        return cpu_bf16_fast(open(path).read())
    except OSError:
        return False


def cpu_threads(cores: int, local_workers: int, requested: str | None = None) -> int:
    """Intra-op threads for one worker: OMP_NUM_THREADS as the user set it when starting the run, else the node's
    cores shared evenly by the workers on it. Ray sets OMP_NUM_THREADS=1 in every worker that has one CPU
    reserved, which leaves the other cores idle when fewer workers than cores share a node."""
    if requested and requested.strip().isdigit() and int(requested) > 0:
        return int(requested)
    return max(1, cores // max(1, local_workers))


CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_QUOTA = ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def quota_cores(quota_us: int | None, period_us: int | None) -> int | None:
    """Whole cores a CFS quota allows (at least one), None without a quota. A pod limited to 1.5 CPUs gets 1 thread:
    a second would be throttled for half of every period, and torch's threads wait on the slowest."""
    if quota_us is None or period_us is None or quota_us <= 0 or period_us <= 0:
        return None
    return max(1, quota_us // period_us)


def parse_cpu_max(text: str) -> tuple[int | None, int | None]:
    """cgroup v2 cpu.max ("QUOTA PERIOD", QUOTA "max" when unlimited) as (quota_us, period_us)."""
    parts = text.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return None, None
    return (int(parts[0]) if parts[0].isdigit() else None), int(parts[1])


def usable_cores(affinity: int | None = None, cpu_max: str = CGROUP_V2_CPU_MAX,
                 v1_files: tuple[str, str] = CGROUP_V1_QUOTA) -> int:
    """The cores this process may use: its CPU affinity, capped by the container's CPU quota (cgroup v2 cpu.max, or
    v1's cfs quota): a Kubernetes pod with `limits.cpu: 8` on a 96-core node sees 96 cores in its affinity."""
    import os

    cores = len(os.sched_getaffinity(0)) if affinity is None else affinity
    quota, period = None, None
    try:
        quota, period = parse_cpu_max(open(cpu_max).read())
    except OSError:
        try:
            quota, period = (int(open(path).read().strip()) for path in v1_files)
        except (OSError, ValueError):
            pass
    allowed = quota_cores(quota, period)
    return min(cores, allowed) if allowed else cores


def use_threads(threads: int | None) -> None:
    """torch's intra-op threads in a CPU actor: Ray sets OMP_NUM_THREADS=1 for an actor holding one CPU, which
    leaves the machine's other cores idle when there are fewer actors than cores."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def quantization_problem(bits: int | None, bitsandbytes_installed: bool) -> str | None:
    """Why this worker cannot load the base in 4/8 bit, None when it can (or nothing is asked). Decided on the worker:
    a CPU head node drives GPU workers, so the driver's devices and packages say nothing. bitsandbytes (0.49+) runs
    4/8-bit layers on CPU too, so a CPU worker trains QLoRA as well."""
    if not bits:
        return None
    if not bitsandbytes_installed:
        return "bitsandbytes is not installed on this worker"
    return None


def require_quantization(bits: int | None) -> None:
    """A ConfigError on the worker when training_config.model.peft.quantization cannot be honoured here."""
    import importlib.util

    from core.errors import ConfigError

    why = quantization_problem(bits, importlib.util.find_spec("bitsandbytes") is not None)
    if why:
        raise ConfigError(f"training_config.model.peft.quantization.bits={bits} cannot be loaded on this worker",
                          why=why, fix="install bitsandbytes on the workers (pip install bitsandbytes; make setup "
                                       "does), or set training_config.model.peft.quantization=null")
