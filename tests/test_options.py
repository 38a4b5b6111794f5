"""Beyond the method card: execution order, block granularity, parameter/FLOP budgets, frozen BatchNorm."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_timm, train_steps
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hf_layer_freeze import LayerFreezer, LayerFreezingCallback, freezable_units
from hf_layer_freeze.schedule import num_units_for_budget


class DefinedBackwards(nn.Module):
    """Defines `late` before `early`, but runs `early` first: definition order is not execution order."""

    def __init__(self):
        super().__init__()
        self.late = nn.Conv2d(8, 8, 3, padding=1)
        self.early = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.late(torch.relu(self.early(x))).mean((2, 3)))


def _step_flops(model, optimizer, x, y) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
    optimizer.zero_grad()
    return counter.get_total_flops()


def test_execution_order_freezes_the_true_prefix_and_saves_backward_flops():
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    flops = {}
    for order in ("definition", "execution"):
        torch.manual_seed(0)
        model = DefinedBackwards()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        freezer = LayerFreezer(model, optimizer, freeze_start=0.0, order=order)
        assert [u.name for u in freezer.units] == ["late", "early"]  # before any forward
        _step_flops(model, optimizer, x, y)  # the first training forward records the order
        freezer.update(0.5)  # one unit of two
        frozen = [u.name for u in freezer.units[: freezer.frozen_units]]
        assert frozen == (["late"] if order == "definition" else ["early"])
        flops[order] = _step_flops(model, optimizer, x, y)
    assert flops["execution"] < flops["definition"]


def test_execution_order_is_recorded_without_touching_batchnorm_statistics():
    model = tiny_timm("resnet10t")
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), order="execution")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        freezer.profile_with(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and freezer.profiled
    assert freezer.units[0].name == "conv1.0"


def test_block_granularity_never_half_freezes_a_block():
    model = tiny_timm("resnet10t")
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), granularity="block")
    assert [u.name for u in freezer.units] == ["", "layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert freezer.units[0].parameter_names[0] == "conv1.0.weight"  # the stem: conv1.* and bn1
    freezer.update(0.75)
    assert freezer.frozen_units == 2
    for block in ("layer1.0", "layer2.0"):
        states = {p.requires_grad for n, p in model.named_parameters() if n.startswith(block)}
        assert states == ({False} if block == "layer1.0" else {True})


def test_block_granularity_needs_a_group_matcher():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(
        ValueError, match="granularity='block' needs a timm model with group_matcher.*_no_split_modules"
    ):
        freezable_units(model, granularity="block")


def _tiny_transformers(name: str) -> nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32)
    if name == "vit":
        config = tf.ViTConfig(image_size=32, patch_size=8, **{k: v for k, v in text.items() if k != "vocab_size"})
        return tf.ViTForImageClassification(config)
    if name == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(**text, num_labels=3))
    return tf.LlamaForCausalLM(tf.LlamaConfig(**text, num_key_value_heads=2, tie_word_embeddings=False))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("vit", ["vit.embeddings", "vit.encoder.layer.0", "vit.encoder.layer.1", "vit.encoder.layer.2",
                 "vit.layernorm"]),
        ("bert", ["bert.embeddings", "bert.encoder.layer.0", "bert.encoder.layer.1", "bert.encoder.layer.2",
                  "bert.pooler.dense"]),
        ("llama", ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2", "model.norm"]),
    ],
)  # fmt: skip
def test_block_granularity_freezes_whole_transformers_layers(name, expected):
    model = _tiny_transformers(name)
    units = freezable_units(model, granularity="block")
    layer_names = [u.name for u in units]
    if name == "vit" and "vit.layers.0" in layer_names:  # transformers 5 names ViT's layers `layers`
        expected = [n.replace("encoder.layer.", "layers.") for n in expected]
    assert layer_names == expected
    # every non-head parameter is in exactly one unit; each layer's parameters all in its unit
    modules = freezable_units(model)
    assert {id(p) for u in units for p in u.parameters} == {id(p) for u in modules for p in u.parameters}
    layer = dict(model.named_modules())[expected[1]]
    assert set(units[1].parameters) == set(layer.parameters())
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), granularity="block")
    freezer.freeze_units(2)
    assert not any(p.requires_grad for p in layer.parameters())
    assert all(p.requires_grad for p in dict(model.named_modules())[expected[2]].parameters())


def test_budgets_count_parameters_and_flops_not_units():
    model = tiny_timm("resnet18")
    x = torch.randn(2, 3, 64, 64)
    counts = {}
    for budget in ("units", "params", "flops"):
        freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), budget=budget)
        freezer.profile_with(x)
        counts[budget] = freezer.num_units_at(0.75)  # fraction 0.5
        if budget == "units":
            continue
        weights = [u.numel for u in freezer.units] if budget == "params" else list(freezer.profile.forward_flops)
        k = counts[budget]
        assert sum(weights[:k]) <= 0.5 * sum(weights) < sum(weights[: k + 1])
    assert counts["units"] == 20
    # resnet18's early units hold few parameters but much compute
    assert counts["params"] > counts["units"] > counts["flops"]


def test_num_units_for_budget():
    assert num_units_for_budget(0.5, [10, 10, 60, 20]) == 2
    assert num_units_for_budget(1.0, [1, 2, 3]) == 3
    assert num_units_for_budget(0.0, [0, 5]) == 1  # a zero-weight prefix costs nothing
    assert num_units_for_budget(0.5, [0, 0, 0, 0]) == 2


def test_frozen_batchnorm_statistics_stay_bitwise_unchanged_through_train_mode():
    for freeze_batchnorm in (False, True):
        model = tiny_timm("resnet10t")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        freezer = LayerFreezer(model, optimizer, freeze_start=0.0, freeze_batchnorm=freeze_batchnorm)
        train_steps(model, optimizer, steps=1)
        freezer.update(0.5)
        bn = model.conv1[1]  # in the frozen prefix
        assert not bn.weight.requires_grad
        before = {k: v.clone() for k, v in bn.state_dict().items()}
        for step in range(3):
            model.train()  # as the Trainer does every step
            train_steps(model, optimizer, steps=1, seed=step + 1)
        unchanged = all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
        assert unchanged == freeze_batchnorm
        assert model.layer4[0].bn1.training  # trainable BatchNorm layers still train


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"order": "forward"}, r"order must be one of \('definition', 'execution'\), got 'forward'"),
        ({"granularity": "stage"}, r"granularity must be one of \('module', 'block'\), got 'stage'"),
        ({"budget": "time"}, r"budget must be one of \('units', 'params', 'flops'\), got 'time'"),
        ({"freeze_batchnorm": "yes"}, r"freeze_batchnorm must be True or False, got 'yes'"),
    ],
)
def test_option_values_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayerFreezingCallback(**kwargs)
    model = tiny_timm()
    with pytest.raises(ValueError, match=match):
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_flops_budget_resumed_before_the_first_forward_profiles_on_it():
    model = tiny_timm("resnet10t")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    freezer = LayerFreezer(model, optimizer, budget="flops")
    with pytest.raises(RuntimeError, match="budget='flops' cannot count units before the first forward pass"):
        freezer.update(0.9)
    freezer.freeze_units(5)  # what a resume re-applies from the saved count
    train_steps(model, optimizer, steps=1)  # the first training forward profiles the units
    assert freezer.profiled and freezer.frozen_units == 5
    assert freezer.num_units_at(0.9) > 5
