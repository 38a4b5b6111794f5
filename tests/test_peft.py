"""Fine-tuning with PEFT under the `Trainer`: LoRA (and IA3) adapters are the units, the `modules_to_save` head trains
to the end, PEFT's frozen base weights are nobody's, and the model is handed back as it was given.

Ground truth is read from the model, never from the freezer's own account: the PEFT-trainable parameters and tuner
layers before training, `requires_grad` and the values of every parameter after every step, the optimizer's groups.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

peft = pytest.importorskip("peft")

import torch  # noqa: E402
import transformers as tf  # noqa: E402
from helpers import FreezeTimeline, RandomImages, RandomTokenDataset, StepWatch, free_port  # noqa: E402
from peft import IA3Config, LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402
from test_callback import _args as callback_args  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from hf_layer_freeze import LayerFreezer, LayerFreezingCallback  # noqa: E402

TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
MAX_STEPS = 10

# name: what a user fine-tunes. init_lora_weights=False: lora_B starts random, so lora_A gets a gradient from the
# first step and "every trainable tensor changes at every step" holds from step 1 (with PEFT's default B = 0, A's
# first gradient is exactly 0).
MODELS = ["roberta-seq-cls-lora", "llama-tied-lora", "llama-untied-lora", "vit-lora", "llama-ia3"]


def _peft_model(name: str, num_layers: int = 2, adapter_seed: int = 0) -> torch.nn.Module:
    """A tiny model (base weights from seed 0) with PEFT adapters initialized from `adapter_seed`."""
    torch.manual_seed(0)
    if name == "roberta-seq-cls-lora":
        config = tf.RobertaConfig(**TEXT, num_labels=3, max_position_embeddings=40)
        base = tf.RobertaForSequenceClassification(config)
        peft_config = LoraConfig(task_type="SEQ_CLS", r=4, init_lora_weights=False)  # classifier in modules_to_save
    elif name == "vit-lora":
        vit = dict(TEXT, num_hidden_layers=num_layers, image_size=32, patch_size=8, num_labels=10)
        vit.pop("vocab_size")
        base = tf.ViTForImageClassification(tf.ViTConfig(**vit))
        # the query and value projections (named q_proj / v_proj in transformers 5)
        peft_config = LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"], init_lora_weights=False
        )
    else:
        tied = name != "llama-untied-lora"
        config = tf.LlamaConfig(
            **dict(TEXT, num_hidden_layers=num_layers), num_key_value_heads=2, tie_word_embeddings=tied
        )
        base = tf.LlamaForCausalLM(config)
        if name == "llama-ia3":
            peft_config = IA3Config(
                task_type="CAUSAL_LM",
                target_modules=["k_proj", "v_proj", "down_proj"],
                feedforward_modules=["down_proj"],
            )
        else:
            peft_config = LoraConfig(
                task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
            )
    torch.manual_seed(adapter_seed)
    return get_peft_model(base, peft_config)


def _dataset(name: str) -> torch.utils.data.Dataset:
    if name == "vit-lora":
        return RandomImages(40)
    return RandomTokenDataset(40, causal=name.startswith("llama"))


def _args(output_dir: Path, **overrides) -> TrainingArguments:
    # test_callback's arguments, for short runs where a tensor changes only through its gradient (no weight decay):
    # "changed" means "trained"
    settings = dict(max_steps=MAX_STEPS, per_device_train_batch_size=4, learning_rate=1e-2, weight_decay=0.0)
    return callback_args(output_dir, **{**settings, "logging_steps": 1, **overrides})


def _tuner_layers(model: torch.nn.Module) -> dict[str, list[str]]:
    """PEFT's own account: each tuner layer (LoRA / IA3 layer) with trainable parameters -> their names, in module
    order."""
    layers = {}
    for module_name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            names = [f"{module_name}.{n}" for n, p in module.named_parameters() if p.requires_grad]
            if names:
                layers[module_name] = names
    return layers


def _optimizer_ids(trainer: Trainer) -> list[int]:
    return [id(p) for group in trainer.optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("name", MODELS)
def test_peft_adapters_are_the_units_and_freeze_on_schedule_while_the_head_trains(tmp_path, name):
    model = _peft_model(name)
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    trainable_numel = sum(named[n].numel() for n in trainable)
    head = {n for n in trainable if ".modules_to_save." in n}  # PEFT's trainable copy of the classifier
    assert bool(head) == (name in ("roberta-seq-cls-lora", "vit-lora"))
    tuner_layers = _tuner_layers(model)

    callback = LayerFreezingCallback(freeze_start=0.2, freeze_every="step")
    watch, timeline = StepWatch(), FreezeTimeline()
    trainer = Trainer(
        model=model, args=_args(tmp_path), train_dataset=_dataset(name), callbacks=[callback, watch, timeline]
    )
    trainer.train()

    # (i) units: exactly the PEFT-trainable modules minus the head, one per tuner layer (a LoRA layer's A and B
    # together), in module order; the modules_to_save copy is in none
    units = callback.freezer.units
    assert {u.name: list(u.parameter_names) for u in units} == tuner_layers
    assert [u.name for u in units] == list(tuner_layers)
    assert {n for u in units for n in u.parameter_names} == trainable - head

    # the schedule: after each step the frozen parameters are exactly those of the first num_units_at(step) units
    # (none after the last step), the earliest first
    assert len(timeline.steps) == MAX_STEPS
    counts = [callback.freezer.num_units_at(s / MAX_STEPS) for s in range(1, MAX_STEPS)]
    counts.append(counts[-1])
    for step, (frozen, count) in enumerate(zip(timeline.steps, counts, strict=True), start=1):
        assert frozen == {n for u in units[:count] for n in u.parameter_names}, step
    assert counts[0] == 0 and counts[-1] >= 2, counts  # starts after freeze_start, several units frozen by the end
    assert not timeline.unfrozen_at_begin  # no PEFT base weight ever required a gradient

    # (ii) every still-trainable tensor (the head included, never frozen) changed at every step; no frozen one did
    assert watch.trained_exactly_the_unfrozen(), watch.steps
    assert not head & set().union(*timeline.steps)

    # (iii) the metrics count what the freezer froze, nothing of PEFT's base weights: 0 before freeze_start
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in logs] == list(range(1, MAX_STEPS + 1))
    assert (logs[0]["layer_freeze/frozen_units"], logs[0]["layer_freeze/frozen_params"]) == (0, 0)
    for log in logs:
        frozen = timeline.steps[log["step"] - 1]
        units_frozen = sum(set(u.parameter_names) <= frozen for u in units)
        assert log["layer_freeze/frozen_units"] == units_frozen, log
        assert log["layer_freeze/frozen_params"] == sum(named[n].numel() for n in frozen) < trainable_numel, log

    # (iv) handed back: the trainable set is the one given, each trainable parameter in the optimizer exactly once
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    in_optimizer = _optimizer_ids(trainer)
    assert sorted(in_optimizer) == sorted(id(named[n]) for n in trainable)


@pytest.mark.parametrize("name", MODELS)
def test_keep_frozen_leaves_exactly_what_the_freezer_froze_and_peft_base_weights_alone(tmp_path, name):
    model = _peft_model(name)
    frozen_before = {n for n, p in model.named_parameters() if not p.requires_grad}
    tuner_layers = list(_tuner_layers(model).values())  # the units, earliest first
    callback = LayerFreezingCallback(freeze_start=0.0, freeze_every="step", keep_frozen=True)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(name), callbacks=[callback])
    trainer.train()
    frozen_after = {n for n, p in model.named_parameters() if not p.requires_grad}
    record = set(callback.freezer.record.names)
    expected = {n for names in tuner_layers[: callback.frozen_units] for n in names}
    assert callback.frozen_units > 0 and record == expected
    assert not record & frozen_before  # no base weight is the freezer's
    assert frozen_after == frozen_before | record  # no base weight changed requires_grad, nothing else frozen
    # the optimizer holds exactly what still trains, once each
    named = dict(model.named_parameters())
    assert sorted(_optimizer_ids(trainer)) == sorted(id(p) for p in named.values() if p.requires_grad)


def _layer_of(name: str) -> str:
    return name.split(".layers.")[1].split(".")[0]


@pytest.mark.parametrize("granularity", ["module", "block"])
def test_granularity_freezes_an_adapter_or_a_whole_layer_at_once(tmp_path, granularity):
    """`module`: lora_A and lora_B of one adapter flip at the same step; `block`: every adapter of a decoder layer
    flips at the same step. Read from requires_grad after every step."""
    model = _peft_model("llama-tied-lora", num_layers=3)
    tuner_layers = _tuner_layers(model)
    callback = LayerFreezingCallback(freeze_start=0.0, freeze_every="step", granularity=granularity)
    watch, timeline = StepWatch(), FreezeTimeline()
    trainer = Trainer(
        model=model,
        args=_args(tmp_path),
        train_dataset=_dataset("llama-tied-lora"),
        callbacks=[callback, watch, timeline],
    )
    trainer.train()
    groups: dict[str, list[str]] = {}  # what must flip together
    for tuner, names in tuner_layers.items():
        groups.setdefault(tuner if granularity == "module" else _layer_of(tuner), []).extend(names)
    if granularity == "block":
        assert sorted(groups) == ["0", "1", "2"]
        assert [u.name.rpartition(".")[2] for u in callback.freezer.units] == ["0", "1", "2"]
    for step, frozen in enumerate(timeline.steps, start=1):
        half = [g for g, names in groups.items() if 0 < len(frozen & set(names)) < len(names)]
        assert not half, f"step {step}: {granularity} units half frozen: {half}"
    first_frozen = {g: timeline.first_frozen_step(names[0]) for g, names in groups.items()}
    # freezing was progressive: several groups froze, at different steps, earliest layer first
    frozen_steps = [s for s in first_frozen.values() if s is not None]
    assert len(set(frozen_steps)) >= 2, first_frozen
    assert frozen_steps == sorted(frozen_steps), first_frozen
    assert watch.trained_exactly_the_unfrozen(), watch.steps


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_vit_lora_with_gradient_checkpointing_trains_every_unfrozen_adapter_at_every_step(tmp_path, use_reentrant):
    """An image model's input never requires a gradient and PEFT froze the embeddings, so a re-entrant checkpoint
    of a ViT layer gets no input that requires one: without help its adapters (and, once a layer is frozen, those of
    every later layer) silently stop training. The Trainer enables checkpointing itself."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = _peft_model("vit-lora")
    callback = LayerFreezingCallback(freeze_start=0.0, freeze_every="step")
    watch, timeline = StepWatch(), FreezeTimeline()
    args = _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    trainer = Trainer(
        model=model, args=args, train_dataset=_dataset("vit-lora"), callbacks=[callback, watch, timeline]
    )
    trainer.train()
    layers = [m for n, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer) and "layers." in n]
    assert layers and all(layer.gradient_checkpointing for layer in layers)
    assert watch.trained_exactly_the_unfrozen(), watch.steps
    # both layers' adapters froze in turn, and the ones after them kept training meanwhile
    assert len(set(timeline.steps)) >= 3 and 0 < callback.frozen_units < callback.freezer.num_units


def _train_state(trainer: Trainer) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    saved = trainer.optimizer.state_dict()
    for index, entry in saved["state"].items():
        for key, value in entry.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).clone()
    return tensors, saved["param_groups"]


def test_lora_resume_mid_freeze_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    name = "llama-tied-lora"
    overrides = dict(save_strategy="steps", save_steps=5)
    kwargs = dict(freeze_start=0.2, freeze_every="step")
    full_callback = LayerFreezingCallback(**kwargs)
    full = Trainer(
        model=_peft_model(name),
        args=_args(tmp_path / "full", **overrides),
        train_dataset=_dataset(name),
        callbacks=[full_callback],
    )
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-5"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    frozen_at_checkpoint = saved["stateful_callbacks"]["LayerFreezingCallback"]["attributes"]["saved_frozen_units"]
    assert 0 < frozen_at_checkpoint < full_callback.frozen_units  # saved in the middle of freezing

    resumed_callback = LayerFreezingCallback(**kwargs)
    # the same base weights (a PEFT checkpoint holds only the adapters), other adapter weights: they must come from
    # the checkpoint
    resumed = Trainer(
        model=_peft_model(name, adapter_seed=7),
        args=_args(tmp_path / "resumed", **overrides),
        train_dataset=_dataset(name),
        callbacks=[resumed_callback],
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))

    assert resumed_callback.frozen_units == full_callback.frozen_units
    expected_tensors, expected_groups = _train_state(full)
    tensors, groups = _train_state(resumed)
    assert tensors.keys() == expected_tensors.keys()
    mismatched = [k for k in tensors if not torch.equal(tensors[k], expected_tensors[k])]
    assert not mismatched, mismatched[:5]
    assert groups == expected_groups


@pytest.mark.slow
@pytest.mark.multiprocess
def test_lora_ddp_ranks_stay_identical_and_frozen_adapters_unchanged(tmp_path):
    """2-process DDP (gloo, CPU) through `torchrun`: a LoRA causal LM trained by the Trainer with freezing by step."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = f"{root}{os.pathsep}{env.get('PYTHONPATH', '')}"
    torchrun = Path(sys.executable).parent / "torchrun"
    worker = Path(__file__).resolve().parent / "workers" / "ddp_peft.py"
    command = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), str(worker)]
    proc = subprocess.run(
        [*command, "--out", str(tmp_path)], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    ranks = []
    for rank in range(2):
        path = tmp_path / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote nothing (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
        ranks.append(json.loads(path.read_text()))
    for result in ranks:
        assert result["world_size"] == 2
        assert result["ddp_found"], "the callback did not find the Trainer's DDP wrapper"
        records = result["records"]
        assert len(records) == result["max_steps"]
        assert all(r["identical"] for r in records), records  # every parameter, bitwise, on both ranks
        assert all(r["frozen_unchanged"] for r in records), records
        assert all(r["trained_unfrozen"] for r in records), records
        # DDP all-reduced exactly the adapters that still trained: frozen ones left its buckets
        assert all(r["allreduced"] == r["trainable"] for r in records), records
        counts = [r["frozen_units"] for r in records]
        assert counts[0] == 0 and len(set(counts)) >= 3 and counts == sorted(counts), counts
        assert result["handed_back"]
    assert ranks[0]["digest"] == ranks[1]["digest"]


@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
def test_disable_adapter_between_a_forward_through_an_inner_module_and_its_backward_trains_only_the_unfrozen(
    checkpointing,
):
    # a custom loop: the policy through the inner LlamaModel (a head of one's own), the reference in PEFT's
    # disable_adapter(), which sets requires_grad=True on every adapter when it exits, then the policy's backward
    model = _peft_model("llama-untied-lora")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    freezer = LayerFreezer(model, optimizer)
    freezer.freeze_units(2)
    frozen = {id(p) for p in freezer.record.parameters}
    adapters = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    assert frozen and len(frozen) < len(adapters)
    ids = RandomTokenDataset(8, causal=True).ids[:4]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loss = model.get_base_model().model(input_ids=ids).last_hidden_state.square().mean()
            with torch.no_grad(), model.disable_adapter():
                model(input_ids=ids)
            loss.backward()
            assert all((p.grad is None) == (id(p) in frozen) for _, p in adapters)
            assert not any(p.requires_grad for _, p in adapters if id(p) in frozen)
            optimizer.step()
            optimizer.zero_grad()
    assert sum("disable_adapter" in str(w.message) for w in caught) == 1
