"""The freezer's options, each defined once: its field, default, validation and documentation.

`FreezeOptions` holds the options of `LayerFreezer`; `CallbackOptions` adds the two of `LayerFreezingCallback`. Each
field is declared with `option(...)` (`option_fields.py`), whose metadata (`doc`, `check`, `choices`, `type`, `cli`)
is all the rest of the package reads: `__post_init__` runs each `check`, `document_options` writes each `doc` into
the constructors' `Args:` blocks, and `add_option_arguments` derives `plan`'s command-line flags. The constructors
take the options as `**options` and forward them to `from_kwargs`, so adding an option is its `option(...)` line
here, its key in the `...Kwargs` TypedDict (a test compares the two) and the code that uses it.

Pure Python (no torch), and JSON-safe values only, so the callback can be saved and restored with the Trainer's
`ExportableState` mechanism.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypedDict, TypeVar

from .option_fields import Check, add_arguments, document_options, option, option_names
from .schedule import validate_freeze_level, validate_freeze_start, validate_freeze_start_level

if sys.version_info >= (3, 11):
    from typing import Unpack
else:  # pragma: no cover - Python 3.10 (torch depends on typing_extensions)
    from typing_extensions import Unpack

__all__ = [
    "BUDGETS",
    "EMBEDDINGS",
    "FREEZE_EVERY_CHOICES",
    "GRANULARITIES",
    "ORDERS",
    "SCHEDULES",
    "CallbackOptions",
    "CallbackOptionsKwargs",
    "FreezeOptions",
    "FreezeOptionsKwargs",
    "Unpack",
    "add_option_arguments",
    "document_options",
    "option",
]

SCHEDULES = ("linear", "adaptive")
DEFAULT_CACHE_MAX_BYTES = 4 * 2**30  # host memory for cached activations: 4 GiB
ORDERS = ("definition", "execution")
GRANULARITIES = ("module", "block")
EMBEDDINGS = ("unit", "merge", "skip")
BUDGETS = ("units", "params", "flops")
FREEZE_EVERY_CHOICES = ("auto", "epoch", "step")


def _fraction_start(name: str, value: object) -> float:
    return validate_freeze_start(value)


def _fraction_level(name: str, value: object) -> float:
    return validate_freeze_level(value)


def _fraction_start_level(name: str, value: object) -> float:
    return validate_freeze_start_level(value)  # at most freeze_level: checked in __post_init__, with both values


def _boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _positive_integer(unit: str | None) -> Check:
    """An integer >= 1; `unit` (what it counts) joins the message."""

    def check(name: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            what = f" ({unit})" if unit else ""
            raise ValueError(f"{name} must be an integer >= 1{what}, got {value!r}")
        return value

    return check


def _optional_positive_integer(name: str, value: object) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or an integer >= 1, got {value!r}")
    return value


def _positive_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _head(name: str, head: object) -> tuple[str, ...] | None:
    """`head` as a tuple of module names, or `None`; a `ValueError` for anything else."""
    if head is None:
        return None
    names = (head,) if isinstance(head, str) else head
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(
            f"{name} must be None, a module name or a non-empty list of module names (as in model.named_modules()), "
            f"got {head!r}"
        )
    return tuple(names)


_Options = TypeVar("_Options", bound="FreezeOptions")


@dataclass(frozen=True, kw_only=True)
class FreezeOptions:
    """
    The schedule and how units are chosen and frozen; the defaults are the method card's. See `LayerFreezer` for
    each option.

    Raises `ValueError` naming the option, the allowed values and the value received.

    Example:

    ```python
    >>> from hf_layer_freeze import FreezeOptions
    >>> FreezeOptions(freeze_start=0.2, budget="flops").freeze_level
    1.0
    >>> FreezeOptions(order="random")
    Traceback (most recent call last):
    ...
    ValueError: order must be one of ('definition', 'execution'), got 'random'

    ```
    """

    freeze_start: float = option(
        0.5,
        "Fraction of training, in [0, 1), at which freezing starts: nothing is frozen before it, then the frozen "
        "fraction grows linearly from `freeze_start_level` (at `freeze_start`) to `freeze_level` (at the end).",
        _fraction_start,
    )
    freeze_level: float = option(
        1.0, "Fraction of the units frozen at the end of training, in [0, 1].", _fraction_level
    )
    freeze_start_level: float = option(
        0.0,
        "Fraction of the units frozen at `freeze_start`, in [0, `freeze_level`]: the linear schedule grows from it to "
        "`freeze_level` (the default 0 is the method card's ramp). `freeze_start=0` with a level above 0 freezes "
        "that prefix from the first step: before the first optimizer step (the callback at `on_train_begin`; in a "
        "custom loop call `freezer.update(0.0)` before training). `freeze_start_level == freeze_level` is a static "
        'prefix. With `schedule="adaptive"` it is a floor: at least this fraction is frozen from `freeze_start` on, '
        "and more once it has settled.",
        _fraction_start_level,
    )
    order: str = option(
        "definition",
        'Which units come first. `"definition"`: depth-first order of the ownership tree (the method card\'s). '
        '`"execution"`: order of first use in a forward pass, recorded once on the first training batch, so the '
        "frozen set is a prefix of the computation even where the code defines modules in another order.",
        choices=ORDERS,
    )
    granularity: str = option(
        "module",
        'What a unit is. `"module"`: every module owning trainable parameters (a LoRA layer\'s A and B matrices are '
        "one). `\"block\"`: the model's own blocks, so no block is half frozen: a timm model's `group_matcher()` "
        "groups (stem, blocks, stages), a transformers model's layers (the classes it lists in `_no_split_modules`).",
        choices=GRANULARITIES,
    )
    embeddings: str = option(
        "unit",
        "What becomes of embedding units, which save no compute when frozen. An embedding unit is a unit all of "
        "whose parameters lie in embedding modules: modules holding an `nn.Embedding` and otherwise only lookups, "
        "norms and parameters of their own (BERT's `BertEmbeddings`, Llama's `embed_tokens`; a convolutional patch "
        'or stem embedding costs FLOPs and is none). `"unit"`: each is a unit like any other. `"merge"`: each joins '
        "the next unit that is no embedding (they freeze together, so a fraction counts units that save compute). "
        '`"skip"`: they are no unit and never freeze, so the backward still runs down to them and activation '
        "caching cannot engage. See `units.embedding_unit`.",
        choices=EMBEDDINGS,
    )
    budget: str = option(
        "units",
        'What the freeze fraction counts: `"units"` (the card\'s), `"params"` (cumulative parameters) or '
        '`"flops"` (cumulative forward FLOPs, counted once on the first training batch).',
        choices=BUDGETS,
    )
    freeze_batchnorm: bool = option(
        False,
        "Also freeze the running statistics of frozen BatchNorm layers (they normalize with them).",
        _boolean,
    )
    max_freeze_events: int | None = option(
        None,
        "At most this many distinct freeze events (the unit count is rounded down to evenly spaced levels). "
        "Unbounded by default, except for a compiled model: each event recompiles it, so the default keeps it within "
        "`torch._dynamo.config.recompile_limit`.",
        _optional_positive_integer,
        type="int",
        cli={"type": int},
    )
    schedule: str = option(
        "linear",
        'How many units to freeze. `"linear"`: the method card\'s, by the clock. `"adaptive"`: freeze a unit once '
        "its training has settled. Every `check_every` optimizer steps the mean gradient norm of each unit over the "
        "interval is compared with the previous interval's; the longest prefix of trainable units whose relative "
        "change is at most `change_threshold` times the median change of all trainable units is frozen (see "
        "`schedule.settled_prefix`). Never before `freeze_start`, never beyond `freeze_level`, always a prefix, never "
        "unfreezing. The gradient norms are read by a step pre-hook on the (first) optimizer that holds units; "
        "`update(progress)` makes the checks, so call it every step (the callback does).",
        choices=SCHEDULES,
    )
    check_every: int = option(
        20,
        '`schedule="adaptive"`: optimizer steps between two checks.',
        _positive_integer("optimizer steps between checks"),
    )
    change_threshold: float = option(
        1.0,
        '`schedule="adaptive"`: a unit has settled when its relative change is at most this times the median.',
        _positive_number,
    )
    head: tuple[str, ...] | None = option(
        None,
        "Names of the head modules (as in `model.named_modules()`, or of the model PEFT wraps), never frozen. By "
        "default the head is found by rule (see `heads.py`: PEFT, timm, transformers, a backbone inside your module), "
        "and where no rule applies the last unit is taken as head, with a warning naming it. Stored as a list in "
        "`to_dict()`.",
        _head,
        type="`str` or `list[str]`",
        cli={"nargs": "+"},
    )
    cache_activations: bool = option(
        False,
        "Activation caching (AutoFreeze, arXiv 2102.01386): once the embeddings and a prefix of blocks are frozen, "
        "keep the output of the last frozen block for each training example in host memory, keyed by the exact "
        "bytes of its inputs; a batch takes its cached examples from the cache and runs the prefix only on the "
        "others (bitwise where a batch is wholly computed or wholly served, to rounding where it mixes). The frozen "
        "prefix runs in eval mode (dropout off). transformers BERT, RoBERTa, ViT and Llama (PEFT on them included) "
        "and timm ViT and ResNet; other models get a `NotImplementedError`. See `activation_cache.py`.",
        _boolean,
    )
    cache_max_bytes: int = option(
        DEFAULT_CACHE_MAX_BYTES,
        "Host memory for the cached outputs and their keys, in bytes; past it, examples are computed.",
        _positive_integer("bytes of host memory"),
        default_doc="4 GiB",
    )
    offload_frozen_state: bool = option(
        False,
        "Move the frozen parameters' optimizer state (AdamW's two moments: twice the parameters' size) to host "
        "memory while they are frozen, pinned when it comes from a CUDA device, and back to its device when they "
        "train again and when the freezer gives the model back. Exact (a bitwise-equal run), checkpoints unchanged. "
        "FSDP and schedule-free optimizers get a `NotImplementedError`. See `state_offload.py`.",
        _boolean,
    )

    def __post_init__(self) -> None:
        for each in fields(self):
            value = each.metadata["check"](each.name, getattr(self, each.name))
            object.__setattr__(self, each.name, value)  # frozen dataclass: the normalized value (0 -> 0.0)
        validate_freeze_start_level(self.freeze_start_level, self.freeze_level)  # the one check of two options

    @classmethod
    def from_kwargs(cls: type[_Options], **kwargs: Any) -> _Options:
        """
        The options from a constructor's `**options`; a one-line `TypeError` names a keyword that is no option.

        Example:

        ```python
        >>> from hf_layer_freeze import FreezeOptions
        >>> FreezeOptions.from_kwargs(freeze_start=0.25).freeze_start
        0.25
        >>> FreezeOptions.from_kwargs(freeze_strat=0.25)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: unexpected keyword argument 'freeze_strat'; the options are freeze_start, freeze_level, ...

        ```
        """
        names = option_names(cls)
        unknown = [name for name in kwargs if name not in names]
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            raise TypeError(
                f"unexpected keyword argument{plural} {', '.join(map(repr, unknown))}; "
                f"the options are {', '.join(names)}"
            )
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The options as JSON-safe keyword arguments (tuples as lists)."""
        return {name: list(value) if isinstance(value, tuple) else value for name, value in asdict(self).items()}

    def freeze_options(self) -> FreezeOptions:
        """The `FreezeOptions` part (what `LayerFreezer` takes) of these options."""
        return FreezeOptions(**{name: getattr(self, name) for name in option_names(FreezeOptions)})


@dataclass(frozen=True, kw_only=True)
class CallbackOptions(FreezeOptions):
    """`FreezeOptions` and the options only `LayerFreezingCallback` has: when to freeze, and the hand-back."""

    freeze_every: str = option(
        "auto",
        '`"epoch"` to freeze at the end of each epoch (exactly the method card\'s), `"step"` to freeze as soon as '
        'the count of units grows, `"auto"`: `"epoch"` when at least 4 epoch ends fall after `freeze_start` and '
        'before the end of the run (`schedule.resolve_freeze_every`), `"step"` otherwise, and `"step"` when the '
        "Trainer does not know an epoch's length (a streaming `IterableDataset` trained for `max_steps`).",
        choices=FREEZE_EVERY_CHOICES,
    )
    keep_frozen: bool = option(
        False,
        "At the end of training the model is given back as it was given: frozen parameters require gradients again "
        "and are back in the optimizer (`LayerFreezer.unfreeze`), exactly those the callback froze, so a second "
        "`trainer.train()` trains what the first one was given. `True` leaves them frozen (and the user's: a later "
        "freezer treats them as frozen by hand). The model is given back on every exit path: when `trainer.train()` "
        "raises (an interrupt, an error; the callback wraps the Trainer's `train` for this, since no `on_train_end` "
        "comes), and before an attempt that `auto_find_batch_size` retries.",
        _boolean,
    )


class FreezeOptionsKwargs(TypedDict, total=False):
    """The keyword arguments of `FreezeOptions`, for `**options: Unpack[FreezeOptionsKwargs]` (types as accepted)."""

    freeze_start: float
    freeze_level: float
    freeze_start_level: float
    order: str
    granularity: str
    embeddings: str
    budget: str
    freeze_batchnorm: bool
    max_freeze_events: int | None
    schedule: str
    check_every: int
    change_threshold: float
    head: str | Sequence[str] | None
    cache_activations: bool
    cache_max_bytes: int
    offload_frozen_state: bool


class CallbackOptionsKwargs(FreezeOptionsKwargs, total=False):
    """The keyword arguments of `LayerFreezingCallback` (`CallbackOptions`)."""

    freeze_every: str
    keep_frozen: bool


def add_option_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    names: Iterable[str],
    options: type[FreezeOptions] = CallbackOptions,
) -> None:
    """
    Add a `--flag-name` for each named option to `parser`, with the option's default, its choices and the first
    sentence of its documentation as help; `args.flag_name` is the option's keyword. Values are validated by the
    options themselves when the parsed arguments reach `FreezeOptions`.

    Example:

    ```python
    >>> import argparse
    >>> from hf_layer_freeze.options import add_option_arguments
    >>> parser = argparse.ArgumentParser()
    >>> add_option_arguments(parser, ["freeze_start", "order"])
    >>> parser.parse_args(["--freeze-start", "0.25"])
    Namespace(freeze_start=0.25, order='definition')

    ```
    """
    add_arguments(parser, options, names)
