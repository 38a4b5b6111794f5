"""Gradient checkpointing beside freezing: every unit after the frozen prefix keeps its exact gradient, in both
checkpointing modes, for transformers and timm models."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import transformers as tf
from helpers import RandomImages, StepWatch, tiny_timm
from transformers import Trainer, TrainingArguments

from hf_layer_freeze import LayerFreezer, LayerFreezingCallback

VIT = dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
           intermediate_size=32, num_labels=3)  # fmt: skip


def _transformers_vit(checkpointing: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tf.ViTForImageClassification(tf.ViTConfig(**VIT))
    if checkpointing is not None:
        kwargs = {"use_reentrant": checkpointing == "reentrant"}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def _timm_vit(checkpointing: str | None) -> torch.nn.Module:
    model = tiny_timm("vit_tiny_patch16_224", num_classes=3)
    model.set_grad_checkpointing(checkpointing is not None)
    return model


def _gradients(model: torch.nn.Module, frozen_units: int) -> tuple[dict[str, torch.Tensor], LayerFreezer]:
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    freezer.freeze_units(frozen_units)
    model.train()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=generator)
    logits = model(x)
    logits = logits.logits if hasattr(logits, "logits") else logits
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 0])).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return grads, freezer


@pytest.mark.parametrize("checkpointing", ["reentrant", "non-reentrant"])
@pytest.mark.parametrize("family", ["transformers", "timm"])
@pytest.mark.parametrize("frozen_units", [1, 2, 4, 9, 15])  # the stem, mid-block and whole-block boundaries
def test_checkpointed_training_keeps_every_unfrozen_gradient(family, checkpointing, frozen_units, monkeypatch):
    if family == "timm":
        monkeypatch.setattr(timm.layers.config, "_USE_REENTRANT_CKPT", checkpointing == "reentrant")
        build = _timm_vit
    else:
        build = _transformers_vit
    expected, _ = _gradients(build(None), frozen_units)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, freezer = _gradients(build(checkpointing), frozen_units)
    ours = [w for w in caught if "timm re-entrant gradient checkpointing" in str(w.message)]
    assert len(ours) == ((family, checkpointing) == ("timm", "reentrant")), "the cost warning, where it applies"
    assert set(got) == set(expected)
    missing = [n for n, g in got.items() if g is None]
    assert not missing, f"{len(missing)} of {len(got)} trainable tensors got no gradient: {missing[:4]}"
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
    frozen = {id(p) for unit in freezer.units[:frozen_units] for p in unit.parameters}
    assert all(p.grad is None for p in freezer.model.parameters() if id(p) in frozen)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_trainer_gradient_checkpointing_trains_every_unfrozen_tensor_at_every_step(tmp_path, use_reentrant):
    """The reported failure: ViT, Trainer gradient checkpointing, freezing by step from the start."""
    model = _transformers_vit(None)
    watch = StepWatch()
    args = TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=8, learning_rate=0.1,
        use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant},
    )  # fmt: skip
    callback = LayerFreezingCallback(freeze_start=0.0, freeze_every="step")
    dataset = RandomImages(32, num_classes=3)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback, watch]).train()
    assert callback.frozen_units > 0
    assert watch.trained_exactly_the_unfrozen(), watch.steps


@pytest.mark.parametrize("frozen_units", [0, 3])
def test_a_hand_frozen_embedding_does_not_stop_reentrant_checkpoints_from_the_first_step(frozen_units):
    """PEFT freezes every base weight, users freeze embeddings: the first checkpointed layer's input then requires no
    gradient, and with re-entrant checkpointing every layer after it would silently stop training, before this
    freezer freezes anything."""

    def build(checkpointing):
        model = _transformers_vit(checkpointing)
        for param in model.vit.embeddings.parameters():
            param.requires_grad_(False)
        return model

    expected, _ = _gradients(build(None), frozen_units)
    got, _ = _gradients(build("reentrant"), frozen_units)
    assert set(got) == set(expected)
    missing = [n for n, g in got.items() if g is None]
    assert not missing, f"{len(missing)} of {len(got)} trainable tensors got no gradient: {missing[:4]}"
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


class _UserCheckpointedMLP(torch.nn.Module):
    """A user's model checkpointing its own blocks in its forward, with torch's checkpoint directly."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.use_reentrant = use_reentrant
        self.stem = torch.nn.Linear(8, 16)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Tanh()) for _ in range(4)
        )
        self.classifier = torch.nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=self.use_reentrant)
        return self.classifier(x)


@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_a_users_own_checkpoint_trains_every_unfrozen_tensor_or_reentrant_fails_at_once_naming_the_fix(use_reentrant):
    model = _UserCheckpointedMLP(use_reentrant)
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), head=["classifier"])
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        if step == 1:
            freezer.freeze_units(1)  # the stem: the first checkpoint's input requires no gradient any more
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        x, y = torch.randn(4, 8, generator=generator), torch.randint(0, 3, (4,), generator=generator)
        if use_reentrant and step >= 1:
            with pytest.raises(NotImplementedError, match=r"'blocks\.0\.0'.*use_reentrant=True.*use_reentrant=False"):
                model(x)
            assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
            return
        freezer.optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        freezer.optimizer.step()
        for name, param in model.named_parameters():
            frozen = step >= 1 and name.startswith("stem.")
            assert torch.equal(before[name], param) == frozen, f"step {step}: {name}"
    freezer.close()
    assert not model.blocks[0][0]._forward_pre_hooks and not model._forward_hooks, "no hook left behind"
