#!/usr/bin/env python
"""Gradient elements all-reduced per step by 2-process DDP (gloo, CPU) before and after freezing.

    python benchmarks/bench_ddp_comm.py

Launches `accelerate launch --multi_gpu --num_processes 2 tests/workers/ddp_accelerate.py` (the worker the
multi-process tests use: timm resnet10t, LayerFreezer with freeze_start=0.2, a comm hook counting the elements of
every bucket handed to all-reduce) and prints, per step, the elements all-reduced against the trainable elements.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--find-unused-parameters", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        command = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            str(ROOT / "tests" / "workers" / "ddp_accelerate.py"),
            "--out",
            out,
            "--steps",
            str(args.steps),
        ]
        if args.find_unused_parameters:
            command.append("--find-unused-parameters")
        env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        path = Path(out) / "rank0.json"
        if not path.exists():
            print(proc.stderr[-4000:], file=sys.stderr)
            return 1
        result = json.loads(path.read_text())
    print(f"2 processes (gloo, CPU), timm resnet10t, find_unused_parameters={args.find_unused_parameters}")
    print("ranks bitwise identical after every step:", result["all_identical"])
    print()
    print("| step | units frozen | elements all-reduced | trainable elements | fp32 MB all-reduced |")
    print("|---:|---:|---:|---:|---:|")
    for record in result["records"]:
        print(
            f"| {record['step']} | {record['frozen_units']}/{result['num_units']} | {record['allreduced']:,} "
            f"| {record['trainable']:,} | {record['allreduced'] * 4 / 1e6:.1f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
