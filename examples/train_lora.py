#!/usr/bin/env python
"""LoRA fine-tuning of a small Llama-style language model with `transformers.Trainer` and PEFT, with and without
`LayerFreezingCallback`.

    python examples/train_lora.py                       # pretrain (cached), then LoRA without and with freezing
    accelerate launch examples/train_lora.py            # the same through Accelerate's launcher
    python examples/train_lora.py --no-compare          # only the run with freezing
    python examples/train_lora.py --pretrain-steps 5 --max-steps 8 --hidden-size 32 --num-layers 2   # smoke run

The text is Python's own documentation (`pydoc_data.topics`, shipped with every Python; see `text_data.py`), split
by topic: a model built from a `LlamaConfig` is first pretrained in full on most topics (LoRA on a random model
would teach nothing; the result is cached in `--output-dir`, keyed by its settings, so a rerun reuses it), then
fine-tuned with LoRA adapters on the other topics, twice with the same seed: without freezing, then with
`LayerFreezingCallback()`, which freezes the adapters progressively, first layer first. Evaluation is on the held-out
end of the fine-tuning topics. The script prints, and writes to `results.json`, for both runs: training wall time,
steps/s over the whole run and over the steps during which units were frozen, evaluation loss and perplexity, and
the units frozen at the end. No network is needed.

Freezing saves the weight gradients and the optimizer update of the frozen adapters, and the backward pass below
the first layer that still trains. Whether that shows in wall time depends on the model and machine: the table
says "slower" when it did not.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import datasets
import torch
from arguments import HelpFormatter, check_freezing, check_positive
from peft import LoraConfig, get_peft_model
from text_data import TopicSplit, build_tokenizer, load_topics, split_topics, token_blocks
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.utils import logging as transformers_logging

from hf_layer_freeze import LayerFreezingCallback

LLAMA_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    model = parser.add_argument_group("model (built from a LlamaConfig, random weights, then pretrained here)")
    model.add_argument("--hidden-size", type=int, default=128, help="width of the residual stream")
    model.add_argument("--num-layers", type=int, default=4, help="decoder layers")
    model.add_argument("--num-heads", type=int, default=4, help="attention heads; must divide --hidden-size")
    model.add_argument("--intermediate-size", type=int, default=256, help="width of the MLP")
    model.add_argument("--block-size", type=int, default=128, help="tokens per training example")
    model.add_argument(
        "--vocab-size", type=int, default=2048, help="size of the byte-level BPE vocabulary trained on the text"
    )
    model.add_argument("--pretrain-steps", type=int, default=400, help="full-model steps on the pretraining topics")
    model.add_argument("--pretrain-lr", type=float, default=3e-3, help="peak learning rate of the pretraining")
    lora = parser.add_argument_group("LoRA fine-tuning")
    lora.add_argument("--epochs", type=float, default=3, help="fine-tuning epochs")
    lora.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when positive (smoke runs)")
    lora.add_argument(
        "--batch-size", type=int, default=16, help="examples per step and process, in pretraining and fine-tuning"
    )
    lora.add_argument("--lr", type=float, default=5e-3, help="peak learning rate of the LoRA fine-tuning")
    lora.add_argument("--seed", type=int, default=0, help="data split, pretraining, LoRA initialization, batches")
    lora.add_argument("--lora-r", type=int, default=8, help="rank of the LoRA adapters")
    lora.add_argument(
        "--target-modules", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"], metavar="NAME",
        help=f"the linear layers that get adapters, among {', '.join(LLAMA_LINEAR_LAYERS)}",
    )  # fmt: skip
    lora.add_argument("--use-cpu", action="store_true", help="train on CPU even when a GPU is there")
    freezing = parser.add_argument_group("freezing (LayerFreezingCallback's options)")
    freezing.add_argument("--freeze-start", type=float, default=0.5, help="fraction of training, in [0, 1)")
    freezing.add_argument("--freeze-level", type=float, default=1.0, help="fraction frozen at the end, in [0, 1]")
    freezing.add_argument("--no-compare", action="store_true", help="only the run with freezing, no baseline")
    parser.add_argument("--output-dir", default="outputs/train_lora", help="results.json and the pretrained model")
    args = parser.parse_args(argv)
    sizes = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "block_size", "pretrain_steps")
    check_positive(parser, args, (*sizes, "pretrain_lr", "epochs", "batch_size", "lr", "lora_r"))
    if args.max_steps == 0 or args.max_steps < -1:
        parser.error(f"--max-steps must be positive (or -1 to train --epochs), got {args.max_steps}")
    if args.hidden_size % args.num_heads:
        parser.error(f"--num-heads must divide --hidden-size {args.hidden_size}, got {args.num_heads}")
    if args.vocab_size <= 258:
        parser.error(f"--vocab-size must be > 258 (256 bytes and 2 special tokens), got {args.vocab_size}")
    unknown = [name for name in args.target_modules if name not in LLAMA_LINEAR_LAYERS]
    if unknown:
        parser.error(f"--target-modules must be among {', '.join(LLAMA_LINEAR_LAYERS)}, got {' '.join(unknown)}")
    check_freezing(parser, args)
    return args


class StepTimes(TrainerCallback):
    """
    The duration of each optimizer step (forward, backward, optimizer update and the freezing callback's work at
    that step; data loading excluded) and how many units were frozen while it ran.
    """

    def __init__(self, freezing: LayerFreezingCallback | None = None) -> None:
        self.freezing = freezing
        self.seconds: list[float] = []
        self.frozen_units: list[int] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self.frozen_units.append(self.freezing.frozen_units if self.freezing is not None else 0)
        _synchronize(args.device)
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        # The freezing callback puts itself first among the callbacks: a freeze made at this step is timed here.
        _synchronize(args.device)
        self.seconds.append(time.perf_counter() - self._start)


def _synchronize(device: torch.device) -> None:
    """A GPU runs ahead of Python: wait for it, so that the clock measures its work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_arguments(args: argparse.Namespace, **overrides) -> TrainingArguments:
    """What every Trainer here shares: no checkpoints, no reporting, no progress bar; logs printed as they come."""
    settings = {
        "output_dir": args.output_dir,  # nothing is written there: save_strategy="no"
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": 2 * args.batch_size,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.1,
        "weight_decay": 0.0,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": not args.use_cpu and torch.cuda.is_available(),
        "use_cpu": args.use_cpu,
        "seed": args.seed,
        **overrides,
    }
    return TrainingArguments(**settings)


def llama_config(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        intermediate_size=args.intermediate_size,
        max_position_embeddings=args.block_size,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )


def pretrained_folder(args: argparse.Namespace) -> Path:
    """Where the pretrained model of these settings is cached: a name that says what it is, and a hash of all."""
    settings = {
        name: getattr(args, name)
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "block_size", "vocab_size",
                     "pretrain_steps", "pretrain_lr", "batch_size", "seed")
    }  # fmt: skip
    settings["python"] = f"{sys.version_info.major}.{sys.version_info.minor}"  # pydoc_data's text follows it
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    name = f"pretrained-h{args.hidden_size}-l{args.num_layers}-seed{args.seed}-steps{args.pretrain_steps}-{key}"
    return Path(args.output_dir) / name


def pretrain(args: argparse.Namespace, split: TopicSplit, folder: Path) -> dict:
    """Train the whole model on the pretraining topics and save it, with its tokenizer, to `folder`."""
    set_seed(args.seed)
    tokenizer = build_tokenizer(split.pretrain.values(), vocab_size=args.vocab_size)
    model = LlamaForCausalLM(llama_config(args, tokenizer))
    trainer = Trainer(
        model=model,
        args=training_arguments(
            args,
            max_steps=args.pretrain_steps,
            learning_rate=args.pretrain_lr,
            logging_steps=max(1, args.pretrain_steps // 10),
        ),
        train_dataset=token_blocks(split.pretrain.values(), tokenizer, args.block_size),
        data_collator=default_data_collator,
    )
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    info = {
        "steps": trainer.state.global_step,
        "train_time_s": seconds,
        "first_logged_loss": losses[0] if losses else None,
        "last_logged_loss": losses[-1] if losses else None,
        "mean_loss": output.training_loss,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    trainer.save_model(str(folder))  # on the main process only
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(folder)
        (folder / "pretrain.json").write_text(json.dumps(info, indent=2))  # written last: marks a complete cache
    trainer.accelerator.wait_for_everyone()
    return info


def finetune(
    args: argparse.Namespace, folder: Path, train_set: datasets.Dataset, eval_set: datasets.Dataset, freeze: bool
) -> dict:
    """One LoRA fine-tuning of the pretrained model; returns its measurements."""
    label = "freeze" if freeze else "baseline"
    model = LlamaForCausalLM.from_pretrained(folder)
    set_seed(args.seed)  # the same adapters' initialization in both runs
    lora = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, target_modules=list(args.target_modules))
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    callbacks: list[TrainerCallback] = []
    freezing = None
    if freeze:
        freezing = LayerFreezingCallback(freeze_start=args.freeze_start, freeze_level=args.freeze_level)
        callbacks.append(freezing)
    step_times = StepTimes(freezing)
    callbacks.append(step_times)
    trainer = Trainer(
        model=model,
        args=training_arguments(
            args,
            num_train_epochs=args.epochs,
            max_steps=args.max_steps,
            learning_rate=args.lr,
            logging_steps=10,
        ),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=default_data_collator,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    eval_loss = trainer.evaluate()["eval_loss"]
    steps = trainer.state.global_step
    return {
        "run": label,
        "steps": steps,
        "epochs": trainer.state.epoch,
        "train_time_s": seconds,
        "steps_per_s": steps / seconds,
        "eval_loss": eval_loss,
        "perplexity": math.exp(eval_loss),
        "trainable_params": trainable,
        "frozen_units": freezing.frozen_units if freezing else 0,
        "num_units": freezing.freezer.num_units if freezing else None,
        "step_times_s": step_times.seconds,
        "frozen_units_per_step": step_times.frozen_units,
    }


def evaluate_pretrained(args: argparse.Namespace, folder: Path, eval_set: datasets.Dataset) -> float:
    """The evaluation loss of the pretrained model, before any fine-tuning: what fine-tuning starts from."""
    trainer = Trainer(
        model=LlamaForCausalLM.from_pretrained(folder),
        args=training_arguments(args),
        eval_dataset=eval_set,
        data_collator=default_data_collator,
    )
    return trainer.evaluate()["eval_loss"]


def frozen_part(runs: list[dict]) -> list[int]:
    """The steps (0-based) during which the freezing run had units frozen."""
    freeze = next(run for run in runs if run["run"] == "freeze")
    return [i for i, units in enumerate(freeze["frozen_units_per_step"]) if units > 0]


def steps_per_s(run: dict, steps: list[int]) -> float | None:
    seconds = sum(run["step_times_s"][i] for i in steps if i < len(run["step_times_s"]))
    return len(steps) / seconds if steps and seconds else None


def report(runs: list[dict], frozen_steps: list[int], eval_loss_before: float) -> str:
    """The comparison as a Markdown table, and a sentence on time saved or lost."""
    if frozen_steps:
        part = f"steps/s while units frozen (steps {frozen_steps[0] + 1}-{frozen_steps[-1] + 1})"
    else:
        part = "steps/s while units frozen (none were)"
    lines = [
        f"| run | train wall time (s) | steps/s | {part} | eval loss | perplexity | units frozen at the end |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        frozen_rate = run["frozen_part_steps_per_s"]
        units = f"{run['frozen_units']}/{run['num_units']}" if run["num_units"] is not None else "0"
        lines.append(
            f"| {run['run']} | {run['train_time_s']:.1f} | {run['steps_per_s']:.2f} | "
            f"{'-' if frozen_rate is None else f'{frozen_rate:.2f}'} | {run['eval_loss']:.4f} | "
            f"{run['perplexity']:.2f} | {units} |"
        )
    lines.append(
        f"| pretrained model, before fine-tuning | | | | {eval_loss_before:.4f} | {math.exp(eval_loss_before):.2f} | |"
    )
    if len(runs) == 2:
        baseline, freeze = runs
        change = freeze["train_time_s"] / baseline["train_time_s"] - 1
        verdict = f"{-change:.1%} less" if change <= 0 else f"{change:.1%} MORE (a slowdown)"
        lines.append(f"\nThe run with freezing took {verdict} training wall time than the baseline.")
        if baseline["frozen_part_steps_per_s"] and freeze["frozen_part_steps_per_s"]:
            lines.append(f"Over the steps with units frozen, its steps ran {_faster(freeze, baseline, 'frozen')}.")
        if baseline["unfrozen_part_steps_per_s"] and freeze["unfrozen_part_steps_per_s"]:
            lines.append(
                f"Over the steps before that, where both runs do the same work, its steps ran "
                f"{_faster(freeze, baseline, 'unfrozen')}: that much of a difference is this machine's noise."
            )
    return "\n".join(lines)


def _faster(run: dict, baseline: dict, part: str) -> str:
    """'1.50x as fast as the baseline' or '1.20x slower than the baseline', over one part of the steps."""
    ratio = run[f"{part}_part_steps_per_s"] / baseline[f"{part}_part_steps_per_s"]
    return f"{ratio:.2f}x as fast as the baseline's" if ratio >= 1 else f"{1 / ratio:.2f}x slower than the baseline's"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()  # "Loading weights" bars; the Trainer's own bar is off too
    main_process = int(os.environ.get("RANK", "0")) == 0
    output_dir = Path(args.output_dir)
    split = split_topics(load_topics(), seed=args.seed)
    folder = pretrained_folder(args)
    if (folder / "pretrain.json").is_file():
        pretraining = json.loads((folder / "pretrain.json").read_text())
        pretraining["cached"] = True
    else:
        pretraining = {**pretrain(args, split, folder), "cached": False}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    try:
        train_set = token_blocks(split.finetune_train.values(), tokenizer, args.block_size)
        eval_set = token_blocks(split.finetune_eval.values(), tokenizer, args.block_size)
    except ValueError as error:
        raise SystemExit(f"--block-size: {error}") from error
    if main_process:
        print(
            f"pretraining ({'cached in' if pretraining['cached'] else 'saved to'} {folder}): "
            f"{pretraining['parameters']:,} parameters, {pretraining['steps']} steps in "
            f"{pretraining['train_time_s']:.1f}s, loss {pretraining['first_logged_loss']:.3f} -> "
            f"{pretraining['last_logged_loss']:.3f}"
        )
        print(
            f"fine-tuning: {len(split.finetune_train)} topics held out of pretraining, {len(train_set)} training "
            f"blocks of {args.block_size} tokens, {len(eval_set)} evaluation blocks (the held-out end of those topics)"
        )

    eval_loss_before = evaluate_pretrained(args, folder, eval_set)
    plan = [True] if args.no_compare else [False, True]
    runs = [finetune(args, folder, train_set, eval_set, freeze) for freeze in plan]
    frozen_steps = frozen_part(runs)
    for run in runs:
        run["frozen_part_steps_per_s"] = steps_per_s(run, frozen_steps)
        unfrozen = sorted(set(range(len(run["step_times_s"]))) - set(frozen_steps))
        run["unfrozen_part_steps_per_s"] = steps_per_s(run, unfrozen)

    if main_process:
        results = {
            "args": vars(args),
            "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__},
            "pretraining": pretraining,
            "eval_loss_before_finetuning": eval_loss_before,
            "frozen_part_steps": [i + 1 for i in frozen_steps],
            "runs": runs,
        }
        if len(runs) == 2:
            results["time_saved"] = 1 - runs[1]["train_time_s"] / runs[0]["train_time_s"]
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "results.json").write_text(json.dumps(results, indent=2))
        print()
        print(report(runs, frozen_steps, eval_loss_before))
        print(f"\nwrote {output_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
