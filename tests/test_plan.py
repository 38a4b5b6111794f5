"""`python -m hf_layer_freeze plan`: offline plans for several timm families."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_layer_freeze import freeze_fraction, num_units_to_freeze
from hf_layer_freeze.plan import freeze_plan

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0"])
def test_plan_follows_the_schedule_and_predicts_a_saving(name):
    rows, saved = freeze_plan(name, epochs=6, freeze_start=0.2, freeze_level=1.0, input_size=64)
    num_units = rows[0].num_units
    expected = [0] + [num_units_to_freeze(freeze_fraction(e / 6, 0.2, 1.0), num_units) for e in range(1, 6)]
    assert [r.frozen_units for r in rows] == expected
    assert all(a.step_speedup <= b.step_speedup for a, b in zip(rows, rows[1:], strict=False))
    assert rows[0].step_speedup == 1.0 and rows[-1].step_speedup > 1.5
    assert all(0 <= r.params_frozen <= 1 and 0 <= r.forward_flops_frozen <= 1 for r in rows)
    # the whole-run saving is the schedule's average step saving
    assert saved == pytest.approx(1 - sum(1 / r.step_speedup for r in rows) / 6)


def test_plan_budget_flops_freezes_half_the_compute():
    rows, _ = freeze_plan("resnet18", epochs=4, freeze_start=0.5, input_size=64, budget="flops")
    assert rows[-1].forward_flops_frozen <= 0.5
    rows_units, _ = freeze_plan("resnet18", epochs=4, freeze_start=0.5, input_size=64)
    assert rows_units[-1].forward_flops_frozen > 0.5  # half of resnet18's units is more than half its FLOPs


def test_plan_command_prints_writes_json_and_plots(tmp_path):
    command = [
        sys.executable, "-m", "hf_layer_freeze", "plan", "--model", "resnet18", "--epochs", "10",
        "--freeze-start", "0.1", "--input-size", "64", "--order", "execution", "--budget", "params",
        "--json", str(tmp_path / "plan.json"), "--plot", str(tmp_path / "plan.png"),
    ]  # fmt: skip
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "predicted share of training FLOPs saved over the run" in proc.stdout
    assert "| epoch | units frozen |" in proc.stdout
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["rows"]) == 10 and 0 < plan["saved"] < 1
    assert (tmp_path / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_command_rejects_an_unknown_model():
    proc = subprocess.run([sys.executable, "-m", "hf_layer_freeze", "plan", "--model", "resnet_nope", "--epochs", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "--model: 'resnet_nope' is not a timm model name" in proc.stderr
