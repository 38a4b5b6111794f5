"""Worker for tests/test_multiprocess.py: a 2-process DDP (gloo) Accelerate loop with LayerFreezer.

Checks, on every rank, after every optimizer step: parameters bitwise identical across ranks, frozen parameters
bitwise unchanged since they froze, and the gradient elements DDP all-reduced equal to the trainable elements.
Writes its findings to OUT/rank{N}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import timm
import torch
import torch.distributed as dist
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import CountingState, counting_allreduce_hook, params_digest, tensors_digest  # noqa: E402

from hf_layer_freeze import LayerFreezer  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--find-unused-parameters", action="store_true")
    parser.add_argument("--static-graph", action="store_true")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--freeze-level", type=float, default=1.0)
    parser.add_argument("--no-comm-hook", action="store_true")
    parser.add_argument("--freeze-batchnorm", action="store_true")
    args = parser.parse_args()

    ddp_kwargs = DistributedDataParallelKwargs(
        find_unused_parameters=args.find_unused_parameters, static_graph=args.static_graph
    )
    accelerator = Accelerator(
        cpu=True,
        kwargs_handlers=[ddp_kwargs],
        gradient_accumulation_steps=args.grad_accum,
        mixed_precision=args.mixed_precision,
    )
    set_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = CountingState()
    if not args.no_comm_hook:
        model.register_comm_hook(state, counting_allreduce_hook)
    freezer = LayerFreezer(
        model, optimizer, freeze_start=0.2, freeze_level=args.freeze_level, freeze_batchnorm=args.freeze_batchnorm
    )

    generator = torch.Generator().manual_seed(100 + accelerator.process_index)  # different data per rank
    world = accelerator.num_processes
    records = []
    frozen_snapshots: dict[str, torch.Tensor] = {}
    frozen_bn_buffers: dict[str, torch.Tensor] = {}
    buffers_unchanged = True
    names = {id(p): n for n, p in model.module.named_parameters()}
    all_identical = True
    frozen_unchanged = True
    for step in range(1, args.steps + 1):
        for _ in range(args.grad_accum):
            x = torch.randn(8, 3, 32, 32, generator=generator)
            y = torch.randint(0, 10, (8,), generator=generator)
            with accelerator.accumulate(model):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        reduced, state.elements = state.elements, 0
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        digests = [None] * world
        dist.all_gather_object(digests, params_digest(model))
        identical = len(set(digests)) == 1
        all_identical &= identical
        for name, before in frozen_snapshots.items():
            frozen_unchanged &= torch.equal(before, dict(model.module.named_parameters())[name].detach())
        for name, before in frozen_bn_buffers.items():
            buffers_unchanged &= torch.equal(before, dict(model.module.named_buffers())[name])
        # after this step's forward (which synced buffers from rank 0), before any new freeze
        bn_digest = tensors_digest(dict(model.module.named_buffers())[name] for name in sorted(frozen_bn_buffers))
        records.append(
            {
                "step": step,
                "allreduced": reduced,
                "trainable": trainable,
                "identical": identical,
                "frozen_units": freezer.frozen_units,
            }
        )
        # Several freeze events, decided from the step count alone (the same on every rank).
        result = freezer.update(step / args.steps)
        for unit in freezer.units[: result.frozen_units]:
            for param in unit.parameters:
                frozen_snapshots.setdefault(names[id(param)], param.detach().clone())
            if isinstance(unit.module, torch.nn.BatchNorm2d):
                for buffer_name, buffer in unit.module.named_buffers():
                    frozen_bn_buffers.setdefault(f"{unit.name}.{buffer_name}", buffer.clone())

    out = {
        "rank": accelerator.process_index,
        "world_size": world,
        "records": records,
        "all_identical": all_identical,
        "frozen_unchanged": frozen_unchanged,
        "frozen_batchnorm_buffers": len(frozen_bn_buffers),
        # DDP broadcasts rank 0's buffers at each forward, so only rank 0's stay exactly as they were at the freeze
        "frozen_batchnorm_buffers_unchanged": buffers_unchanged,
        "frozen_batchnorm_digest": bn_digest,
        "num_units": freezer.num_units,
        "final_frozen_units": freezer.frozen_units,
        "digest": params_digest(model),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump(out, f)
    accelerator.wait_for_everyone()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
