"""Real 2-process DDP runs (gloo, CPU): ranks identical, frozen parameters unchanged, less all-reduced, resume.

Each test launches `accelerate launch` / `torchrun` as a subprocess with a timeout and reads each rank's findings
from a JSON file (gloo processes here sometimes abort at exit after their work is done, so the exit code alone is
not trusted, nor is it ignored when a rank wrote nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"
BIN = Path(sys.executable).parent
TIMEOUT_S = 300

pytestmark = pytest.mark.multiprocess


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}",
    )
    return env


def _launch(command: list[str], out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(command, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    results = []
    for rank in range(2):
        path = out / f"rank{rank}.json"
        if not path.exists():
            raise AssertionError(
                f"rank {rank} wrote no result (exit code {proc.returncode}).\n"
                f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
            )
        results.append(json.loads(path.read_text()))
    assert [r["world_size"] for r in results] == [2, 2], "the launcher did not start 2 processes"
    return results


def _accelerate(out: Path, *flags: str) -> list[dict]:
    port = str(free_port())
    command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", port]
    return _launch([*command, str(WORKERS / "ddp_accelerate.py"), "--out", str(out), *flags], out)


def _torchrun(out: Path, *flags: str) -> list[dict]:
    port = str(free_port())
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    return _launch([*command, str(WORKERS / "ddp_trainer.py"), "--out", str(out), *flags], out)


ACCELERATE_CASES = {
    "find_unused_false": [],
    "find_unused_true": ["--find-unused-parameters"],
    "static_graph": ["--static-graph"],
    "grad_accumulation": ["--grad-accum", "2"],
    "bf16": ["--mixed-precision", "bf16"],
    "freeze_batchnorm": ["--freeze-batchnorm"],
}


@pytest.mark.parametrize("case", list(ACCELERATE_CASES))
def test_accelerate_ddp_stays_correct_and_all_reduces_only_trainable_parameters(tmp_path, case):
    ranks = _accelerate(tmp_path, *ACCELERATE_CASES[case])
    for result in ranks:
        assert result["all_identical"], [r["step"] for r in result["records"] if not r["identical"]]
        assert result["frozen_unchanged"]
        assert result["final_frozen_units"] == result["num_units"]
        counts = [r["frozen_units"] for r in result["records"]]
        assert len(set(counts)) >= 5, "expected several freeze events"
        # every step all-reduces exactly the trainable elements: nothing frozen, nothing missing
        for record in result["records"]:
            assert record["allreduced"] == record["trainable"], record
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["records"][-1]["allreduced"] < ranks[0]["records"][0]["allreduced"] / 10
    if case == "freeze_batchnorm":
        # frozen BatchNorm statistics: unchanged since the freeze on rank 0, whose buffers DDP broadcasts each
        # forward, and identical on both ranks
        assert ranks[0]["frozen_batchnorm_buffers"] > 0 and ranks[0]["frozen_batchnorm_buffers_unchanged"]
        assert ranks[0]["frozen_batchnorm_digest"] == ranks[1]["frozen_batchnorm_digest"]


TRAINER_CASES = {
    "fp32": [],
    "find_unused_bf16_accumulation": ["--find-unused-parameters", "--bf16", "--grad-accum", "2"],
    # every rank takes the adaptive schedule's decision at the same step (gradient norms all-reduced at each check)
    "adaptive_schedule": ["--schedule", "adaptive"],
}


@pytest.mark.parametrize("case", list(TRAINER_CASES))
def test_trainer_callback_finds_the_ddp_wrapper_and_keeps_ranks_identical(tmp_path, case):
    ranks = _torchrun(tmp_path, *TRAINER_CASES[case])
    for result in ranks:
        assert result["ddp_found"], "the callback did not find the Trainer's DDP wrapper"
        assert all(r["identical"] for r in result["records"])
        # what the last step trained with: no freeze is made after it
        assert 0 < result["final_frozen_units"] == result["records"][-1]["frozen_units"] < result["num_units"]
        # the user's comm hook survived every reducer rebuild and saw exactly the trainable elements
        assert all(r["allreduced"] == r["trainable"] for r in result["records"]), result["records"]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert [r["frozen_units"] for r in ranks[0]["records"]] == [r["frozen_units"] for r in ranks[1]["records"]]


def _trainer_resumes_multi_process_cpu_runs() -> bool:
    """transformers before 5.18 loads a multi-process run's optimizer state onto `cpu:0`, which torch cannot restore:
    the Trainer itself cannot resume a CPU multi-process run there (GPU runs load onto `cuda:N` and are unaffected)."""
    from packaging.version import Version
    from transformers import __version__

    return Version(__version__) >= Version("5.18")


@pytest.mark.skipif(
    not _trainer_resumes_multi_process_cpu_runs(),
    reason="transformers < 5.18 cannot resume a multi-process CPU run (map_location 'cpu:0'), with or without us",
)
@pytest.mark.parametrize(
    "options",
    [[], ["--order", "execution", "--budget", "flops"], ["--schedule", "adaptive"]],
    ids=["defaults", "execution-order-flops-budget", "adaptive-schedule"],
)
def test_trainer_ddp_resume_mid_freeze_equals_uninterrupted_run(tmp_path, options):
    common = ["--save-steps", "5", "--freeze-every", "epoch", "--samples", "64", *options]
    full = _torchrun(tmp_path / "full", *common)
    checkpoint = tmp_path / "full" / "trainer" / "checkpoint-10"
    assert checkpoint.is_dir()
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    frozen_at_checkpoint = saved["stateful_callbacks"]["LayerFreezingCallback"]["attributes"]["saved_frozen_units"]
    assert 0 < frozen_at_checkpoint < full[0]["num_units"]
    resumed = _torchrun(tmp_path / "resumed", *common, "--resume-from", str(checkpoint))
    assert resumed[0]["records"][0]["frozen_units"] >= frozen_at_checkpoint
    # the freeze re-applied before the first step reached DDP's buckets before the first backward
    assert all(r["allreduced"] == r["trainable"] for r in resumed[0]["records"]), resumed[0]["records"]
    assert resumed[0]["records"][0]["trainable"] < full[0]["records"][0]["trainable"]
    assert resumed[0]["state_digest"] == full[0]["state_digest"]
    assert resumed[1]["digest"] == full[1]["digest"]


def _torchrun_fsdp(out: Path, mode: str) -> list[dict]:
    port = str(free_port())
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port]
    return _launch([*command, str(WORKERS / "fsdp_worker.py"), "--out", str(out), "--fsdp", mode], out)


@pytest.mark.parametrize("mode", ["2", "1-orig"], ids=["fsdp2-fully_shard", "fsdp1-use_orig_params"])
def test_fsdp_freezing_keeps_ranks_identical_frozen_parameters_unchanged_and_saves_through_dcp(tmp_path, mode):
    ranks = _torchrun_fsdp(tmp_path, mode)
    for result in ranks:
        assert "refused" not in result
        assert result["identical"] and result["unchanged"]
        assert result["counts"][-1] == result["num_units"] and len(set(result["counts"])) >= 5
        # saved through DCP after a freeze event (some units frozen, some training): the full standard layout, with
        # the frozen parameters' state, the same on both ranks
        saved = result["saved"]
        assert saved["grouped"] == saved["with_state"] == result["names"]
        assert 0 < len(result["frozen_at_save"]) < len(result["names"])
        assert result["saved_same"] and result["loaded_same"]
        # loaded (dcp.load + set_optimizer_state_dict) into the frozen optimizer, whose state had gone on, and into
        # a fresh one: the saved state, exactly; the frozen parameters stay out of the groups, unmoved
        assert result["before_load"]["digest"] != saved["digest"]
        assert result["loaded_frozen"] == saved == result["loaded_fresh"]
        assert result["parameters_kept"] and result["still_frozen"]


def test_fsdp1_flat_parameters_are_refused_with_the_next_step(tmp_path):
    ranks = _torchrun_fsdp(tmp_path, "1-flat")
    for result in ranks:
        assert "use_orig_params=True" in result["refused"]
        assert "use_orig_params=True" in result["refused_inner_module"]
