"""Model families (`hf_layer_freeze/families/`): a new family is one class and one registration, and the freezer
uses its answers (head, blocks, cache cut, checkpointed layer)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import tiny_timm
from torch import nn

from hf_layer_freeze import LayerFreezer, find_head, freezable_units
from hf_layer_freeze.activation_cache import prefix_layout
from hf_layer_freeze.families import (
    FAMILIES,
    CacheCut,
    CheckpointedLayer,
    HeadAnswer,
    ModelFamily,
    NoCacheCut,
    checkpointed_layer,
    register_family,
)


class Toy(nn.Module):
    """A model no built-in family knows: an embedding, blocks of two layers each, a decoder."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8)) for _ in range(3))
        self.decoder = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.decoder(x)


class ToyFamily(ModelFamily):
    """What a user writes for their own models: one class."""

    name = "toy"
    cache_support = "toy models"
    block_support = "a toy model"

    def matches(self, model: nn.Module) -> bool:
        return any(isinstance(m, Toy) for m in model.modules())

    def _toy(self, model: nn.Module) -> Toy | None:
        return next((m for m in model.modules() if isinstance(m, Toy)), None)

    def head(self, model: nn.Module) -> HeadAnswer | None:
        toy = self._toy(model)
        return None if toy is None else HeadAnswer((toy.decoder,), ("toy decoder",), (toy,))

    def blocks(self, model: nn.Module) -> list[nn.Module] | None:
        toy = self._toy(model)
        return None if toy is None else list(toy.blocks)

    def cache_layout(self, module: nn.Module) -> CacheCut | None:
        return CacheCut(module.blocks, tuple(module.blocks)) if isinstance(module, Toy) else None

    def checkpointed_layer(self, model: nn.Module, module: nn.Module) -> CheckpointedLayer | None:
        toy = self._toy(model)
        block = next((b for b in toy.blocks if any(m is module for m in b.modules())), None) if toy else None
        return None if block is None else CheckpointedLayer(block)


def test_a_registered_family_answers_head_blocks_and_cache_cut_and_the_freezer_uses_them():
    torch.manual_seed(0)
    model = Toy()
    before = list(FAMILIES)
    with register_family(ToyFamily()) as family:
        assert FAMILIES[0] is family and FAMILIES[1:] == before  # asked first
        head = find_head(model)
        assert head.rule == "toy decoder" and head.modules == (model.decoder,)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the family named the head: no guess, no warning
            freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), granularity="block")
        # its blocks are whole units; the embedding, outside any block, is a module unit; the decoder is head
        assert [u.name for u in freezer.units] == ["embed", "blocks.0", "blocks.1", "blocks.2"]
        block = tuple(f"blocks.0.{n}" for n, _ in model.blocks[0].named_parameters())
        assert freezer.units[1].parameter_names == block
        freezer.close()
        layout = prefix_layout(model)
        assert layout.before == (model.embed,) and layout.blocks == tuple(model.blocks)
        assert layout.above == (model.blocks,) and not layout.use_cache_input
        # the cache takes the toy model (no built-in family cuts it)
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), cache_activations=True).close()
        assert checkpointed_layer(model, model.blocks[1][2]).module is model.blocks[1]
    # unregistered: the toy model is nobody's again
    assert FAMILIES == before
    with pytest.warns(UserWarning, match="No rule names the head of Toy.*'decoder'"):
        freezable_units(model)
    with pytest.raises(ValueError, match="granularity='block' needs a timm model with group_matcher()"):
        freezable_units(model, granularity="block")
    with pytest.raises(NotImplementedError, match="cache_activations=True supports transformers bert"):
        prefix_layout(model)
    assert checkpointed_layer(model, model.blocks[1][2]) is None


def test_a_family_is_asked_before_the_built_in_ones_and_its_refusals_name_it():
    class Refusing(ModelFamily):
        name = "refusing"
        cache_support = "refusing models"

        def matches(self, model):
            return True

        def head(self, model):
            return HeadAnswer((), ("refusing",), ())

        def cache_layout(self, module):
            raise NoCacheCut(module, "it refuses")

    model = tiny_timm()
    handle = register_family(Refusing())
    try:
        # joined with the built-in families' answers (timm's classifier), after its own
        head = find_head(model)
        assert head.rule == "refusing + timm get_classifier()" and head.modules == (model.get_classifier(),)
        refused = r"supports transformers .* ResNet and refusing models; .*\(it refuses\)"  # built-in ones first
        with pytest.raises(NotImplementedError, match=refused):
            prefix_layout(model)
    finally:
        handle.remove()
    handle.remove()  # twice: nothing happens
    assert not any(isinstance(f, Refusing) for f in FAMILIES)
    assert prefix_layout(model).blocks == (model.layer1, model.layer2, model.layer3, model.layer4)


def test_register_family_refuses_what_is_no_family_and_a_family_registered_twice():
    with pytest.raises(ValueError, match="family must be an instance of .*ModelFamily subclass, got str"):
        register_family("timm")
    family = ToyFamily()
    with register_family(family):
        with pytest.raises(ValueError, match="family must not be registered already, got 'toy'"):
            register_family(family)
    assert family not in FAMILIES
