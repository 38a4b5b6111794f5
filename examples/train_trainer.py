#!/usr/bin/env python
"""Train a timm model through `transformers.Trainer`, with `LayerFreezingCallback`.

    python examples/train_trainer.py                     # embedded digits, 12 epochs, eval + checkpoint each epoch
    python examples/train_trainer.py --resume            # continue from the last checkpoint in --output-dir
    torchrun --nproc_per_node 2 examples/train_trainer.py --use-cpu

The model is `TimmWrapperForImageClassification` built from a `TimmWrapperConfig` (no Hub access); freezing is
one line: `callbacks=[LayerFreezingCallback(...)]`.
"""

from __future__ import annotations

import argparse
import sys

import evaluate
import numpy as np
import torch
from arguments import HelpFormatter, check_freezing, check_model_name, check_positive
from image_data import METRIC_PATH, collate, load_image_data
from transformers import (
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_layer_freeze import LayerFreezingCallback


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dataset", help="a Hugging Face image-classification dataset (needs internet)")
    parser.add_argument("--data-dir", help="an imagefolder tree")
    parser.add_argument("--image-size", type=int, default=32, help="side of the square input images")
    parser.add_argument("--max-train-samples", type=int, help="use only this many training images (smoke tests)")
    parser.add_argument("--max-eval-samples", type=int, help="use only this many test images (smoke tests)")
    parser.add_argument("--model", default="resnet10t", help="a timm architecture name")
    parser.add_argument("--epochs", type=float, default=12, help="passes over the training images")
    parser.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when positive")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine schedule)")
    parser.add_argument("--seed", type=int, default=0, help="initialization and batch order")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision")
    parser.add_argument("--use-cpu", action="store_true", help="train on CPU even when a GPU is there")
    parser.add_argument("--freeze-start", type=float, default=0.5, help="fraction of training, in [0, 1)")
    parser.add_argument("--freeze-level", type=float, default=1.0, help="fraction frozen at the end, in [0, 1]")
    parser.add_argument(
        "--freeze-every",
        default="auto",
        choices=["auto", "epoch", "step"],
        help="freeze at epoch ends, at any step where the schedule adds a unit, or 'auto': by epoch when at least 4 "
        "epoch ends fall after --freeze-start, by step otherwise",
    )
    parser.add_argument("--no-freeze", action="store_true", help="train without freezing (the baseline)")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    parser.add_argument("--output-dir", default="outputs/train_trainer", help="checkpoints, one per epoch")
    args = parser.parse_args(argv)
    check_positive(parser, args, ("epochs", "batch_size", "image_size", "max_train_samples", "max_eval_samples", "lr"))
    if args.max_steps == 0 or args.max_steps < -1:
        parser.error(f"--max-steps must be positive (or -1 to train --epochs), got {args.max_steps}")
    check_freezing(parser, args)
    check_model_name(parser, args.model)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    set_seed(args.seed)
    try:
        data = load_image_data(args.dataset, args.data_dir, args.image_size, args.seed)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    train_set, test_set = data.train, data.test
    if args.max_train_samples:
        train_set = train_set.select(range(min(args.max_train_samples, len(train_set))))
    if args.max_eval_samples:
        test_set = test_set.select(range(min(args.max_eval_samples, len(test_set))))

    config = TimmWrapperConfig(architecture=args.model, num_labels=data.num_classes, do_pooling=True)
    model = TimmWrapperForImageClassification(config)

    metric = evaluate.load(METRIC_PATH)

    def compute_metrics(eval_prediction):
        logits, labels = eval_prediction
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=labels)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=args.lr,
        weight_decay=0.05,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=2,
        logging_steps=10,
        seed=args.seed,
        bf16=args.bf16,
        use_cpu=args.use_cpu,
        report_to="none",
        remove_unused_columns=False,
        dataloader_pin_memory=not args.use_cpu and torch.cuda.is_available(),
    )
    callbacks = []
    if not args.no_freeze:
        callbacks.append(
            LayerFreezingCallback(
                freeze_start=args.freeze_start, freeze_level=args.freeze_level, freeze_every=args.freeze_every
            )
        )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=test_set,
        data_collator=collate,
        compute_metrics=compute_metrics,
        callbacks=callbacks,
    )
    checkpoint = None
    if args.resume:
        checkpoint = get_last_checkpoint(args.output_dir)
        if checkpoint is None:
            raise SystemExit(f"--resume: no checkpoint-* folder in {args.output_dir}")
    trainer.train(resume_from_checkpoint=checkpoint)
    metrics = trainer.evaluate()
    if trainer.is_world_process_zero():
        frozen = callbacks[0].frozen_units if callbacks else 0
        total = callbacks[0].freezer.num_units if callbacks else 0
        print(f"final test accuracy {metrics['eval_accuracy']:.2%}; frozen units {frozen}/{total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
