"""`python -m hf_layer_freeze plan`: what will freeze when, and what it should save, before training.

Everything runs offline on the meta device (no weights, no data, no compute): the timm model is built with
`pretrained=False`, its units are profiled on one dummy input, and the FLOPs of a training step are counted with
`torch.utils.flop_counter.FlopCounterMode` for each number of frozen units the schedule reaches. The predicted speedup
is the FLOP ratio; measured speedups on CPU were within 10% of it (see the README's benchmarks).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .freezer import LayerFreezer
from .options import BUDGETS, GRANULARITIES, ORDERS

__all__ = ["PlanRow", "freeze_plan", "main"]


@dataclass(frozen=True)
class PlanRow:
    """One epoch of the plan: what is frozen while it trains, and its predicted cost."""

    epoch: int
    frozen_units: int
    num_units: int
    params_frozen: float
    forward_flops_frozen: float
    step_speedup: float


def _step_flops(model: nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model(x).float().sum().backward()
    for param in model.parameters():
        param.grad = None
    return counter.get_total_flops()


def freeze_plan(
    model_name: str,
    epochs: int,
    freeze_start: float = 0.5,
    freeze_level: float = 1.0,
    input_size: int = 224,
    order: str = "definition",
    granularity: str = "module",
    budget: str = "units",
    num_classes: int = 1000,
) -> tuple[list[PlanRow], float]:
    """
    The freezing plan of a timm model trained for `epochs` epochs with freezing at each epoch end.

    Returns the rows (one per epoch) and the predicted share of the whole run's training FLOPs saved.

    Example:

    ```python
    >>> from hf_layer_freeze.plan import freeze_plan
    >>> rows, saved = freeze_plan("resnet18", epochs=4, input_size=64)
    >>> [row.frozen_units for row in rows]
    [0, 0, 0, 20]
    >>> round(saved, 2)
    0.09

    ```
    """
    import timm

    if not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be a positive integer, got {input_size!r}")
    with torch.device("meta"):
        try:
            model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=input_size)
        except TypeError:  # convnets do not take img_size
            model = timm.create_model(model_name, pretrained=False, num_classes=num_classes)
        x = torch.empty(2, 3, input_size, input_size)  # two images: BatchNorm refuses one at 1x1 in training
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = LayerFreezer(
        model, optimizer, freeze_start, freeze_level, order=order, granularity=granularity, budget=budget
    )
    freezer.profile_with(x)
    total_params = sum(unit.numel for unit in freezer.units)
    total_flops = sum(freezer.profile.forward_flops) or 1
    counts = [0] + [freezer.num_units_at(e / epochs) for e in range(1, epochs)]
    base = _step_flops(model, x)
    cost = {0: base}
    rows = []
    for epoch, k in enumerate(counts, start=1):
        if k not in cost:
            freezer.freeze_units(k)  # counts only grow, so freezing further is all the plan needs
            cost[k] = _step_flops(model, x)
        rows.append(
            PlanRow(
                epoch=epoch,
                frozen_units=k,
                num_units=freezer.num_units,
                params_frozen=sum(u.numel for u in freezer.units[:k]) / total_params,
                forward_flops_frozen=sum(freezer.profile.forward_flops[:k]) / total_flops,
                step_speedup=base / cost[k],
            )
        )
    saved = 1 - sum(cost[k] for k in counts) / (epochs * base)
    return rows, saved


def _table(rows: list[PlanRow], events_only: bool) -> str:
    lines = [
        "| epoch | units frozen | % params frozen | % forward FLOPs frozen | predicted step speedup |",
        "|---:|---:|---:|---:|---:|",
    ]
    previous = None
    for row in rows:
        if events_only and row.frozen_units == previous:
            continue
        previous = row.frozen_units
        lines.append(
            f"| {row.epoch} | {row.frozen_units}/{row.num_units} | {row.params_frozen:.1%} "
            f"| {row.forward_flops_frozen:.1%} | {row.step_speedup:.2f}× |"
        )
    return "\n".join(lines)


def _plot(rows: list[PlanRow], saved: float, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r.epoch for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.step(epochs, [r.frozen_units / r.num_units for r in rows], where="post", label="units")
    left.step(epochs, [r.params_frozen for r in rows], where="post", label="parameters")
    left.step(epochs, [r.forward_flops_frozen for r in rows], where="post", label="forward FLOPs")
    left.set(xlabel="epoch", ylabel="share frozen", title="What is frozen while each epoch trains")
    right.step(epochs, [r.step_speedup for r in rows], where="post")
    right.set(xlabel="epoch", ylabel="predicted step speedup", title=f"Whole run: {saved:.1%} of FLOPs saved")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hf_layer_freeze", description="Layer freezing tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="print what freezes when, and the predicted saving (offline)")
    plan.add_argument("--model", required=True, help="a timm model name, e.g. resnet50")
    plan.add_argument("--epochs", type=int, required=True)
    plan.add_argument("--freeze-start", type=float, default=0.5)
    plan.add_argument("--freeze-level", type=float, default=1.0)
    plan.add_argument("--input-size", type=int, default=224)
    plan.add_argument("--num-classes", type=int, default=1000)
    plan.add_argument("--order", default="definition", choices=ORDERS)
    plan.add_argument("--granularity", default="module", choices=GRANULARITIES)
    plan.add_argument("--budget", default="units", choices=BUDGETS)
    plan.add_argument("--all-epochs", action="store_true", help="one row per epoch, not per freeze event")
    plan.add_argument("--json", help="also write the plan to this JSON file")
    plan.add_argument("--plot", help="draw the plan into this PNG file (needs matplotlib)")
    args = parser.parse_args(argv)
    import timm

    if not timm.is_model(args.model):  # accepts pretrained tags (resnet18.a1_in1k), refuses wildcards
        parser.error(f"--model: {args.model!r} is not a timm model name (see timm.list_models())")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            parser.error(f"{option}: the folder {folder!r} does not exist")
    try:
        rows, saved = freeze_plan(
            args.model,
            args.epochs,
            args.freeze_start,
            args.freeze_level,
            args.input_size,
            args.order,
            args.granularity,
            args.budget,
            args.num_classes,
        )
    except ValueError as error:
        parser.error(str(error))
    title = (
        f"{args.model} at {args.input_size} px, {args.epochs} epochs, freeze_start={args.freeze_start}, "
        f"freeze_level={args.freeze_level}, order={args.order}, granularity={args.granularity}, budget={args.budget}"
    )
    print(title)
    print()
    print(_table(rows, events_only=not args.all_epochs))
    print()
    print(f"predicted share of training FLOPs saved over the run: {saved:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"title": title, "saved": saved, "rows": [asdict(r) for r in rows]}, f, indent=2)
    if args.plot:
        _plot(rows, saved, title, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
