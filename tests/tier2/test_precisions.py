"""Training and LAG sampling under ComfyUI's precision and attention flags.

ComfyUI reads its flags once per process, so each flag set runs tests/precision_check.py in its own process
(see there: a small SD1.5 loaded with the dtypes ComfyUI's loader picks, on this CPU and as ComfyUI would
on a T4 or an Ampere GPU). Each residual is compared with one trained in float32 on the same weights, so
the difference is the training precision's alone; the tolerances are about twice the differences measured
(README, "Precisions and attention backends").
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from personalized_residuals.residual_core import fileformat

SCRIPT = Path(__file__).resolve().parent.parent / "precision_check.py"

# ||dW - dW_fp32|| / ||dW_fp32|| over all layers, by the precision the training pass computes in. Measured
# (6 steps, lr 1e-3): float16 0.025-0.027, bfloat16 0.107-0.114, float32 with another attention kernel
# 4.1e-5-6.0e-5 (and 0 for the same arithmetic). Rounding in float16 or bfloat16 flips the direction of
# Adam's first, normalised steps where a gradient is near zero, hence differences of a few percent.
TOLERANCE = {"float16": 0.05, "bfloat16": 0.2, "float32": 5e-4}

# id: ComfyUI's flags, the devices ComfyUI answers for, the weight dtype expected on each.
RUNS = {
    "fp32": (["--cpu"], {"cpu": "float32", "t4": "float16"}),  # a T4 runs SD1.5 in fp16 with no flag
    "force-fp16": (["--cpu", "--force-fp16"], {"cpu": "float16", "t4": "float16"}),
    "fp16-unet": (["--cpu", "--fp16-unet"], {"cpu": "float16", "t4": "float16", "ampere": "float16"}),
    "bf16-unet": (["--cpu", "--bf16-unet"], {"cpu": "bfloat16", "t4": "bfloat16", "ampere": "bfloat16"}),
    "fp8_e4m3fn-unet": (["--cpu", "--fp8_e4m3fn-unet"], {"cpu": "float8_e4m3fn", "t4": "float8_e4m3fn"}),
    "fp32-unet": (["--cpu", "--fp32-unet"], {"ampere": "float32"}),
}
ATTENTION = {
    "split": ("--use-split-cross-attention", "attention_split"),
    "quad": ("--use-quad-cross-attention", "attention_sub_quad"),
    "pytorch": ("--use-pytorch-cross-attention", "attention_pytorch"),
}
# torch's CPU group_norm refuses bf16 input with fp16 parameters (a CUDA GPU runs it): only here is a run refused.
CPU_REFUSES = "mixed dtype (CPU): expect parameter to have scalar type of Float"



def _run(name: str, flags: list[str], devices: str, folder: Path) -> tuple[Path, dict, str]:
    """precision_check.py for one flag set: its folder, JSON lines by device, stderr (when it failed)."""
    out = folder / name
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "--emulate", devices, "--", *flags],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return out, {r["emulate"]: r for r in lines}, proc.stderr if proc.returncode else ""


@pytest.fixture(scope="module")
def runs(folder):
    """Every flag set's process, started together (each computes on one thread, so as many run at once as
    there are cores): name -> future of _run's result."""
    jobs = {name: (flags, ",".join(expected)) for name, (flags, expected) in RUNS.items()}
    jobs |= {name: (["--cpu", flag], "cpu") for name, (flag, _) in ATTENTION.items()}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        yield {name: pool.submit(_run, name, flags, devices, folder) for name, (flags, devices) in jobs.items()}


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    return {k: layer.weight_delta() for k, layer in fileformat.load(str(path)).layers.items()}


def _difference(path: Path, reference: Path) -> float:
    a, b = _deltas(path), _deltas(reference)
    return float(sum((a[k] - b[k]).norm() ** 2 for k in b) ** 0.5 / sum(v.norm() ** 2 for v in b.values()) ** 0.5)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("precisions")


@pytest.fixture(scope="module")
def fp32(runs):
    out, records, err = runs["fp32"].result()
    assert not err, err[-3000:]
    return out / "cpu.safetensors"


@pytest.mark.parametrize("name,device", [(n, d) for n, (_, expected) in RUNS.items() for d in expected])
def test_training_and_lag_sampling_under_each_precision_match_float32(name, device, runs, fp32):
    _, expected = RUNS[name]
    out, records, err = runs[name].result()
    if CPU_REFUSES in err and device not in records:
        pytest.skip(f"torch's CPU kernels refuse this set-up ({CPU_REFUSES}); a GPU runs it")
    assert device in records, err[-3000:]
    r = records[device]
    precision = "bfloat16" if device == "ampere" else "float16" if device == "t4" else "float32"
    # The model really is in the dtype the flags ask for, and computes as ComfyUI would on that device.
    assert r["weight_dtypes"] == [expected[device]] and r["proj_out_dtype"] == expected[device], r
    assert r["compute_dtype"] == {"cpu": "float32", "t4": "float16", "ampere": expected[device]}[device], r
    assert r["autocast"] == (device == "ampere") and r["loss_scaling"] == (precision == "float16"), r
    assert r["residual_finite"] and r["sample_finite"] and r["lag_changes_sample"] > 0, r
    reference = out / f"{device}-fp32.safetensors"
    same = _difference(out / f"{device}.safetensors", reference) if reference.exists() else 0.0
    original = _difference(out / f"{device}.safetensors", fp32)
    print(f"{name} as on {device}: weights {expected[device]}, training in {precision}: {same:.2e} from float32 on "
          f"the same weights, {original:.2e} from float32 on the float32 weights; {r['skipped_steps']} steps skipped")
    assert same <= TOLERANCE[precision], (same, r)


@pytest.mark.parametrize("name", list(ATTENTION))
def test_each_attention_backend_trains_and_samples_like_the_default(name, runs, fp32):
    flag, kernel = ATTENTION[name]
    out, records, err = runs[name].result()
    assert "cpu" in records, err[-3000:]
    r = records["cpu"]
    assert r["attention"] == kernel, r  # the flag took effect in that process
    assert r["residual_finite"] and r["sample_finite"] and r["lag_changes_sample"] > 0, r
    difference = _difference(out / "cpu.safetensors", fp32)
    print(f"{flag}: {difference:.2e} from the default kernel's residual")
    assert difference <= TOLERANCE["float32"]
