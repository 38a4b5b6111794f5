"""TRL's `SFTTrainer` with `LayerFreezingCallback`: full fine-tuning and LoRA, with gradient checkpointing on (TRL's
default), re-entrant or not: units freeze on schedule, every tensor that still trains changes at every step (a
re-entrant checkpoint after the frozen prefix must not silently stop training), and the model is handed back with
exactly the trainable set it was given. Offline: a word-level tokenizer trained on Python's own documentation
topics, a tiny Llama built from a config."""

from __future__ import annotations

import re
import warnings

import pytest

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from helpers import FreezeTimeline, StepWatch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from hf_layer_freeze import LayerFreezingCallback  # noqa: E402

MAX_STEPS = 6
# What the SFT and DPO runs share: short, and no weight decay, so a tensor changes only through its gradient
# ("changed" means "trained").
RUN = dict(
    max_steps=MAX_STEPS,
    per_device_train_batch_size=4,
    learning_rate=1e-2,
    weight_decay=0.0,
    use_cpu=True,
    report_to=[],
    logging_steps=1,
    save_strategy="no",
    seed=0,
    disable_tqdm=True,
    max_length=32,
)


def _sentences(count: int = 48) -> list[str]:
    """Short English sentences from the Python language reference shipped with every CPython."""
    from pydoc_data.topics import topics

    sentences = []
    for name in sorted(topics):
        for sentence in re.split(r"(?<=\.)\s+", " ".join(topics[name].split())):
            if 30 <= len(sentence) <= 100 and sentence[0].isupper():
                sentences.append(sentence)
                break
        if len(sentences) == count:
            break
    assert len(sentences) == count
    return sentences


def _tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def _model(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


class CheckpointingSeen(TrainerCallback):
    """What the decoder layers checkpoint with during training: (checkpointing on, use_reentrant)."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if not hasattr(self, "seen"):
            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            function = layers[0]._gradient_checkpointing_func
            keywords = getattr(function, "keywords", None) or {}
            self.seen = (all(layer.gradient_checkpointing for layer in layers), keywords.get("use_reentrant"))


@pytest.mark.parametrize("use_reentrant", [None, True], ids=["default-checkpointing", "reentrant-checkpointing"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_sft_trainer_freezes_on_schedule_and_trains_every_unfrozen_tensor(tmp_path, lora, use_reentrant):
    texts = _sentences()
    tokenizer = _tokenizer(texts)
    model = _model(len(tokenizer))
    args = SFTConfig(
        output_dir=str(tmp_path),
        **RUN,
        activation_checkpointing_kwargs=None if use_reentrant is None else {"use_reentrant": use_reentrant},
    )
    assert args.gradient_checkpointing  # TRL's default, kept
    callback = LayerFreezingCallback(freeze_start=0.0, freeze_every="step")
    watch, timeline, checkpointing = StepWatch(), FreezeTimeline(), CheckpointingSeen()
    # init_lora_weights=False: lora_B starts random, so lora_A has a gradient from the first step
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        peft_config=peft_config if lora else None,
        callbacks=[callback, watch, timeline, checkpointing],
    )
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()

    assert trainer.state.global_step == MAX_STEPS
    # the default is whatever transformers/TRL pass (non-reentrant in transformers 5); both ran checkpointed
    assert checkpointing.seen[0], "gradient checkpointing was not on"
    if use_reentrant is not None:
        assert checkpointing.seen[1] is use_reentrant
    units = callback.freezer.units
    unit_names = {n for u in units for n in u.parameter_names}
    if lora:  # one unit per LoRA layer, nothing else
        tuner_layers = [n for n, m in trainer.model.named_modules() if isinstance(m, BaseTunerLayer)]
        assert [u.name for u in units] == tuner_layers
        assert unit_names == trainable
    else:  # every trainable tensor but the head (the lm_head, tied to the input embedding)
        head = {n for n in trainable if "embed_tokens" in n or "lm_head" in n}
        assert head and unit_names == trainable - head
    # on schedule: after each step the first num_units_at(step) units are frozen (none after the last step)
    counts = [callback.freezer.num_units_at(s / MAX_STEPS) for s in range(1, MAX_STEPS)]
    counts.append(counts[-1])
    frozen = [{n for u in units[:count] for n in u.parameter_names} for count in counts]
    assert timeline.steps == frozen
    assert counts[-1] >= 2 and len(set(counts)) >= 3, counts
    # every tensor that still trains changed at every step, past the frozen prefix too; no frozen one moved
    assert watch.trained_exactly_the_unfrozen(), watch.steps
    # handed back: exactly the trainable set it was given, each in the optimizer once
    named = dict(trainer.model.named_parameters())
    assert {n for n, p in named.items() if p.requires_grad} == trainable
    in_optimizer = [id(p) for group in trainer.optimizer.param_groups for p in group["params"]]
    assert sorted(in_optimizer) == sorted(id(named[n]) for n in trainable)


class GradientWatch(TrainerCallback):
    """At each optimizer step, before it: the trainable tensors (LoRA adapters here) with a gradient, and the frozen
    ones (by the callback's record) that require a gradient or hold one."""

    def __init__(self, callback: LayerFreezingCallback) -> None:
        self.callback = callback
        self.steps: list[tuple[int, int, int]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        frozen = {id(p) for p in self.callback.freezer.record.parameters}
        named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
        trains = [p for _, p in named if id(p) not in frozen]
        self.steps.append(
            (
                sum(p.grad is not None for p in trains),
                len(trains),
                sum(p.requires_grad or p.grad is not None for _, p in named if id(p) in frozen),
            )
        )


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_dpo_with_lora_and_no_ref_model_trains_exactly_the_unfrozen_adapters(tmp_path, checkpointing):
    # DPOTrainer with a PEFT model and ref_model=None computes the reference inside PEFT's disable_adapter(), which
    # sets requires_grad=True on every adapter when it exits, between the policy's forward and its backward
    texts = _sentences()
    tokenizer = _tokenizer(texts)
    model = _model(len(tokenizer))
    rows = [
        {"prompt": t[:20], "chosen": t[20:], "rejected": texts[(i + 1) % len(texts)][20:]} for i, t in enumerate(texts)
    ]
    args = DPOConfig(
        output_dir=str(tmp_path),
        **RUN,
        gradient_checkpointing=checkpointing,
    )
    callback = LayerFreezingCallback(freeze_start=0.0, freeze_every="step")
    watch, grads = StepWatch(), GradientWatch(callback)
    peft_config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[callback, watch, grads],
    )
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert trainer.state.global_step == MAX_STEPS
    assert callback.frozen_units >= 2
    # at every optimizer step: every unfrozen adapter has a gradient, no frozen one requires or holds one
    assert grads.steps and all(with_grad == trains and not bad for with_grad, trains, bad in grads.steps), grads.steps
    assert watch.trained_exactly_the_unfrozen(), watch.steps
    said = [w for w in caught if "disable_adapter" in str(w.message)]
    assert len(said) == 1  # said once, by name
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == trainable  # handed back
