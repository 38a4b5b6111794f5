#!/usr/bin/env python
"""End to end: whole training runs with freezing against the same run without, and the FLOP-ideal saving.

    python benchmarks/bench_end_to_end.py          # resnet18, 64 px, 10 epochs of 8 steps, 2 repeats
    python benchmarks/bench_end_to_end.py --quick  # 1 repeat

Each run trains the same model from the same seed on the same fixed batches, calling `LayerFreezer.update` at
the end of each epoch (the method card's rule), for the default schedule (freeze_start=0.5) and for
freeze_start=0.1, both with freeze_level=1.0. The ideal share saved integrates the FLOP-ideal step cost over the
schedule: 1 - sum over epochs of FLOPs(units frozen during that epoch) / (epochs x FLOPs(nothing frozen)).
Runs of each repeat are interleaved (baseline, default, 0.1, baseline, ...) and the median is kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from bench_freezing import Config, create, step_flops, synchronize

SCHEDULES = {"baseline": None, "default (start 0.5)": 0.5, "freeze_start=0.1": 0.1}


def run(base, freeze_start, batches, args) -> tuple[float, list[int]]:
    config = Config(base, 0.0, args, freeze_start=freeze_start or 0.0)
    frozen_during_epoch = []
    synchronize(args.device)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        frozen_during_epoch.append(config.freezer.frozen_units)
        for x, y in batches:
            config.step(x, y)
        if freeze_start is not None:
            config.freezer.update((epoch + 1) / args.epochs)
    synchronize(args.device)
    return time.perf_counter() - start, frozen_during_epoch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps-per-epoch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    if args.device == "cuda":
        args.bf16 = args.channels_last = True

    torch.manual_seed(0)
    base = create(args.model, args.image_size)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(args.device),
            torch.randint(0, 100, (args.batch_size,), generator=generator).to(args.device),
        )
        for _ in range(args.steps_per_epoch)
    ]
    if args.channels_last:
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    run(base, None, batches[:2], argparse.Namespace(**{**vars(args), "epochs": 1}))  # warm-up

    times: dict[str, list[float]] = {name: [] for name in SCHEDULES}
    frozen: dict[str, list[int]] = {}
    for _ in range(args.repeats):
        for name, freeze_start in SCHEDULES.items():
            seconds, frozen[name] = run(base, freeze_start, batches, args)
            times[name].append(seconds)

    # FLOP-ideal step cost for each frozen-unit count the schedules used.
    x, y = batches[0]
    flops = {0: step_flops(Config(base, 0.0, args), x, y)}
    for counts in frozen.values():
        for k in set(counts) - set(flops):
            config = Config(base, 0.0, args)
            config.freezer.freeze_units(k)
            flops[k] = step_flops(config, x, y)

    baseline = statistics.median(times["baseline"])
    rows = []
    for name, freeze_start in SCHEDULES.items():
        median = statistics.median(times[name])
        ideal = 1 - sum(flops[k] for k in frozen[name]) / (args.epochs * flops[0])
        measured = 1 - median / baseline
        rows.append(
            {
                "run": name,
                "freeze_start": freeze_start,
                "wall_time_s": median,
                "all_times_s": times[name],
                "share_saved": measured,
                "ideal_share_saved": ideal,
                "saving_vs_ideal": measured / ideal if ideal > 0 else None,
                "units_frozen_per_epoch": frozen[name],
            }
        )
    print(
        f"{args.model}, {args.epochs} epochs x {args.steps_per_epoch} steps, batch {args.batch_size} at "
        f"{args.image_size} px, {args.device}, median of {args.repeats}\n"
    )
    print("| run | wall time (s) | share saved | ideal share saved | saved / ideal | units frozen per epoch |")
    print("|---|---:|---:|---:|---:|---|")
    for row in rows:
        ratio = "—" if row["saving_vs_ideal"] is None else f"{row['saving_vs_ideal']:.2f}"
        print(
            f"| {row['run']} | {row['wall_time_s']:.1f} | {row['share_saved']:.1%} | {row['ideal_share_saved']:.1%} "
            f"| {ratio} | {row['units_frozen_per_epoch']} |"
        )
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    (output / f"end_to_end_{args.device}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
