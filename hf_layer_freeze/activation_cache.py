"""Activation caching (opt-in, `cache_activations=True`): skip the frozen prefix's forward when training inputs repeat.

Freezing a prefix saves its backward and its optimizer update, never its forward. When the training examples repeat
from epoch to epoch (fine-tuning on a fixed tokenized or preprocessed dataset), the frozen prefix computes the same
output for the same example every epoch. AutoFreeze (Liu et al., arXiv 2102.01386) caches it and reports up to
2.55x on BERT fine-tuning; Egeria (Wang et al., arXiv 2201.06227) caches too. This listener does it for the model
families whose structure it knows:

- transformers BERT, RoBERTa, ViT and Llama (and PEFT models on them): the embeddings, then the layers listed in
  `_no_split_modules`, held in one `ModuleList`;
- timm `VisionTransformer` (patch embedding, then `blocks`) and `ResNet` (stem, then the stages `layer1`..`layer4`),
  bare or inside `TimmWrapperForImageClassification`.

Once the embeddings (or stem) and a prefix of blocks are all frozen, the output of the last frozen block (the *cut*)
for each training example is kept in host memory, keyed by the exact bytes of every input tensor of that example
(dtype and shape included; `labels` never reach the prefix and are left out): changed or augmented inputs simply
miss and are computed. A training batch takes each example that is cached from the cache and runs the prefix
only on the others (the *rows* of the batch that are not cached), so the share of rows served is the share of
examples cached, not that share to the power of the batch size:

- the modules of the prefix that own parameters (the embeddings or stem, then each block) run on the rows that need
  them: a row not cached needs every one, the embeddings (or stem) included, which take the model's raw inputs, of
  which those rows are taken; a row cached at an older cut needs the blocks frozen since (the frozen prefix grew:
  its entry then moves to the new cut); a row cached at the cut needs none;
- each such module returns the whole batch: the rows computed, the rows cached at it taken from the cache, zeros
  for the rows cached further on (no computation after the cut reads them on these families; modules that own no
  parameters, such as an activation or a rotary embedding, run on the whole batch, placeholders included);
- the rows computed at the cut are stored, as far as the budget holds them.

Exactness: a batch whose rows are all computed, or all served from one cut, runs every module of the prefix on the
whole batch, as an uncached run does, and is bitwise equal to it. A batch that mixes rows (cached and not, or cached
at different cuts) runs modules on a sub-batch, whose kernels may round differently for another batch size: its rows
match an uncached run to floating-point rounding (tested to 1e-5 on one step of a tiny Llama, BERT and timm ResNet),
not bitwise.

Counted for the logs: the forwards served entirely, the rows served, and the prefix's forward FLOPs those rows did
not compute. The FLOPs of each module of the prefix are counted once per input signature (per-example shapes and
dtypes), with `torch.utils.flop_counter.FlopCounterMode`, on the first forward that runs it for that signature (on
one row beside it, without gradient, when its inputs require one), and credited per row served; counting changes
nothing that is computed.

With caching on, the frozen prefix runs in eval mode whether a step hits or misses (dropout, timm's drop-path and
drop-block off, BatchNorm on its running statistics), so a cached output is exactly what the prefix computes: a
warning names what that turns off. A hit skips the prefix's modules, and so the forward hooks on them: while a
foreign forward hook or pre-hook is on the prefix (`forward_hooks.py` says which are foreign), or a pre-hook above it
that could change its inputs after they were keyed, or a global one, steps are computed and not stored (a warning
names each hook, once). NEFTune (`TrainingArguments(neftune_noise_alpha=...)`) is refused by name: it noises the
embeddings only in training mode and differently at every step, so the prefix's output never repeats.

Past `cache_max_bytes` (outputs and keys together), new examples are computed and not stored (the budget is checked
before anything is copied to the host, and only the rows that fit are copied); nothing is ever served that was not
computed from the same inputs by the same frozen weights (unfreezing empties the cache). A cache that serves nothing
costs one walk over the prefix's modules per step (eval mode, foreign hooks) and the examples' keys.

Not supported, refused by name: compiled models (the cache decides in Python per step), FSDP (each frozen module
gathers its shards in forward: ranks that skip it would desynchronize the collectives).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .batchnorm import keeps_eval_mode
from .cache_keys import batch_size, example_keys, take_rows
from .cache_layout import PrefixLayout, prefix_layout
from .events import FreezeEvent
from .forward_hooks import (
    ForeignHook,
    check_hook_internals,
    foreign_forward_hooks,
    foreign_global_forward_hooks,
    may_be_parametrized,
    walk_modules,
)
from .shard_sampler import FixedShardSampler
from .wrappers import is_compiled, unwrap_model, wrapper_chain

logger = logging.getLogger(__name__)

__all__ = ["ActivationCache", "FixedShardSampler", "PrefixLayout", "prefix_layout"]

DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _frozen(module: nn.Module) -> bool:
    return all(not p.requires_grad for p in module.parameters())


MISSING = -2  # the cut of a row that is not in the cache: it needs every level, the `before` modules (-1) included


@dataclass
class _Entry:
    cut: int
    output: torch.Tensor  # one example's output of block `cut`, on the host
    nbytes: int


@dataclass
class _Step:
    """What the current training forward does: for each row, its cached entry (`None`: not cached) and the cut it was
    cached at (`MISSING` when not cached)."""

    keys: list[bytes]
    batch: int
    signature: tuple
    entries: list[_Entry | None]
    cuts: list[int]
    served: int  # rows taken from the cache; 0: the prefix runs on the whole batch as without caching
    shapes: dict[int, tuple] = field(default_factory=dict)


class ActivationCache:
    """
    A freeze listener that caches the frozen prefix's output per training example and, for the examples of a batch
    that are cached, skips the prefix's forward: it runs only on the rows that are not (see the module docstring).

    Args:
        model (`torch.nn.Module`):
            The model, bare or wrapped (DDP, PEFT).
        max_bytes (`int`):
            Host-memory budget for cached outputs and their keys, in bytes.

    Attributes:
        total_steps, total_hits (`int`): training forwards looked up, and those served entirely, over its life.
        total_rows, total_rows_served (`int`): their rows (examples), and those taken from the cache.
        total_flops_skipped (`float`): forward FLOPs of the prefix not computed for the rows served.

    Raises:
        `NotImplementedError`: a model family it does not know, a compiled model, FSDP, NEFTune's hook on the prefix
            (here, or at the first training forward after it was registered).
    """

    def __init__(self, model: nn.Module, max_bytes: int) -> None:
        from .distributed import is_fsdp_managed

        if is_compiled(model):
            raise NotImplementedError(
                "cache_activations=True does not support a compiled model: the cache decides in Python at each step "
                "whether the prefix runs. Train uncompiled, or use cache_activations=False."
            )
        if any(is_fsdp_managed(module) for module in wrapper_chain(model)):  # FSDP1 at the root only included
            raise NotImplementedError(
                "cache_activations=True does not support FSDP: ranks that skip a frozen module's forward would skip "
                "its all-gather. Use DDP, or cache_activations=False."
            )
        check_hook_internals()
        self.model = unwrap_model(model)
        self.layout = prefix_layout(self.model)
        self.max_bytes = max_bytes
        self.cut = -1
        self.bytes = 0
        self._entries: dict[bytes, _Entry] = {}
        self._shapes: dict[tuple, dict[int, tuple]] = {}  # input signature -> module index -> (shape, dtype)
        # (input signature, module index) -> one example's forward FLOPs of that module, counted at its first run
        self._flops: dict[tuple, float] = {}
        self._levels: list[int] = []  # module index -> level (-1: before the blocks)
        self._step: _Step | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._wrapped: list[tuple[nn.Module, Callable]] = []
        self._warned_eval_mode = False
        self._warned_hooks: set[tuple[int, str]] = set()
        # since the last `take_metrics()`
        self.steps = self.hits = self.rows = self.rows_served = 0
        self.flops_skipped = 0.0
        # over the freezer's life
        self.total_steps = self.total_hits = self.total_rows = self.total_rows_served = 0
        self.total_flops_skipped = 0.0
        # The Trainer activates NEFTune in `train()`, before the callbacks' on_train_begin builds this: refuse it now.
        self._refuse_neftune(self._foreign_hooks(walk_modules([*self.layout.before, *self.layout.blocks])))

    @classmethod
    def from_freezer(cls, freezer: Any) -> ActivationCache | None:
        """With `cache_activations=True`: the model as given (a compiled one is refused), `cache_max_bytes`; warns
        when the freezer can never freeze what the cache needs frozen (`warn_if_never_served`)."""
        if not freezer.options.cache_activations:
            return None
        cache = cls(freezer.model, freezer.options.cache_max_bytes)
        cache.warn_if_never_served(freezer.units, freezer.options.embeddings)
        return cache

    def warn_if_never_served(self, units: Any, embeddings: str = "unit") -> None:
        """
        Warn, naming them, when parameters the cache needs frozen (those of the modules before the first block and of
        the modules above the blocks) train and are in none of the freezer's `units`, so no prefix can ever be cached:
        `embeddings="skip"`, an embedding tied to the head (a tied Llama's `embed_tokens` is the head's), a
        `head` option naming the embeddings.
        """
        in_units = {id(p) for unit in units for p in unit.parameters}
        needed = [*(p for m in self.layout.before for p in m.parameters()), *self.layout.ancestor_parameters]
        names = {id(p): n for n, p in self.model.named_parameters()}
        never = sorted({names.get(id(p), "?") for p in needed if p.requires_grad and id(p) not in in_units})
        if never:
            if embeddings == "skip":
                why = 'embeddings="skip" keeps them training'
            else:
                why = "they are in no freezable unit (an embedding tied to the head is the head's, never frozen)"
            shown = ", ".join(never[:4]) + (f" and {len(never) - 4} more" if len(never) > 4 else "")
            warnings.warn(
                f"cache_activations=True can never serve: the cache needs {shown} frozen, and {why}. Use "
                'embeddings="unit" or "merge", untied embeddings, or cache_activations=False.',
                stacklevel=3,
            )

    def metrics(self) -> dict[str, float]:
        """The listener's metrics for `LayerFreezer.metrics()`: `take_metrics()`."""
        return self.take_metrics()

    # --- listener -------------------------------------------------------------------------------------------------
    def on_freeze_event(self, event: FreezeEvent) -> None:
        if event.unfrozen:  # blocks train again: nothing cached stays true
            self._entries.clear()
            self.bytes = 0
        cut = -1
        ancestors_frozen = not any(p.requires_grad for p in self.layout.ancestor_parameters)
        if ancestors_frozen and all(_frozen(m) for m in self.layout.before):
            for index, block in enumerate(self.layout.blocks):
                if not _frozen(block):
                    break
                cut = index
        if cut != self.cut and cut >= 0:
            logger.info("Activation cache: the frozen prefix ends at block %d of %d.", cut, len(self.layout.blocks))
        elif cut != self.cut:
            logger.info("Activation cache: no frozen prefix to cache (the embeddings and the first block train).")
        self.cut = cut
        if cut >= 0 and not self._handles:
            self._install()
        if cut >= 0:
            self._warn_about_eval_mode()

    def close(self) -> None:
        """Remove the hooks and the forward wrappers, and drop every cached output."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, wrapper in self._wrapped:
            if module.__dict__.get("forward") is wrapper:
                del module.forward
        self._wrapped.clear()
        self._entries.clear()
        self.bytes = 0
        self._step = None

    def take_metrics(self) -> dict[str, float]:
        """
        The cache's metrics since the last call, under `layer_freeze/`:

        - `cache_hit_rate`: the share of training forwards served entirely from the cache (the prefix's forward
          skipped for every row);
        - `cache_rows_served`: the rows (examples) taken from the cache; `cache_row_hit_rate`: their share of the
          rows of those forwards;
        - `cache_forward_flops_skipped`: the prefix's forward FLOPs not computed for those rows;
        - `cache_bytes`: host memory held now.

        All but `cache_bytes` are left out when there was no training forward since the last call.
        """
        metrics: dict[str, float] = {"layer_freeze/cache_bytes": self.bytes}
        if self.steps:  # no training forward since the last call (the Trainer's closing log): no rate to report
            metrics["layer_freeze/cache_hit_rate"] = self.hits / self.steps
            metrics["layer_freeze/cache_rows_served"] = self.rows_served
            if self.rows:
                metrics["layer_freeze/cache_row_hit_rate"] = self.rows_served / self.rows
            metrics["layer_freeze/cache_forward_flops_skipped"] = self.flops_skipped
        self.steps = self.hits = self.rows = self.rows_served = 0
        self.flops_skipped = 0.0
        return metrics

    # --- hooks ----------------------------------------------------------------------------------------------------
    def _modules(self) -> list[tuple[int, nn.Module]]:
        """(level, module): the `before` modules that own parameters at level -1, then each block at its index."""
        owning = [m for m in self.layout.before if any(True for _ in m.parameters())]
        return [(-1, m) for m in owning] + list(enumerate(self.layout.blocks))

    def _install(self) -> None:
        self._handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_forward, always_call=True))
        for index, (level, module) in enumerate(self._modules()):
            wrapper = self._wrap(module, level, index, module.forward)
            module.forward = wrapper  # the way Accelerate's hooks replace a module's forward
            self._wrapped.append((module, wrapper))
            self._levels.append(level)

    def _region(self) -> list[nn.Module]:
        return [*self.layout.before, *self.layout.blocks[: self.cut + 1]]

    def _warn_about_eval_mode(self) -> None:
        if self._warned_eval_mode:
            return
        turned_off = _training_only_behaviour(m for r in self._region() for m in r.modules())
        if turned_off:
            warnings.warn(
                "cache_activations=True: the frozen prefix runs in eval mode, cached or not, so what acts only in "
                f"training mode there is off: {'; '.join(turned_off)} (a cached output is exactly what the prefix "
                "computes).",
                stacklevel=4,
            )
            self._warned_eval_mode = True

    # --- forward hooks a hit would skip ---------------------------------------------------------------------------
    def _foreign_hooks(self, prefix: list[nn.Module]) -> list[ForeignHook]:
        """The foreign hooks a hit would skip or feed stale values: those on every module of `prefix` (every module
        of the frozen prefix, from `walk_modules`), the pre-hooks of the modules above it and the model's pre-hooks
        that run after the cache's (they may change the prefix's inputs after the cache keyed them), and the global
        ones."""
        found = foreign_global_forward_hooks()
        found += foreign_forward_hooks(prefix)
        found += self._changed_without_hooks(prefix)
        found += foreign_forward_hooks(self.layout.above, pre_hooks_only=True)
        if self._handles:
            found += foreign_forward_hooks([self.model], pre_hooks_only=True, after=self._handles[0].id)
        return found

    def _changed_without_hooks(self, modules: list[nn.Module]) -> list[ForeignHook]:
        """What changes a prefix module's output without a torch hook, which a hit would skip just the same: a
        `forward` replaced on the instance (Accelerate's `add_hook_to_module`, a monkey-patch; the cache's own
        wrappers excepted) and a parametrization (`torch.nn.utils.parametrize`)."""
        ours = {id(wrapper) for _, wrapper in self._wrapped}
        found = []
        for module in modules:
            forward = vars(module).get("forward")
            if forward is not None and id(forward) not in ours:
                name = getattr(forward, "__qualname__", type(forward).__name__)
                found.append(ForeignHook(module, "replaced forward", name, neftune=False))
            if may_be_parametrized(module) and parametrize.is_parametrized(module):
                found.append(ForeignHook(module, "parametrization", type(module).__name__, neftune=False))
        return found

    def _describe(self, hooks: list[ForeignHook]) -> str:
        names = {id(m): n for n, m in self.model.named_modules()}
        return ", ".join(
            f"{h.kind} {h.name}" + ("" if h.module is None else f" on {names.get(id(h.module)) or '<the model>'}")
            for h in hooks
        )

    def _refuse_neftune(self, hooks: list[ForeignHook]) -> None:
        neftune = [h for h in hooks if h.neftune]
        if neftune:
            raise NotImplementedError(
                f"cache_activations=True does not support NEFTune ({self._describe(neftune)}; "
                "TrainingArguments(neftune_noise_alpha=...) registers it): NEFTune noises the embeddings differently "
                "at every training step, so the frozen prefix's output never repeats, and the cache runs the prefix "
                "in eval mode, where the hook adds no noise. Use neftune_noise_alpha=None, or cache_activations=False."
            )

    def _compute_because_of(self, hooks: list[ForeignHook]) -> None:
        """Refuse NEFTune; for any other foreign hook, warn once that steps are computed while it is there."""
        self._refuse_neftune(hooks)
        new = [h for h in hooks if (id(h.module), h.name) not in self._warned_hooks]
        if new:
            self._warned_hooks.update((id(h.module), h.name) for h in new)
            warnings.warn(
                f"cache_activations=True: {self._describe(new)} would be skipped by a step served from the cache, so "
                "training steps are computed in full, and not cached, while it is registered (the frozen prefix "
                "still runs in eval mode: a hook that acts only in training mode does nothing there).",
                stacklevel=2,
            )

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        self._step = None
        if self.cut < 0 or not (module.training and torch.is_grad_enabled()):
            return None
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            return None  # the skipped layers' outputs are asked for: compute them
        # one walk over the prefix at every step: a hook may come at any time, and `model.train()` comes every step
        prefix = walk_modules(self._region())
        _put_in_eval_mode(prefix)
        foreign = self._foreign_hooks(prefix)
        if foreign:
            self._compute_because_of(foreign)
            self._count(batch_size(args, kwargs), served=0, whole=False, flops=0.0)
            return None
        keyed = example_keys(args, kwargs)
        if keyed is None:
            return None
        keys, batch, signature = keyed
        entries = [self._entries.get(key) for key in keys]
        served = sum(entry is not None for entry in entries)
        if served and signature not in self._shapes:  # cannot happen: an entry's signature was computed once
            entries, served = [None] * batch, 0
        cuts = [MISSING if entry is None else entry.cut for entry in entries]
        flops = sum(self._prefix_flops(signature, cut) for cut in cuts if cut != MISSING)
        self._count(batch, served, served == batch, flops)
        self._step = _Step(keys, batch, signature, entries, cuts, served, self._shapes.setdefault(signature, {}))
        if self.layout.use_cache_input and kwargs.get("use_cache") is not False:
            return args, {**kwargs, "use_cache": False}
        return None

    def _count(self, batch: int, served: int, whole: bool, flops: float) -> None:
        self.steps += 1
        self.total_steps += 1
        self.hits += whole
        self.total_hits += whole
        self.rows += batch
        self.total_rows += batch
        self.rows_served += served
        self.total_rows_served += served
        self.flops_skipped += flops
        self.total_flops_skipped += flops

    def _prefix_flops(self, signature: tuple, cut: int) -> float:
        """One example's forward FLOPs of the prefix's modules up to block `cut` (those a row cached there skips)."""
        levels = enumerate(self._levels)
        return sum(self._flops.get((signature, index), 0.0) for index, level in levels if level <= cut)

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._step = None

    def _wrap(self, module: nn.Module, level: int, index: int, original: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            step = self._step
            if step is None or level > self.cut:
                return original(*args, **kwargs)
            if not step.served:  # nothing cached: the whole batch runs as without caching
                output = self._run(step, index, original, args, kwargs)
                self._check(output, step.batch, level)
                step.shapes[index] = (tuple(output.shape[1:]), output.dtype)
                if level == self.cut:
                    self._store(step, output.detach(), range(step.batch), level)
                return output
            return self._serve(step, index, level, original, args, kwargs)

        return forward

    def _run(self, step: _Step, index: int, original: Callable, args: tuple, kwargs: dict) -> Any:
        """`original(*args, **kwargs)`; the first time this module runs for inputs of this signature, its forward
        FLOPs are counted too (for `cache_forward_flops_skipped`), without changing what it computes."""
        key = (step.signature, index)
        if key in self._flops:
            return original(*args, **kwargs)
        from torch.utils.flop_counter import FlopCounterMode

        rows = _rows_of(args, kwargs)
        if torch.is_grad_enabled() and _requires_grad((args, kwargs)):
            # FlopCounterMode's module tracker would hook into this forward's backward: count one row on the side,
            # without gradient (eval mode, no state changed), and run the batch untouched
            output = original(*args, **kwargs)
            first = torch.zeros(1, dtype=torch.long)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                original(*take_rows(args, rows, first), **take_rows(kwargs, rows, first))
            self._flops[key] = float(counter.get_total_flops())
            return output
        with FlopCounterMode(display=False) as counter:
            output = original(*args, **kwargs)
        self._flops[key] = counter.get_total_flops() / max(1, rows)
        return output

    def _check(self, output: Any, rows: int, level: int) -> None:
        if not isinstance(output, torch.Tensor) or output.shape[:1] != (rows,):
            raise NotImplementedError(
                f"cache_activations=True: {type(self.layout.blocks[0]).__name__ if level >= 0 else 'a module'} "
                f"returned {type(output).__name__}, not one tensor of batch size {rows}; this model cannot be "
                "cached. Use cache_activations=False."
            )

    # --- a miss: keep what fits ------------------------------------------------------------------------------------
    def _store(self, step: _Step, output: torch.Tensor, rows: range | list[int], cut: int) -> None:
        """Keep the rows of `output` that fit in the budget; only those are copied to the host."""
        row_bytes = output[0].numel() * output.element_size() if len(output) else 0
        fitting, projected = [], self.bytes
        for row in rows:
            key = step.keys[row]
            old = self._entries.get(key)
            delta = row_bytes + len(key) - (old.nbytes if old is not None else 0)
            if projected + delta <= self.max_bytes:  # past it: computed each time, never served stale
                fitting.append(row)
                projected += delta
        if not fitting:
            return
        if len(fitting) == step.batch:
            host = output.to("cpu")
        else:
            host = output.index_select(0, torch.tensor(fitting, device=output.device)).to("cpu")
        for position, row in enumerate(fitting):
            key = step.keys[row]
            tensor = host[position].clone()  # its own storage: an entry never holds its batch's memory
            nbytes = row_bytes + len(key)
            old = self._entries.get(key)
            delta = nbytes - (old.nbytes if old is not None else 0)
            if self.bytes + delta > self.max_bytes:
                continue  # an example twice in one batch
            self._entries[key] = _Entry(cut, tensor, nbytes)
            self.bytes += delta

    # --- some rows cached: run the prefix on the others -----------------------------------------------------------
    def _serve(self, step: _Step, index: int, level: int, original: Callable, args: tuple, kwargs: dict) -> Any:
        """The batch's output of this module: computed for the rows cached before it (or not at all), taken from the
        cache for the rows cached at it, zeros for the rows cached after it (no computation after the cut reads
        them on the supported families)."""
        need = [row for row, cut in enumerate(step.cuts) if cut < level]
        here = [row for row, cut in enumerate(step.cuts) if cut == level]
        device = _device_of(args, kwargs, self.layout.blocks[0])
        if not need and len(here) == step.batch:
            output = torch.stack([entry.output for entry in step.entries]).to(device)
        elif not need:
            shape, dtype = step.shapes[index]
            output = torch.zeros((step.batch, *shape), dtype=dtype, device=device)
        else:
            with torch.no_grad():
                if len(need) == step.batch:  # a block frozen since all these rows were cached
                    output = self._run(step, index, original, args, kwargs)
                    self._check(output, step.batch, level)
                else:
                    select = torch.tensor(need, device=device)
                    sub_args, sub_kwargs = take_rows(args, step.batch, select), take_rows(kwargs, step.batch, select)
                    computed = self._run(step, index, original, sub_args, sub_kwargs)
                    self._check(computed, len(need), level)
                    # the other rows wait for their own cut (a stage may change the shape: a new tensor)
                    output = computed.new_zeros((step.batch, *computed.shape[1:])).index_copy(0, select, computed)
        if here and len(here) < step.batch:
            cached = torch.stack([step.entries[row].output for row in here]).to(device, output.dtype)
            output = output.index_copy(0, torch.tensor(here, device=device), cached)
        step.shapes[index] = (tuple(output.shape[1:]), output.dtype)  # for rows served from a deeper cut
        if level == self.cut and need:
            self._store(step, output, need, level)  # computed rows, new or moving to the new cut
        return output


def _put_in_eval_mode(modules: list[nn.Module]) -> None:
    """`module.eval()` on each of `modules` (every module of the prefix, at every training step), at a fraction of
    its cost: where a class keeps `nn.Module.train`, the flag is set as `Module.__setattr__` itself ends up setting
    a plain attribute (its parameter, buffer and submodule checks are what cost)."""
    for module in modules:
        if module.training:
            if type(module).train is nn.Module.train:
                object.__setattr__(module, "training", False)
            else:
                module.train(False)


def _requires_grad(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.requires_grad
    if isinstance(value, (tuple, list)):
        return any(_requires_grad(v) for v in value)
    if isinstance(value, dict):
        return any(_requires_grad(v) for v in value.values())
    return False


def _rows_of(args: tuple, kwargs: dict) -> int:
    """The batch size of a prefix module's inputs: the first dimension of its first tensor of at least 2."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim >= 2:
            return value.shape[0]
    return 1


def _training_only_behaviour(modules: Any) -> list[str]:
    """What eval mode turns off among `modules`, in words: dropout, timm's drop-path and drop-block (`drop_prob`),
    attention dropout held as a float (transformers' attention modules), BatchNorm's batch statistics."""
    dropout = drop_path = attention = batchnorm = 0
    for m in modules:
        if isinstance(m, DROPOUT_LAYERS):
            dropout += m.p > 0
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            batchnorm += m.track_running_stats and not keeps_eval_mode(m)  # freeze_batchnorm=True already locks it
        elif _positive(getattr(m, "drop_prob", None)):
            drop_path += 1
        elif _positive(getattr(m, "attention_dropout", None)):
            attention += 1
    return [
        f"{count} {what}"
        for count, what in (
            (dropout, "dropout layer(s)"),
            (drop_path, "drop-path/drop-block layer(s) (stochastic depth)"),
            (attention, "attention module(s) with attention dropout"),
            (batchnorm, "BatchNorm layer(s), now on their running statistics"),
        )
        if count
    ]


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _device_of(args: tuple, kwargs: dict, fallback: nn.Module) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return next(fallback.parameters()).device
