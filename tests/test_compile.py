"""A compiled model stays compiled through a whole run: freeze events are bounded to fit Dynamo's limit."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from helpers import tiny_timm
from torch._dynamo.backends.registry import lookup_backend

from hf_layer_freeze import LayerFreezer

pytestmark = pytest.mark.slow  # subprocesses, compiles or whole-model FLOP counts: not in `make test-fast`


class CountingBackend:
    """aot_eager, counting how many graphs Dynamo hands it (each compile and each recompile)."""

    def __init__(self):
        self.compiles = 0
        self.aot_eager = lookup_backend("aot_eager")

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return self.aot_eager(gm, example_inputs)


def _loss_and_grads(model, x, y):
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_compiled_model_recompiles_once_per_freeze_event_and_matches_eager():
    torch._dynamo.reset()
    eager = tiny_timm("resnet10t")
    backend = CountingBackend()
    compiled = torch.compile(eager, backend=backend)
    optimizer = torch.optim.SGD(eager.parameters(), lr=0.05)
    freezer = LayerFreezer(compiled, optimizer, freeze_start=0.0)
    limit = torch._dynamo.config.recompile_limit
    assert freezer.max_freeze_events == (limit - 2) // 2 == 3  # the default for a compiled model

    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    counts, events = [], 0
    epochs = 10
    for epoch in range(epochs):
        eager.train()
        loss_c, grads_c = _loss_and_grads(compiled, x, y)
        loss_e, grads_e = _loss_and_grads(eager, x, y)  # the same parameters, run eagerly
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_c:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5)
        compiled(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        eager.eval()
        with torch.no_grad():
            compiled(x)  # evaluation each epoch, as the Trainer does
        result = freezer.update((epoch + 1) / epochs)
        events += result.changed
        counts.append(result.frozen_units)
    assert 1 <= events <= 3 and counts[-1] == freezer.num_units
    # one training and one evaluation graph at the start, then one of each per freeze event (the last freeze,
    # at the very end of training, is never run)
    assert backend.compiles == 2 + 2 * (events - 1)
    assert backend.compiles <= limit


def test_too_many_freeze_events_for_a_compiled_model_warn():
    model = torch.compile(tiny_timm(), backend="aot_eager")
    with pytest.warns(UserWarning, match="recompile_limit=8.*Keep max_freeze_events <= 3"):
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), max_freeze_events=10)


def test_max_freeze_events_bounds_distinct_frozen_sets():
    model = tiny_timm()
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), freeze_start=0.0, max_freeze_events=4)
    counts = [freezer.num_units_at(step / 100) for step in range(101)]
    assert sorted(set(counts)) == [0, 7, 14, 21, 28]
    assert counts == sorted(counts)
    uncompiled = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert uncompiled.max_freeze_events is None
    with pytest.raises(ValueError, match="max_freeze_events must be None or an integer >= 1, got 0"):
        LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), max_freeze_events=0)
