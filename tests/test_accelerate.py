"""The helper in a custom Accelerate loop: freezing, and `save_state` / `load_state` round trips."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from helpers import RandomImages, tiny_timm

from hf_layer_freeze import LayerFreezer

EPOCHS = 4


def _setup(seed: int = 0):
    set_seed(seed)
    accelerator = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    model = tiny_timm("resnet10t", seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    loader = torch.utils.data.DataLoader(RandomImages(48), batch_size=8, shuffle=True)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * len(loader))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    freezer = LayerFreezer(model, optimizer, freeze_start=0.25, freeze_level=1.0)
    accelerator.register_for_checkpointing(freezer)
    return accelerator, model, optimizer, loader, scheduler, freezer


def _train(accelerator, model, optimizer, loader, scheduler, freezer, epochs: range, save_after: int | None = None):
    history = []
    for epoch in epochs:
        model.train()
        loader.set_epoch(epoch)
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(model(batch["pixel_values"]), batch["labels"])
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        history.append(freezer.update((epoch + 1) / EPOCHS).frozen_units)
        if save_after is not None and epoch == save_after:
            return history
    return history


def _snapshot(model, optimizer):
    unwrapped = model
    tensors = {f"model.{k}": v.detach().clone() for k, v in unwrapped.state_dict().items()}
    state = optimizer.state_dict()
    for index, entry in state["state"].items():
        for key, value in entry.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).clone()
    return tensors, state["param_groups"]


def _assert_bitwise_equal(a, b):
    tensors_a, groups_a = a
    tensors_b, groups_b = b
    assert tensors_a.keys() == tensors_b.keys()
    for key in tensors_a:
        assert torch.equal(tensors_a[key], tensors_b[key]), key
    assert groups_a == groups_b


def test_accelerate_loop_freezes_on_schedule():
    parts = _setup()
    history = _train(*parts, epochs=range(EPOCHS))
    freezer = parts[-1]
    expected = [freezer.num_units_at((e + 1) / EPOCHS) for e in range(EPOCHS)]
    assert history == expected
    assert history[-1] == freezer.num_units == 28
    assert history[0] == 0 and 0 < history[1] < history[2] < history[3]


@pytest.mark.parametrize("freeze_before_load", [False, True], ids=["load-then-freeze", "freeze-then-load"])
def test_save_state_load_state_resume_is_bitwise_equal(tmp_path, freeze_before_load):
    uninterrupted = _setup()
    _train(*uninterrupted, epochs=range(EPOCHS))
    expected = _snapshot(uninterrupted[1], uninterrupted[2])

    first = _setup()
    _train(*first, epochs=range(EPOCHS), save_after=1)  # mid-freeze: epoch 2 of 4 froze some units
    assert 0 < first[-1].frozen_units < first[-1].num_units
    first[0].save_state(tmp_path / "ckpt")
    frozen_at_save = first[-1].frozen_units

    # A fresh process running the same script (same seed: accelerate restores the RNG states but not the
    # seed of a map-style dataset's sampler), nothing frozen; its weights are scrambled to prove load_state
    # overwrites them all.
    resumed = _setup(seed=0)
    accelerator, model, optimizer, loader, scheduler, freezer = resumed
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    if freeze_before_load:
        freezer.update(2 / EPOCHS)
    accelerator.load_state(tmp_path / "ckpt")
    assert freezer.frozen_units == frozen_at_save
    assert not any(p.requires_grad for u in freezer.units[:frozen_at_save] for p in u.parameters)
    _train(*resumed, epochs=range(2, EPOCHS))
    _assert_bitwise_equal(_snapshot(model, optimizer), expected)


def test_freezer_state_for_another_model_is_refused():
    freezer = _setup()[-1]
    with pytest.raises(ValueError, match="saved for a model with 5 freezable units, this one has 28"):
        freezer.load_state_dict({"frozen_units": 2, "num_units": 5})
