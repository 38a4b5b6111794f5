"""Worker for tests/test_multiprocess.py: `Trainer` + `LayerFreezingCallback` under 2-process DDP (gloo).

Run with `torchrun --nproc_per_node 2`. After every optimizer step it checks that parameters are bitwise identical
on all ranks and counts the gradient elements DDP all-reduced (a comm hook on the wrapper the Trainer made).
With `--resume-from`, resumes from that checkpoint. Writes OUT/rank{N}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import timm  # noqa: F401  (TimmWrapper needs it)
import torch
import torch.distributed as dist
from transformers import (
    TimmWrapperConfig,
    TimmWrapperForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import (  # noqa: E402
    CountingState,
    RandomImages,  # noqa: E402
    counting_allreduce_hook,
    params_digest,
    tensors_digest,
)

from hf_layer_freeze import LayerFreezingCallback  # noqa: E402


def state_digest(trainer) -> str:
    """Weights, buffers and optimizer state, for comparing a resumed run with an uninterrupted one."""
    tensors = list(trainer.model.state_dict().values())
    for entry in trainer.optimizer.state_dict()["state"].values():
        tensors.extend(torch.as_tensor(v) for v in entry.values())
    return tensors_digest(tensors)


class RankCheck(TrainerCallback):
    """Registers the counting hook on the DDP wrapper (found the way a user would) and checks ranks each step."""

    def __init__(self, freezing: LayerFreezingCallback):
        self.freezing = freezing
        self.state = CountingState()
        self.records = []
        self.hooked = False
        self.trainable = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # after this step's backward, before any freeze at its end: what the backward had to all-reduce
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, params_digest(model))
        self.records.append(
            {
                "step": state.global_step,
                "identical": len(set(digests)) == 1,
                "allreduced": self.state.elements if self.hooked else None,
                "frozen_units": self.freezing.frozen_units,
                "trainable": self.trainable,
            }
        )
        self.state.elements = 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--find-unused-parameters", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--freeze-every", default="step")
    parser.add_argument("--max-steps", type=int, default=12)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume-from")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--order", default="definition")
    parser.add_argument("--budget", default="units")
    parser.add_argument("--schedule", default="linear")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = TimmWrapperForImageClassification(TimmWrapperConfig(architecture="resnet10t", num_labels=10))
    # adaptive: a change_threshold no change reaches forces the decision on any CPU (freeze up to freeze_level at the
    # first check after freeze_start), and freeze_level 0.5 leaves units to track and to compare between ranks
    adaptive = dict(check_every=2, change_threshold=1e30) if args.schedule == "adaptive" else {}
    freezing = LayerFreezingCallback(
        freeze_start=0.2,
        freeze_level=0.5 if args.schedule == "adaptive" else 1.0,
        freeze_every=args.freeze_every,
        order=args.order,
        budget=args.budget,
        schedule=args.schedule,
        **adaptive,
    )
    check = RankCheck(freezing)
    training_args = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=1e-3,
        weight_decay=0.05,
        use_cpu=True,
        bf16=args.bf16,
        report_to=[],
        logging_steps=1,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        ddp_find_unused_parameters=args.find_unused_parameters,
        ddp_backend="gloo",
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=RandomImages(args.samples), callbacks=[freezing, check]
    )

    class HookOnFirstStep(TrainerCallback):
        """A user's comm hook, registered on the DDP wrapper the Trainer made; it must survive reducer rebuilds."""

        def on_step_begin(self, args_, state, control, **kwargs):
            ddp = trainer.model_wrapped
            if not check.hooked and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
                ddp.register_comm_hook(check.state, counting_allreduce_hook)
                check.hooked = True

    trainer.add_callback(HookOnFirstStep())
    trainer.train(resume_from_checkpoint=args.resume_from)

    rank = dist.get_rank()
    out = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "records": check.records,
        "final_frozen_units": freezing.frozen_units,
        "num_units": freezing.freezer.num_units,
        "ddp_found": freezing.freezer.ddp_model is trainer.model_wrapped,
        "digest": params_digest(trainer.model),
        "state_digest": state_digest(trainer),
        "trainable": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
