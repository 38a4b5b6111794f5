#!/usr/bin/env python
"""Train a timm image classifier in a custom Accelerate loop, with progressive layer freezing.

    accelerate launch examples/train_timm.py                 # embedded digits, resnet10t, freezing on
    accelerate launch examples/train_timm.py --compare       # with and without freezing: table, JSON, figure
    accelerate launch --multi_gpu --num_processes 2 examples/train_timm.py --mixed-precision bf16
    accelerate launch examples/train_timm.py --schedule adaptive --freeze-start 0.1   # freeze what has settled

The freezing itself is three lines (see `LayerFreezer` below): build it after `accelerator.prepare`, register it
for checkpointing, and call `freezer.update(progress)` at the end of each epoch (with `--schedule adaptive`, at
every step: it checks every `--check-every` steps).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import evaluate
import timm
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from arguments import HelpFormatter, check_freezing, check_model_name, check_positive
from image_data import METRIC_PATH, collate, load_image_data
from tqdm.auto import tqdm

from hf_layer_freeze import LayerFreezer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", help="a Hugging Face image-classification dataset (needs internet)")
    data.add_argument("--data-dir", help="an imagefolder tree: class_name/*.png (optionally under train/, test/)")
    data.add_argument("--image-size", type=int, default=32, help="side of the square input images")
    data.add_argument("--max-train-samples", type=int, help="use only this many training images (smoke tests)")
    data.add_argument("--max-eval-samples", type=int, help="use only this many test images (smoke tests)")
    model = parser.add_argument_group("model and training")
    model.add_argument("--model", default="resnet10t", help="any timm model name")
    model.add_argument("--pretrained", action="store_true", help="load pretrained timm weights (needs internet)")
    model.add_argument("--epochs", type=int, default=12, help="passes over the training images")
    model.add_argument("--max-steps", type=int, help="stop after this many optimizer steps in all (smoke tests)")
    model.add_argument("--batch-size", type=int, default=64, help="per process")
    model.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (one-cycle schedule)")
    model.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay")
    model.add_argument("--seed", type=int, default=0, help="initialization and batch order")
    model.add_argument(
        "--mixed-precision", default="no", choices=["no", "bf16", "fp16", "fp8"], help="Accelerate's mixed precision"
    )
    data.add_argument("--augment", action="store_true", help="random affine jitter of training images")
    freezing = parser.add_argument_group("freezing")
    freezing.add_argument("--freeze-start", type=float, default=0.5, help="fraction of training, in [0, 1)")
    freezing.add_argument("--freeze-level", type=float, default=1.0, help="fraction frozen at the end, in [0, 1]")
    freezing.add_argument(
        "--schedule",
        default="linear",
        choices=["linear", "adaptive"],
        help="linear (the method card's) or adaptive (freeze units once their gradient norm settles)",
    )
    freezing.add_argument("--check-every", type=int, default=20, help="adaptive: optimizer steps between checks")
    freezing.add_argument("--no-freeze", action="store_true", help="train without freezing (the baseline)")
    freezing.add_argument("--compare", action="store_true", help="train without, then with freezing; compare")
    parser.add_argument("--output-dir", default="outputs/train_timm", help="results.json and freezing.png")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("epochs", "batch_size", "image_size", "max_steps", "max_train_samples",
                                  "max_eval_samples", "lr", "check_every"))  # fmt: skip
    check_freezing(parser, args)
    check_model_name(parser, args.model)
    if args.compare and args.no_freeze:
        parser.error("--compare already runs the baseline; drop --no-freeze")
    return args


_JITTER = None


def augmented_collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """`collate`, with each training image shifted, rotated and scaled a little (digits must not be flipped)."""
    global _JITTER
    if _JITTER is None:
        from torchvision.transforms import v2

        _JITTER = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    batch = collate(examples)
    batch["pixel_values"] = torch.stack([_JITTER(image) for image in batch["pixel_values"]])
    return batch


def create_model(name: str, num_classes: int, image_size: int, pretrained: bool) -> torch.nn.Module:
    try:  # ViT-style models take the input size; convnets do not know the argument
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, img_size=image_size)
    except TypeError:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes)


@torch.no_grad()
def evaluate_accuracy(model, loader, accelerator: Accelerator) -> float:
    metric = evaluate.load(METRIC_PATH)
    model.eval()
    for batch in loader:
        logits = model(batch["pixel_values"])
        predictions, references = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        metric.add_batch(predictions=predictions.cpu(), references=references.cpu())
    return float(metric.compute()["accuracy"])


def train_run(args, accelerator: Accelerator, data, freeze: bool) -> dict:
    """One full training run; returns its measurements (identical on every rank but timing)."""
    set_seed(args.seed)
    label = "freeze" if freeze else "baseline"
    train_set, test_set = data.train, data.test
    if args.max_train_samples:
        train_set = train_set.select(range(min(args.max_train_samples, len(train_set))))
    if args.max_eval_samples:
        test_set = test_set.select(range(min(args.max_eval_samples, len(test_set))))
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=args.batch_size, shuffle=True, collate_fn=augmented_collate if args.augment else collate,
        drop_last=True,
    )  # fmt: skip
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=256, collate_fn=collate)
    model = create_model(args.model, data.num_classes, args.image_size, args.pretrained)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the training split per process")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=total_steps, pct_start=0.15, anneal_strategy="cos"
    )
    scheduler = accelerator.prepare(scheduler)

    freezer = None
    if freeze:
        freezer = LayerFreezer(
            model, optimizer, freeze_start=args.freeze_start, freeze_level=args.freeze_level, schedule=args.schedule,
            check_every=args.check_every,
        )  # fmt: skip
        accelerator.register_for_checkpointing(freezer)

    curve = [{"epoch": 0, "step": 0, "train_time_s": 0.0, "fraction": 0.0, "frozen_units": 0}]
    train_time = 0.0
    step = 0
    images = 0
    for epoch in range(epochs):
        model.train()
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        bar = tqdm(
            total=min(steps_per_epoch, total_steps - step),
            desc=f"{label} epoch {epoch + 1}/{epochs}",
            disable=not accelerator.is_local_main_process,
            leave=False,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        for batch in train_loader:
            loss = torch.nn.functional.cross_entropy(model(batch["pixel_values"]), batch["labels"])
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            images += batch["labels"].shape[0] * accelerator.num_processes
            if freezer is not None and freezer.schedule.acts_every_step:
                freezer.update(step / total_steps)  # the adaptive schedule checks every --check-every steps
            bar.update(1)
            if step % 5 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", frozen=f"{freezer.fraction if freezer else 0:.0%}")
            if step >= total_steps:
                break
        # The freeze belongs to the epoch that just ended: it is part of the training cost.
        frozen_during_epoch = freezer.frozen_units if freezer is not None else 0
        result = freezer.update(step / total_steps) if freezer is not None else None
        if freezer is not None:  # layer_freeze/fraction, frozen_units, frozen_params, ... to the trackers, if any
            accelerator.log(freezer.metrics(), step=step)
        epoch_time = time.perf_counter() - start
        train_time += epoch_time
        bar.close()
        accuracy = evaluate_accuracy(model, test_loader, accelerator)
        curve.append(
            {
                "epoch": epoch + 1,
                "step": step,
                "train_time_s": train_time,
                "loss": loss.item(),
                "test_accuracy": accuracy,
                "fraction": result.fraction if result else 0.0,
                "frozen_units": result.frozen_units if result else 0,
                "epoch_time_s": epoch_time,
                "epoch_steps": min(steps_per_epoch, step - curve[-1]["step"]),
                "frozen_units_during_epoch": frozen_during_epoch,
            }
        )
        accelerator.print(
            f"[{label}] epoch {epoch + 1}/{epochs}  loss {loss.item():.4f}  test accuracy {accuracy:.2%}  "
            f"frozen {curve[-1]['frozen_units']} units ({curve[-1]['fraction']:.0%})  train time {train_time:.1f}s"
        )

    num_units = freezer.num_units if freezer else None
    summary = {
        "run": label,
        "model": args.model,
        "epochs": epochs,
        "steps": step,
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "train_time_s": train_time,
        "images_per_s": images / train_time if train_time else 0.0,
        "test_accuracy": curve[-1]["test_accuracy"],
        "final_fraction": curve[-1]["fraction"],
        "final_frozen_units": curve[-1]["frozen_units"],
        "num_units": num_units,
        "curve": curve,
    }
    speedup = epoch_speedup(curve)
    if speedup:
        accelerator.print(f"[{label}] {speedup}")
    accelerator.print(
        f"[{label}] done: {step} steps in {train_time:.1f}s ({summary['images_per_s']:.0f} images/s), "
        f"test accuracy {summary['test_accuracy']:.2%}, frozen fraction {summary['final_fraction']:.0%}"
    )
    accelerator.free_memory(model, optimizer, scheduler)
    accelerator._custom_objects.clear()
    return summary


def epoch_speedup(curve: list[dict]) -> str | None:
    """What freezing bought inside one run: step time of the most-frozen epoch against the unfrozen epochs."""
    epochs = [c for c in curve[1:] if c["epoch_steps"] > 0]
    # The first epoch pays one-off costs (allocator warm-up, first metric load); leave it out when possible.
    unfrozen = [c for c in epochs[1:] if c["frozen_units_during_epoch"] == 0] or [
        c for c in epochs if c["frozen_units_during_epoch"] == 0
    ]
    frozen = [c for c in epochs if c["frozen_units_during_epoch"] > 0]
    if not unfrozen or not frozen:
        return None
    per_step = sum(c["epoch_time_s"] for c in unfrozen) / sum(c["epoch_steps"] for c in unfrozen)
    last = frozen[-1]
    last_per_step = last["epoch_time_s"] / last["epoch_steps"]
    ratio = per_step / last_per_step
    if ratio >= 1:
        verdict = f"{ratio:.2f}x faster"
    else:
        # A step bound by kernel launches or data loading (a tiny model on a GPU) gains nothing from skipping
        # weight gradients; freezing then only costs its bookkeeping.
        verdict = (
            f"{1 / ratio:.2f}x slower: this step is not bound by backward compute (a tiny model on a GPU is "
            "launch-bound, a CPU run can be data-bound), so skipping frozen gradients saves nothing here"
        )
    return (
        f"step time with nothing frozen {per_step * 1e3:.0f} ms; in epoch {last['epoch']} with "
        f"{last['frozen_units_during_epoch']} units frozen {last_per_step * 1e3:.0f} ms ({verdict})"
    )


def comparison_table(runs: list[dict]) -> str:
    baseline = next((r for r in runs if r["run"] == "baseline"), None)
    lines = [
        "| run | train wall time (s) | images/s | time saved | test accuracy | final frozen fraction |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        saved = 1 - run["train_time_s"] / baseline["train_time_s"] if baseline else 0.0
        lines.append(
            f"| {run['run']} | {run['train_time_s']:.1f} | {run['images_per_s']:.0f} | {saved:.1%} "
            f"| {run['test_accuracy']:.2%} | {run['final_fraction']:.0%} |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        curve = run["curve"]
        steps = [c["step"] / max(1, run["steps"]) for c in curve]
        left.step(steps, [c["fraction"] for c in curve], where="post", label=run["run"])
        times = [c["train_time_s"] for c in curve[1:]]
        right.plot(times, [c["test_accuracy"] for c in curve[1:]], marker="o", label=run["run"])
    left.set(xlabel="progress through training", ylabel="freeze fraction", title="Units frozen", ylim=(-0.05, 1.05))
    right.set(xlabel="training wall time (s)", ylabel="test accuracy", title="Accuracy against wall time")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    first = runs[0]
    fig.suptitle(f"{first['model']}, {first['processes']} process(es), mixed precision {first['mixed_precision']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        accelerator.print("note: accelerate runs mixed_precision='fp16' on CPU as plain fp32")
    try:
        data = load_image_data(args.dataset, args.data_dir, args.image_size, args.seed)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    accelerator.print(
        f"data: {data.source}: {len(data.train)} train / {len(data.test)} test images, {data.num_classes} classes; "
        f"model {args.model}; {accelerator.num_processes} process(es) on {accelerator.device}, "
        f"{torch.get_num_threads()} threads each"
    )
    plan = [False, True] if args.compare else [not args.no_freeze]
    runs = [train_run(args, accelerator, data, freeze) for freeze in plan]

    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        results = {
            "args": vars(args),
            "machine": {"cpus": os.cpu_count(), "device": str(accelerator.device), "torch": torch.__version__},
            "runs": runs,
        }
        if args.compare:
            results["time_saved"] = 1 - runs[1]["train_time_s"] / runs[0]["train_time_s"]
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        plot(runs, output_dir / "freezing.png")
        if args.compare:
            print()
            print(comparison_table(runs))
        print(f"\nwrote {output_dir / 'results.json'} and {output_dir / 'freezing.png'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
