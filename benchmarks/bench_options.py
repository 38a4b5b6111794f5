#!/usr/bin/env python
"""The freezer's options where they matter: `order` on a model defined out of execution order, `budget` on ResNet.

    python benchmarks/bench_options.py            # xception41 (order, f = 0.9) and resnet18 (budget, f = 0.5)
    python benchmarks/bench_options.py --quick

Configurations compared freeze the same fraction f with the library's `LayerFreezer`; the table shows what froze
(units, parameters, forward FLOPs), the FLOP-ideal step speedup and the measured one (median step time,
configurations interleaved, warm-up discarded).
"""

from __future__ import annotations

import argparse
import sys

import torch
from bench_freezing import Config, create, step_flops, time_interleaved

from hf_layer_freeze import LayerFreezer

# (model, options, fraction frozen). Among timm models, definition and execution order rarely differ at a cut that
# matters; xception41 at f = 0.9 is one where they do (FLOP-ideal step cost 5% apart).
CASES = [
    ("xception41", {"order": "definition"}, 0.9),
    ("xception41", {"order": "execution"}, 0.9),
    ("resnet18", {"budget": "units"}, 0.5),
    ("resnet18", {"budget": "params"}, 0.5),
    ("resnet18", {"budget": "flops"}, 0.5),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    args.bf16 = args.channels_last = args.device == "cuda"
    if args.quick:
        args.repeats, args.warmup = 4, 1

    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    y = torch.randint(0, 100, (args.batch_size,), device=args.device)
    rows = []
    for model_name in dict.fromkeys(name for name, _, _ in CASES):
        base = create(model_name, args.image_size)
        configs, labels = [Config(base, 0.0, args, attach_freezer=False)], ["nothing frozen"]
        for name, options, fraction in CASES:
            if name != model_name:
                continue
            config = Config(base, 0.0, args, attach_freezer=False)
            freezer = LayerFreezer(config.model, config.optimizer, freeze_start=0.0, **options)
            freezer.profile_with(x[:1])
            freezer.update(fraction)  # freeze_start 0, freeze_level 1: the fraction is the progress
            config.freezer = freezer
            configs.append(config)
            labels.append(", ".join(f"{k}={v}" for k, v in options.items()) + f", f={fraction}")
        flops = [step_flops(c, x, y) for c in configs]
        medians = time_interleaved(configs, x, y, args.repeats, args.warmup)
        for label, config, flop, median in zip(labels, configs, flops, medians, strict=True):
            if config.freezer is None:
                continue
            freezer = config.freezer
            k = freezer.frozen_units
            weights = freezer.profile.forward_flops
            rows.append(
                f"| {model_name} | {label} | {k}/{freezer.num_units} "
                f"| {sum(u.numel for u in freezer.units[:k]) / sum(u.numel for u in freezer.units):.0%} "
                f"| {sum(weights[:k]) / sum(weights):.0%} | {flops[0] / flop:.2f}× | {medians[0] / median:.2f}× |"
            )
    print(f"batch {args.batch_size} at {args.image_size} px, {args.device}\n")
    print("| model | option | units frozen | params frozen | fwd FLOPs frozen | ideal speedup | measured speedup |")
    print("|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
