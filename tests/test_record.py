"""What the freezer owns: the parameters that train when it is built. Parameters frozen before it, anywhere in the
model (by hand, by PEFT), are not its to count, to freeze or to give back, and every feature sees them from the
first step."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from helpers import tiny_timm

from hf_layer_freeze import LayerFreezer
from hf_layer_freeze.record import FrozenRecord

BERT = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32, num_labels=3)  # fmt: skip


def _bert_with_hand_frozen_parts() -> tuple[torch.nn.Module, list[str]]:
    """A BERT classifier whose position embedding and a mid-network LayerNorm were frozen by hand."""
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(**BERT))
    by_hand = ["bert.embeddings.position_embeddings.weight", "bert.encoder.layer.1.output.LayerNorm.weight"]
    params = dict(model.named_parameters())
    for name in by_hand:
        params[name].requires_grad_(False)
    return model, by_hand


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 64, (4, 12), generator=generator), "labels": torch.tensor([0, 1, 2, 0])}


def test_hand_frozen_parameters_are_in_no_unit_and_are_not_counted():
    model, by_hand = _bert_with_hand_frozen_parts()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    freezer = LayerFreezer(model, optimizer, freeze_start=0.0)
    names = {name for unit in freezer.units for name in unit.parameter_names}
    assert not names & set(by_hand)
    assert freezer.result().frozen_params == 0 and freezer.frozen_units == 0  # before freeze_start: nothing
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert freezer.update(1.0).frozen_params == trainable - head  # all it can own, and not one element more


def test_the_hand_back_restores_exactly_what_the_freezer_froze():
    model, by_hand = _bert_with_hand_frozen_parts()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    freezer = LayerFreezer(model, optimizer, freeze_start=0.0)
    freezer.update(0.7)
    assert freezer.record.names == [n for unit in freezer.units[: freezer.frozen_units] for n in unit.parameter_names]
    freezer.unfreeze()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before  # the position embedding stays frozen
    held = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(held) == sorted(id(p) for p in model.parameters() if p.requires_grad)


def test_a_parameter_frozen_by_someone_else_between_events_is_not_given_back():
    model = tiny_timm()
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_start=0.0)
    stolen = freezer.units[3].parameters[0]
    stolen.requires_grad_(False)  # the user freezes it by hand mid-training
    freezer.freeze_units(5)
    assert stolen not in freezer.record
    freezer.unfreeze()
    assert not stolen.requires_grad


def test_the_record_goes_into_checkpoints_by_name_and_old_counts_still_load():
    model = tiny_timm()
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    freezer.freeze_units(4)
    state = freezer.state_dict()
    assert state["frozen_parameter_names"] == [n for unit in freezer.units[:4] for n in unit.parameter_names]
    for saved in (state, {"frozen_units": 4, "fraction": 0.0, "num_units": freezer.num_units}):  # today's, older
        fresh_model = tiny_timm(seed=1)
        fresh = LayerFreezer(fresh_model, torch.optim.SGD(fresh_model.parameters(), lr=0.1))
        fresh.load_state_dict(saved)
        assert fresh.record.names == state["frozen_parameter_names"]
    other = tiny_timm("resnet18")
    mismatched = LayerFreezer(other, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="not in the first 4 freezable units"):
        mismatched.load_state_dict({**state, "num_units": mismatched.num_units})


def test_adaptive_schedule_ignores_what_was_frozen_before_it():
    """With constant gradients every unit that trains has settled: the first check after the warm-up freezes up to
    the level. Today the hand-frozen stem reported a change of 0 and made the median 0, so nothing ever froze."""
    model = tiny_timm()
    stem = [p for name, p in model.named_parameters() if name.startswith(("conv1", "bn1"))]
    for param in stem:
        param.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    freezer = LayerFreezer(model, optimizer, freeze_start=0.2, freeze_level=0.5, schedule="adaptive", check_every=5)
    assert not {id(p) for p in stem} & {id(p) for unit in freezer.units for p in unit.parameters}
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for step in range(1, 21):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        freezer.update(step / 20)
    assert freezer.frozen_units == freezer.num_units // 2


def test_execution_order_profiles_a_model_with_a_hand_frozen_stem():
    model = tiny_timm()
    for name, param in model.named_parameters():
        param.requires_grad_(not name.startswith("conv1"))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    freezer = LayerFreezer(model, optimizer, freeze_start=0.0, order="execution")
    freezer.update(0.5)  # waits for the first training forward
    model.train()
    model(torch.randn(2, 3, 32, 32))  # today: RuntimeError "profile before freezing anything"
    assert freezer.profiled and freezer.frozen_units == freezer.num_units // 2


def test_frozen_record_freezes_only_what_still_trains():
    layer = torch.nn.Linear(2, 2)
    layer.bias.requires_grad_(False)
    record = FrozenRecord()
    assert [n for n, _ in record.freeze([("weight", layer.weight), ("bias", layer.bias)])] == ["weight"]
    assert record.freeze([("weight", layer.weight)]) == []  # idempotent
    assert (len(record), record.numel) == (1, 4)
    record.give_back()
    assert layer.weight.requires_grad and not layer.bias.requires_grad and len(record) == 0


def test_the_record_holds_the_unit_count_the_pending_count_and_the_fraction():
    model = tiny_timm()
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_start=0.0, order="execution")
    freezer.update(0.5)  # the order waits for the first forward: the count waits with it
    record = freezer.record
    half = freezer.num_units // 2
    assert (record.frozen_units, record.pending_units, record.saved_units) == (0, half, half)
    assert freezer.frozen_units == 0 and freezer.fraction == record.fraction == 0.5
    assert freezer.state_dict()["frozen_units"] == freezer.metrics()["layer_freeze/frozen_units"] == half
    model.train()
    model(torch.randn(2, 3, 32, 32))
    assert (record.frozen_units, record.pending_units) == (half, None) and freezer.frozen_units == half
    freezer.unfreeze()
    assert (record.frozen_units, record.pending_units, record.fraction, len(record)) == (0, None, 0.0, 0)
