"""CPU threads under a container's CPU quota (core/devices.py), against numbers worked by hand."""
from core import devices


def test_quota_in_whole_cores():
    assert devices.quota_cores(800_000, 100_000) == 8  # limits.cpu: 8
    assert devices.quota_cores(150_000, 100_000) == 1  # 1.5 CPUs: a second thread would be throttled half the time
    assert devices.quota_cores(50_000, 100_000) == 1  # half a CPU: still one thread
    assert devices.quota_cores(None, 100_000) is None and devices.quota_cores(-1, 100_000) is None  # v1 "no quota"


def test_cpu_max_parsing():
    assert devices.parse_cpu_max("400000 100000\n") == (400_000, 100_000)
    assert devices.parse_cpu_max("max 100000\n") == (None, 100_000)
    assert devices.parse_cpu_max("") == (None, None)


def test_usable_cores_is_the_affinity_capped_by_the_quota(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("800000 100000\n")  # a pod limited to 8 CPUs on a 96-core node
    missing = (str(tmp_path / "no-quota"), str(tmp_path / "no-period"))
    assert devices.usable_cores(96, str(cpu_max), missing) == 8
    assert devices.usable_cores(4, str(cpu_max), missing) == 4  # the affinity is already smaller
    cpu_max.write_text("max 100000\n")
    assert devices.usable_cores(96, str(cpu_max), missing) == 96
    # cgroup v1: quota and period files
    quota, period = tmp_path / "quota", tmp_path / "period"
    quota.write_text("300000\n")
    period.write_text("100000\n")
    assert devices.usable_cores(96, str(tmp_path / "absent"), (str(quota), str(period))) == 3
    assert devices.usable_cores(96, str(tmp_path / "absent"), missing) == 96
    # two workers of that 8-CPU pod get 4 threads each, not 48
    cpu_max.write_text("800000 100000\n")
    assert devices.cpu_threads(devices.usable_cores(96, str(cpu_max), missing), 2) == 4


def test_quantization_is_decided_by_the_workers_packages_not_its_devices():
    assert devices.quantization_problem(None, bitsandbytes_installed=False) is None
    assert "bitsandbytes is not installed" in devices.quantization_problem(8, bitsandbytes_installed=False)
    assert devices.quantization_problem(4, bitsandbytes_installed=True) is None  # CPU or GPU: bitsandbytes runs both


def test_a_worker_that_cannot_quantize_says_so_with_the_recipe_key(monkeypatch):
    import importlib.util

    import pytest

    from core.errors import ConfigError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError, match=r"training_config.model.peft.quantization.bits=4 cannot be loaded") as err:
        devices.require_quantization(4)
    assert "quantization=null" in str(err.value.fix)
    devices.require_quantization(None)  # nothing asked: nothing to check


def test_the_driver_no_longer_refuses_quantization_from_its_own_devices(tiny_model_dir):
    # a CPU head node driving GPU workers: check_model_knobs must not look at this machine's CUDA
    from launcher.commands.train import check_model_knobs
    from launcher.recipe import load_recipe

    peft = {"peft_scheme": "lora", "quantization": "4bit"}
    recipe = load_recipe({"run": {"name": "q", "model_name_or_path": str(tiny_model_dir), "data_s3_path": "d",
                                  "output_s3_path": "o"},
                          "training_config": {"model": {"peft": peft}}})
    check_model_knobs(recipe)  # raised "needs a GPU" here before


SAPPHIRE_RAPIDS = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                   "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
                   "vmx flags\t: vnmi ept\n")
ZEN_4 = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
ZEN_3 = "flags\t\t: fpu sse2 avx2 fma\nvmx flags\t: amx_bf16_in_a_vmx_line avx512_bf16\n"


def test_bf16_is_fast_on_cpus_with_amx_or_avx512_bf16():
    assert devices.cpu_bf16_fast(SAPPHIRE_RAPIDS)
    assert devices.cpu_bf16_fast(ZEN_4)  # bf16 dot products without AMX's tiles: measured 1.49x on Zen 4
    # no bf16 matmul unit: fp32; "vmx flags" is not the CPU's flags line
    assert not devices.cpu_bf16_fast(ZEN_3)
    assert not devices.cpu_bf16_fast("")  # no flags line (not x86): fp32
    assert not devices.this_cpu_bf16_fast("/nonexistent/cpuinfo")
