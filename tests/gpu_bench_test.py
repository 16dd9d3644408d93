"""bench/gpu.py, prepared without a GPU: its dry run on the CPU, its peak table, its installs."""

import json
import subprocess
import sys

import keras
import pytest

from bench import gpu

pytest.importorskip("peft")


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the script picks its own "
                    "backends; once per suite is enough")
def test_dry_run_reports_every_figure(tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run([sys.executable, gpu.__file__, "--dry-run", "--sides", "klora,peft-eager",
                    "--json", str(out), "--markdown", str(tmp_path / "gpu.md")],
                   check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    klora_row, peft_row = result["summary"]["klora"], result["summary"]["peft-eager"]
    assert result["raw"]["klora"]["flops_per_step"] > 0
    for row in (klora_row, peft_row):
        assert row["step_min_s"] <= row["step_s"] <= row["step_max_s"]
        assert row["examples_per_s"] == pytest.approx(8 / row["step_s"])
        assert 0 < row["mfu_vs_measured_matmul"] and row["peak_memory_gib"] > 0
    assert "| klora |" in (tmp_path / "gpu.md").read_text()


def test_bf16_peaks_by_device_name():
    assert gpu.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu.bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu.bf16_peak("NVIDIA L4") == 121e12
    assert gpu.bf16_peak("cpu") is None


def test_only_missing_wheels_are_installed(tmp_path, monkeypatch):
    for name in ("keras_hub-0.32.0-py3-none-any.whl", "no_such_dist_x-1.0-py3-none-any.whl",
                 "notes.txt"):
        (tmp_path / name).write_text("")
    calls = []
    monkeypatch.setattr(gpu.subprocess, "run", lambda command, **kw: calls.append(command))
    assert gpu.install_missing(str(tmp_path)) == ["no_such_dist_x-1.0-py3-none-any.whl"]
    assert calls[0][-1].endswith("no_such_dist_x-1.0-py3-none-any.whl") and "--no-deps" in calls[0]
