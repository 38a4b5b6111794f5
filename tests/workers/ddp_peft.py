"""Worker for tests/test_peft.py: a LoRA causal LM trained by the `Trainer` with `LayerFreezingCallback` under
2-process DDP (gloo, CPU).

Run with `torchrun --nproc_per_node 2`. After every optimizer step it records, on every rank: whether every parameter
(PEFT's frozen base weights included) is bitwise identical on all ranks, whether every parameter frozen so far is
bitwise unchanged since it froze, whether every tensor that trained during the step changed, and the gradient
elements DDP all-reduced (a comm hook on the wrapper the Trainer made) against the elements that trained. Writes
OUT/rank{N}.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import (  # noqa: E402
    CountingState,
    RandomTokenDataset,
    counting_allreduce_hook,
    params_digest,
)

from hf_layer_freeze import LayerFreezingCallback  # noqa: E402


class RankCheck(TrainerCallback):
    def __init__(self, freezing: LayerFreezingCallback):
        self.freezing = freezing
        self.state = CountingState()
        self.records = []
        self.hooked = False
        self.frozen_values: dict[str, torch.Tensor] = {}  # each frozen parameter as it was when it froze

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # PEFT's frozen base weights: unchanged from the start
        self.frozen_values = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # after this step's backward, before any freeze at its end: what the backward had to all-reduce
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, params_digest(model))
        unchanged = all(torch.equal(params[n], value) for n, value in self.frozen_values.items())
        trained = all(not torch.equal(params[n], value) for n, value in self.before.items())
        for name in self.freezing.freezer.record.names:
            self.frozen_values.setdefault(name, params[name].detach().clone())
        self.records.append(
            {
                "step": state.global_step,
                "identical": len(set(digests)) == 1,
                "frozen_unchanged": unchanged,
                "trained_unfrozen": trained,
                "allreduced": self.state.elements if self.hooked else None,
                "trainable": self.trainable,
                "frozen_units": self.freezing.frozen_units,
            }
        )
        self.state.elements = 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(
            task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        ),
    )
    trainable_before = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    freezing = LayerFreezingCallback(freeze_start=0.2, freeze_every="step")
    check = RankCheck(freezing)
    training_args = TrainingArguments(
        output_dir=os.path.join(args.out, "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.0,
        use_cpu=True,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        ddp_backend="gloo",
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=RandomTokenDataset(64, causal=True),
        callbacks=[freezing, check],
    )

    class HookOnFirstStep(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            ddp = trainer.model_wrapped
            if not check.hooked and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
                ddp.register_comm_hook(check.state, counting_allreduce_hook)
                check.hooked = True

    trainer.add_callback(HookOnFirstStep())
    trainer.train()

    rank = dist.get_rank()
    out = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "max_steps": args.max_steps,
        "records": check.records,
        "ddp_found": freezing.freezer.ddp_model is trainer.model_wrapped,
        "digest": params_digest(trainer.model),
        "handed_back": sorted(n for n, p in model.named_parameters() if p.requires_grad) == trainable_before,
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
