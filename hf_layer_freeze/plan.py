"""`python -m hf_layer_freeze plan`: what will freeze when, and what it should save, before training.

Everything runs offline on the meta device (no weights, no data, no compute), in three parts:

- `plan_models`: the model, built from its config (`build_plan_model`: a timm name, a transformers model type or a
  directory holding a `config.json`, optionally with LoRA) with the inputs of one training step;
- `plan_simulation`: the schedule over the run (`plan_rows`): the step of each freeze event, by the callback's own
  timing rule (`schedule.updates_at_step`), and each step's FLOPs, counted by torch;
- here: `freeze_plan` (the two together), the table, the plot and the command line (`main`).

A run is `epochs` epochs with freezing at each epoch end (the callback's `freeze_every="epoch"`), or `steps` steps with
freezing as soon as the schedule asks for one more unit (`freeze_every="step"`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict

from .options import add_option_arguments
from .plan_models import (  # re-exported: `from hf_layer_freeze.plan import build_plan_model` keeps working
    COMPOSED_MODEL_TYPES,
    TASKS,
    PlanModel,
    _parse_config_overrides,  # noqa: F401 (benchmarks/bench_freezing.py reads config overrides as plan does)
    build_plan_model,
    model_source,
)
from .plan_simulation import PlanRow, plan_rows

__all__ = [
    "COMPOSED_MODEL_TYPES",
    "TASKS",
    "PlanModel",
    "PlanRow",
    "build_parser",
    "build_plan_model",
    "freeze_plan",
    "main",
    "model_source",
    "plan_rows",
]


def freeze_plan(
    model_name: str,
    epochs: int | None = None,
    freeze_start: float = 0.5,
    freeze_level: float = 1.0,
    input_size: int | None = None,
    order: str = "definition",
    granularity: str = "module",
    budget: str = "units",
    num_classes: int | None = None,
    *,
    freeze_start_level: float = 0.0,
    embeddings: str = "unit",
    steps: int | None = None,
    task: str | None = None,
    seq_len: int | None = None,
    batch_size: int = 2,
    config_overrides: str | None = None,
    lora_r: int = 0,
    lora_target_modules: str | Sequence[str] | None = None,
) -> tuple[list[PlanRow], float]:
    """
    The freezing plan of a model trained for `epochs` epochs with freezing at each epoch end, or for `steps` steps
    with freezing as soon as the schedule asks for one more unit.

    Returns the rows and the predicted share of the whole run's training FLOPs saved (the step FLOPs integrated over
    every step). In epochs there is one row per epoch; in steps one per freeze event (the step at which the count of
    frozen units changes), the first at step 1.

    Args:
        model_name (`str`): a timm model name, a transformers model type or a directory (see `build_plan_model`).
        epochs (`int`, *optional*): the run's length in epochs; exactly one of `epochs` and `steps`.
        freeze_start, freeze_level, freeze_start_level, order, granularity, embeddings, budget: the `LayerFreezer`
            options.
        input_size, num_classes, task, seq_len, batch_size, config_overrides, lora_r, lora_target_modules:
            the model and its inputs (see `build_plan_model`).
        steps (`int`, *optional*): the run's length in optimizer steps.

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
    plan_model = build_plan_model(
        model_name,
        task=task,
        input_size=input_size,
        seq_len=seq_len,
        batch_size=batch_size,
        num_classes=num_classes,
        config_overrides=config_overrides,
        lora_r=lora_r,
        lora_target_modules=lora_target_modules,
    )
    return plan_rows(
        plan_model,
        epochs=epochs,
        steps=steps,
        freeze_start=freeze_start,
        freeze_level=freeze_level,
        freeze_start_level=freeze_start_level,
        order=order,
        granularity=granularity,
        embeddings=embeddings,
        budget=budget,
    )


def _table(rows: list[PlanRow], events_only: bool) -> str:
    by_step = rows[0].step is not None
    lines = [
        f"| {'from step' if by_step else 'epoch'} | units frozen | % trainable params frozen "
        "| % forward FLOPs frozen | predicted step speedup |",
        "|---:|---:|---:|---:|---:|",
    ]
    previous = None
    for row in rows:
        if events_only and row.frozen_units == previous:
            continue
        previous = row.frozen_units
        lines.append(
            f"| {row.step if by_step else row.epoch} | {row.frozen_units}/{row.num_units} | {row.params_frozen:.1%} "
            f"| {row.forward_flops_frozen:.1%} | {row.step_speedup:.2f}× |"
        )
    return "\n".join(lines)


def _plot(rows: list[PlanRow], saved: float, title: str, path: str, length: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = "step" if rows[0].step is not None else "epoch"
    x = [r.step if r.step is not None else r.epoch for r in rows] + [length + 1]
    rows = rows + rows[-1:]  # the last row lasts to the end of the run
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.step(x, [r.frozen_units / r.num_units for r in rows], where="post", label="units")
    left.step(x, [r.params_frozen for r in rows], where="post", label="trainable parameters")
    left.step(x, [r.forward_flops_frozen for r in rows], where="post", label="forward FLOPs")
    left.set(xlabel=unit, ylabel="share frozen", title=f"What is frozen while each {unit} trains")
    right.step(x, [r.step_speedup for r in rows], where="post")
    right.set(xlabel=unit, ylabel="predicted step speedup", title=f"Whole run: {saved:.1%} of FLOPs saved")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    left.legend()
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lora_rank(value: str) -> int:
    rank = int(value)
    if rank < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (0: no LoRA), got {rank}")
    return rank


def build_parser() -> argparse.ArgumentParser:
    """
    The command line of `python -m hf_layer_freeze`: its `plan` command and every flag, built in this one place.

    Example:

    ```python
    >>> from hf_layer_freeze.plan import build_parser
    >>> args = build_parser().parse_args(["plan", "--model", "resnet18", "--epochs", "4"])
    >>> args.command, args.epochs, args.freeze_start
    ('plan', 4, 0.5)

    ```
    """
    parser = argparse.ArgumentParser(prog="python -m hf_layer_freeze", description="Layer freezing tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="print what freezes when, and the predicted saving (offline)")
    plan.add_argument(
        "--model",
        required=True,
        help="a timm model name (resnet50), a transformers model type (llama, bert, vit) or a local directory "
        "holding a transformers config.json",
    )
    length = plan.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=int, help="run length in epochs; freezes at epoch ends")
    length.add_argument("--steps", type=int, help="run length in steps; freezes as soon as one more unit is due")
    plan.add_argument(
        "--freeze-every",
        choices=("epoch", "step"),
        help="the callback's freeze_every: 'epoch' goes with --epochs, 'step' with --steps (the default follows them)",
    )
    add_option_arguments(
        plan, ("freeze_start", "freeze_level", "freeze_start_level", "order", "granularity", "embeddings", "budget")
    )
    plan.add_argument("--task", choices=tuple(TASKS), help="transformers: the head (default by model type)")
    plan.add_argument(
        "--config-overrides", help="transformers: config values, e.g. num_hidden_layers=4,hidden_size=256"
    )
    plan.add_argument("--input-size", type=int, help="vision: image side in pixels (timm default: 224)")
    plan.add_argument("--seq-len", type=int, help="text: tokens per sequence (default: 512)")
    plan.add_argument("--batch-size", type=int, default=2, help="images or sequences per step")
    plan.add_argument("--num-classes", type=int, help="classes of the classifier (timm default: 1000)")
    plan.add_argument("--lora-r", type=_lora_rank, default=0, help="LoRA rank (0: no LoRA); needs peft")
    plan.add_argument(
        "--lora-target-modules", help="modules LoRA wraps, e.g. q_proj,v_proj (default: PEFT's for the model type)"
    )
    plan.add_argument("--all-epochs", action="store_true", help="one row per epoch, not per freeze event")
    plan.add_argument("--json", help="also write the plan to this JSON file")
    plan.add_argument("--plot", help="draw the plan into this PNG file (needs matplotlib)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """
    Run `python -m hf_layer_freeze plan ...` with `argv` (default: `sys.argv[1:]`): print the plan, write its JSON
    and plot if asked. Returns 0; bad input exits with status 2 and one line naming the argument.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    per = "epoch" if args.epochs is not None else "step"
    if args.freeze_every not in (None, per):
        parser.error(
            f"--freeze-every {args.freeze_every} needs --{args.freeze_every}s: a plan in {per}s freezes at each {per}"
        )
    if args.all_epochs and per == "step":
        parser.error("--all-epochs needs --epochs (a plan in steps has one row per freeze event)")
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        if folder and not os.path.isdir(folder):
            parser.error(f"{option}: the folder {folder!r} does not exist")
    try:
        plan_model = build_plan_model(
            args.model,
            task=args.task,
            input_size=args.input_size,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            num_classes=args.num_classes,
            config_overrides=args.config_overrides,
            lora_r=args.lora_r,
            lora_target_modules=args.lora_target_modules,
        )
        rows, saved = plan_rows(
            plan_model,
            epochs=args.epochs,
            steps=args.steps,
            freeze_start=args.freeze_start,
            freeze_level=args.freeze_level,
            freeze_start_level=args.freeze_start_level,
            order=args.order,
            granularity=args.granularity,
            embeddings=args.embeddings,
            budget=args.budget,
        )
    except (ValueError, ImportError) as error:
        parser.error(str(error))
    run = f"{args.epochs} epochs" if per == "epoch" else f"{args.steps} steps (freeze_every='step')"
    title = (
        f"{args.model} {plan_model.inputs}, {run}, freeze_start={args.freeze_start}, "
        f"freeze_level={args.freeze_level}, freeze_start_level={args.freeze_start_level}, order={args.order}, "
        f"granularity={args.granularity}, embeddings={args.embeddings}, budget={args.budget}"
    )
    print(title)
    print(f"built: {plan_model.description}")
    print()
    print(_table(rows, events_only=not args.all_epochs))
    print()
    print(f"predicted share of training FLOPs saved over the run: {saved:.1%}")
    if args.json:
        with open(args.json, "w") as f:
            document = {"title": title, "built": plan_model.description, "saved": saved}
            json.dump({**document, "rows": [asdict(r) for r in rows]}, f, indent=2)
    if args.plot:
        _plot(rows, saved, title, args.plot, args.epochs or args.steps)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
