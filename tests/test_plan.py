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

pytestmark = pytest.mark.slow  # subprocesses, compiles or whole-model FLOP counts: not in `make test-fast`

ROOT = Path(__file__).resolve().parents[1]


def _simulated_run_flops(name: str, epochs: int, freeze_start: float, input_size: int) -> list[int]:
    """Ground truth for the plan: the training-step FLOPs of each epoch of a real run, the freezer updated at each
    epoch end as the method card says, every step's FLOPs counted by torch (meta device: no compute)."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hf_layer_freeze import LayerFreezer

    with torch.device("meta"):
        kwargs = {"img_size": input_size} if name.startswith("vit") else {}
        model = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs)
        x = torch.empty(1, 3, input_size, input_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = LayerFreezer(model, optimizer, freeze_start=freeze_start)
    per_epoch = []
    for epoch in range(epochs):
        counter = FlopCounterMode(display=False)
        with counter:
            model(x).sum().backward()
        optimizer.zero_grad()
        per_epoch.append(counter.get_total_flops())
        freezer.update((epoch + 1) / epochs)
    return per_epoch


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0"])
def test_plan_matches_a_simulated_run(name):
    rows, saved = freeze_plan(name, epochs=6, freeze_start=0.2, freeze_level=1.0, input_size=64)
    num_units = rows[0].num_units
    expected = [0] + [num_units_to_freeze(freeze_fraction(e / 6, 0.2, 1.0), num_units) for e in range(1, 6)]
    assert [r.frozen_units for r in rows] == expected
    flops = _simulated_run_flops(name, epochs=6, freeze_start=0.2, input_size=64)
    assert [r.step_speedup for r in rows] == pytest.approx([flops[0] / f for f in flops])
    assert saved == pytest.approx(1 - sum(flops) / (6 * flops[0]))
    assert rows[-1].step_speedup > 1.5
    assert all(0 <= r.params_frozen <= 1 and 0 <= r.forward_flops_frozen <= 1 for r in rows)


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
