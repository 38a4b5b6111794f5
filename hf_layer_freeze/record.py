"""What the library froze: each freezer's record, and the ledger the freezers of one model share.

Parameters that were frozen before any freezer was built (PEFT's base weights, an embedding frozen by hand) are not
the library's to freeze or to give back, and neither is a parameter someone froze between two of its events:
freezing touches only what still trains, and giving back restores exactly what was recorded (PEFT's
`targeted_parameter_names` records what a tuner touched in the same spirit).

What a freezer froze is known to every other freezer of the same model in the same process, through the model's
`FreezeLedger` (`ledger_for(model)`):
- a later freezer (a retried or re-entered `trainer.train()`, a resumed run) sees what an open freezer holds frozen as
  the library's, not the user's: its units are those of the model as it was given;
- two open freezers (one per optimizer, as some users build them) share what each froze: a parameter frozen by one
  leaves the param groups of every optimizer of every open freezer, and trains again only when no freezer holds it;
- what a freezer holds frozen is held frozen: `refreeze()` undoes other code setting `requires_grad=True` on it (PEFT's
  `disable_adapter()` re-enables every LoRA tensor on exit, and TRL's `DPOTrainer` enters it at every step).

A closed freezer (`LayerFreezer.close()`, `keep_frozen=True`) hands what it froze over to the user: it stays frozen,
and later freezers treat it as frozen by hand. So does a freezer that was garbage-collected without being closed.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .param_groups import freeze_parameters

__all__ = ["FreezeLedger", "FreezeResult", "FrozenRecord", "ledger_for"]


@dataclass(frozen=True)
class FreezeResult:
    """
    What is frozen after a call to `LayerFreezer.update` / `LayerFreezer.freeze_units`.

    Args:
        frozen_units (`int`): number of units frozen so far (a prefix of the unit list).
        total_units (`int`): number of freezable units: the modules owning a parameter that trained when the
            freezer was built (head excluded).
        frozen_params (`int`): number of parameter elements this freezer froze so far.
        fraction (`float`): the freeze fraction the schedule asked for (0 when units were frozen by count).
        newly_frozen_units (`int`): units frozen by this very call.
    """

    frozen_units: int
    total_units: int
    frozen_params: int
    fraction: float
    newly_frozen_units: int

    @property
    def changed(self) -> bool:
        """Whether this call froze anything."""
        return self.newly_frozen_units > 0


class FreezeLedger:
    """
    What the open freezers of one model hold frozen, and the optimizer bookkeeping of each (see the module docstring).

    A parameter is held frozen while at least one open `FrozenRecord` holds it; it leaves the param groups of every
    optimizer registered by an open record when the first one holds it, and comes back to them (with
    `requires_grad=True`) when the last one lets go of it.
    """

    def __init__(self) -> None:
        # id(param) -> (param, the records holding it)
        self._held: dict[int, tuple[nn.Parameter, weakref.WeakSet[FrozenRecord]]] = {}
        # the param-group bookkeeping (`param_groups._FrozenParamGroups`, one per optimizer) of every optimizer a
        # freezer of this model was given, held weakly: it lives as long as its optimizer. Closed freezers' stay:
        # what another freezer freezes or gives back later leaves or rejoins their optimizers too.
        self._groups: dict[int, weakref.ref[Any]] = {}
        # what closed records left frozen (`keep_frozen=True`): the user's from then on, but known to be the
        # library's doing, so that a resume can start from the checkpoint's freeze (`give_back_kept`)
        self._kept: dict[int, nn.Parameter] = {}

    def _live(self) -> dict[int, tuple[nn.Parameter, weakref.WeakSet[FrozenRecord]]]:
        """The held entries, after dropping those whose every holder was closed or garbage-collected."""
        for key in [k for k, (_, holders) in self._held.items() if not holders]:
            del self._held[key]
        return self._held

    def held_parameters(self, exclude: FrozenRecord | None = None) -> list[nn.Parameter]:
        """The parameters some open record holds frozen (other than `exclude`)."""
        return [p for p, holders in self._live().values() if any(h is not exclude for h in holders)]

    def held_by_others(self) -> list[nn.Parameter]:
        """What open freezers hold frozen, for a freezer being built, with a warning when there is any (the caller of
        `LayerFreezer(...)` is warned)."""
        held = self.held_parameters()
        if held:
            warnings.warn(
                f"{len(held)} parameter tensors of this model are held frozen by another LayerFreezer that was not "
                "closed (an earlier run that raised or was interrupted, or a second freezer built on purpose). This "
                "freezer counts them among its units, and they stay frozen until every freezer holding them gives "
                "them back (freezer.unfreeze()) or is closed (freezer.close(), which leaves them frozen).",
                stacklevel=3,
            )
        return held

    def holds(self, param: nn.Parameter) -> bool:
        """Whether an open record holds `param` frozen."""
        return id(param) in self._live()

    def register(self, record: FrozenRecord, param_groups: Sequence[Any]) -> None:
        """Register the param-group bookkeeping of `record`'s optimizers: what is held frozen leaves them now."""
        for groups in param_groups:
            self._groups[id(groups)] = weakref.ref(groups)
        held = self.held_parameters()
        for groups in param_groups:
            groups.remove(held)

    def registered_parameter_ids(self) -> set[int]:
        """Ids of every parameter held by an optimizer of an open record (frozen or not)."""
        return set().union(*(groups.parameter_ids for groups in self._all_groups()))

    def _all_groups(self) -> list[Any]:
        alive = {key: ref() for key, ref in self._groups.items()}
        self._groups = {key: self._groups[key] for key, groups in alive.items() if groups is not None}
        return [groups for groups in alive.values() if groups is not None]

    def hold(self, record: FrozenRecord, params: Sequence[nn.Parameter]) -> None:
        """`record` holds `params` frozen: those not held yet are frozen and leave every registered optimizer."""
        newly = [p for p in params if id(p) not in self._live()]
        for param in params:
            self._kept.pop(id(param), None)
            entry = self._held.get(id(param))
            if entry is None:
                entry = self._held[id(param)] = (param, weakref.WeakSet())
            entry[1].add(record)
        freeze_parameters(newly)
        for groups in self._all_groups():
            groups.remove(newly)

    def release(self, record: FrozenRecord, params: Sequence[nn.Parameter]) -> list[nn.Parameter]:
        """`record` lets go of `params`; those no open record holds any more train again, back in every registered
        optimizer, and are returned."""
        freed = []
        for param in params:
            entry = self._held.get(id(param))
            if entry is None:
                continue
            entry[1].discard(record)
            if not entry[1]:
                del self._held[id(param)]
                freed.append(param)
        for param in freed:
            param.requires_grad_(True)
        for groups in self._all_groups():
            groups.restore(freed)
        return freed

    def forget(self, record: FrozenRecord) -> None:
        """`record` is closed: what it holds stays as it is (frozen, unless another record gives it back), the user's
        from now on (`kept`)."""
        for param, holders in self._held.values():
            holders.discard(record)
            if not holders and not param.requires_grad:
                self._kept[id(param)] = param
        self._live()

    def give_back_kept(self) -> list[nn.Parameter]:
        """Make what closed records left frozen train again, back in every registered optimizer (a resume starts from
        its checkpoint's freeze, not from what an earlier run kept frozen); return those parameters."""
        kept = [p for p in self._kept.values() if not p.requires_grad and id(p) not in self._live()]
        self._kept.clear()
        for param in kept:
            param.requires_grad_(True)
        for groups in self._all_groups():
            groups.restore(kept)
        return kept

    def refreeze(self) -> list[nn.Parameter]:
        """Freeze again every held parameter that other code made trainable; return them."""
        rewritten = [p for p, _ in self._live().values() if p.requires_grad]
        freeze_parameters(rewritten)
        return rewritten


_LEDGERS: weakref.WeakKeyDictionary[nn.Module, FreezeLedger] = weakref.WeakKeyDictionary()


def ledger_for(model: nn.Module) -> FreezeLedger:
    """The `FreezeLedger` of `model` (the bare model: callers unwrap DDP, compile and PEFT first), created on first
    use; held weakly, so it goes with the model."""
    ledger = _LEDGERS.get(model)
    if ledger is None:
        ledger = _LEDGERS[model] = FreezeLedger()
    return ledger


class FrozenRecord:
    """
    What one freezer froze: the parameters, in the order it froze them, with their qualified names; how many leading
    units that is (`frozen_units`), a count that waits to be applied (`pending_units`: with `order="execution"`,
    until the first forward sets the order) and the freeze fraction reached (`fraction`). The engine's
    `frozen_units` and `fraction` read it, and so do the callback and `LayerFreezer.metrics()`.

    Args:
        ledger (`FreezeLedger`, *optional*):
            The ledger of the model, shared with the other freezers of that model (`ledger_for(model)`); a record of
            its own by default.

    Example:

    ```python
    >>> import torch
    >>> from hf_layer_freeze.record import FrozenRecord
    >>> layer = torch.nn.Linear(2, 2)
    >>> layer.bias.requires_grad_(False)  # frozen by hand: not the record's
    Parameter containing:
    ...
    >>> record = FrozenRecord()
    >>> [name for name, _ in record.freeze([("weight", layer.weight), ("bias", layer.bias)])]
    ['weight']
    >>> [name for name, _ in record.give_back()], layer.weight.requires_grad, layer.bias.requires_grad
    (['weight'], True, False)

    ```
    """

    def __init__(self, ledger: FreezeLedger | None = None) -> None:
        self.ledger = ledger if ledger is not None else FreezeLedger()
        self._frozen: dict[int, tuple[str, nn.Parameter]] = {}
        self.frozen_units = 0
        self.pending_units: int | None = None
        self.fraction = 0.0

    @property
    def saved_units(self) -> int:
        """The units frozen, counting a count that waits to be applied: what a checkpoint keeps."""
        return max(self.frozen_units, self.pending_units or 0)

    def wait_for(self, count: int) -> None:
        """Record that `count` units are to be frozen once they can be (never lowers a count already waiting)."""
        if count > self.frozen_units:
            self.pending_units = max(self.pending_units or 0, count)

    def take_pending(self) -> int | None:
        """The count waiting to be applied, if any, which no longer waits."""
        count, self.pending_units = self.pending_units, None
        return count

    def reach(self, fraction: float) -> None:
        """The schedule reached `fraction` (the fraction reported never goes down, until a give-back)."""
        self.fraction = max(self.fraction, fraction)

    def freeze(
        self, named_parameters: Iterable[tuple[str, nn.Parameter]], frozen_units: int | None = None
    ) -> list[tuple[str, nn.Parameter]]:
        """Freeze those of `named_parameters` that still train, or that another open freezer of the model holds frozen
        (`requires_grad=False`, gradient dropped), record them, and return them. `frozen_units`: how many leading
        units are frozen with them."""
        newly = [
            (name, p)
            for name, p in named_parameters
            if id(p) not in self._frozen and (p.requires_grad or self.ledger.holds(p))
        ]
        self.ledger.hold(self, [p for _, p in newly])
        self._frozen.update((id(p), (name, p)) for name, p in newly)
        if frozen_units is not None:
            self.frozen_units = frozen_units
        return newly

    def give_back(
        self, parameters: Iterable[nn.Parameter] | None = None, frozen_units: int = 0
    ) -> list[tuple[str, nn.Parameter]]:
        """Let go of the recorded `parameters` (by default every one, which also forgets the fraction and any pending
        count) and forget them, leaving `frozen_units` units frozen; return those that train again (all of them,
        unless another open freezer of the model still holds some)."""
        if parameters is None:
            given = list(self._frozen.values())
            self.pending_units, self.fraction = None, 0.0
        else:
            given = [self._frozen[id(p)] for p in parameters if id(p) in self._frozen]
        freed = {id(p) for p in self.ledger.release(self, [p for _, p in given])}
        for _, param in given:
            del self._frozen[id(param)]
        self.frozen_units = frozen_units
        return [(name, p) for name, p in given if id(p) in freed]

    def refreeze(self) -> list[tuple[str, nn.Parameter]]:
        """Freeze again what this record (or another open record of the model) holds and other code made trainable
        since; return this record's such parameters."""
        rewritten = {id(p) for p in self.ledger.refreeze()}
        return [(name, p) for key, (name, p) in self._frozen.items() if key in rewritten]

    def close(self) -> None:
        """Stop holding: what is frozen stays frozen, and is the user's from now on."""
        self.ledger.forget(self)

    def metrics(self) -> dict[str, float]:
        """`layer_freeze/fraction`, `layer_freeze/frozen_units` (a pending count included) and `.../frozen_params`."""
        return {
            "layer_freeze/fraction": self.fraction,
            "layer_freeze/frozen_units": self.saved_units,
            "layer_freeze/frozen_params": self.numel,
        }

    def state_dict(self, num_units: int) -> dict[str, Any]:
        """The checkpoint entries of the record, for a freezer of `num_units` units."""
        return {
            "frozen_units": self.saved_units,
            "frozen_parameter_names": self.names,
            "fraction": self.fraction,
            "num_units": num_units,
        }

    @staticmethod
    def saved_count(state: dict[str, Any], units: Sequence[Any], check_names: bool = True) -> int:
        """
        The unit count a checkpoint state recorded, checked against `units` (those of the freezer loading it): the
        same number of units, and (if `check_names`: the unit order is final) every recorded name in the first
        units of that count. States saved before the record existed hold only the count.

        Raises:
            `ValueError`: the state was saved for another model, or with other options.
        """
        if state.get("num_units", len(units)) != len(units):
            raise ValueError(
                f"state_dict was saved for a model with {state['num_units']} freezable units, "
                f"this one has {len(units)}"
            )
        count = int(state["frozen_units"])
        if check_names:
            in_units = {name for unit in units[:count] for name in unit.parameter_names}
            unknown = [name for name in state.get("frozen_parameter_names") or [] if name not in in_units]
            if unknown:
                raise ValueError(
                    f"state_dict froze {unknown[0]!r}, which is not in the first {count} freezable units of this "
                    "model: it was saved for another model, or with other options (head, granularity, order)"
                )
        return count

    def __contains__(self, param: object) -> bool:
        return id(param) in self._frozen

    def __len__(self) -> int:
        return len(self._frozen)

    @property
    def names(self) -> list[str]:
        """Qualified names of the recorded parameters, in the order they were frozen (what checkpoints store)."""
        return [name for name, _ in self._frozen.values()]

    @property
    def parameters(self) -> list[nn.Parameter]:
        """The recorded parameters, in the order they were frozen."""
        return [param for _, param in self._frozen.values()]

    @property
    def numel(self) -> int:
        """Number of parameter elements recorded."""
        return sum(param.numel() for _, param in self._frozen.values())
