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
miss and are computed. A training step whose examples are all cached skips the prefix: the frozen modules before the
cut return placeholders (zeros of the shape they returned for inputs of this shape, which no computation after the
cut reads on these families) and the cut returns the cached outputs. When the frozen prefix grows, outputs cached at
an older cut serve the new one: only the blocks frozen since run on them, and the entry moves to the new cut. When
the examples of one batch were cached at different cuts, each block runs on the rows that need it (a sub-batch, so
those rows match an uncached run to floating-point rounding rather than bitwise).

With caching on, the frozen prefix runs in eval mode whether a step hits or misses (dropout, timm's drop-path and
drop-block off, BatchNorm on its running statistics), so a cached output is exactly what the prefix computes: a
warning names what that turns off. A hit skips the prefix's modules, and so the forward hooks on them: while a
foreign forward hook or pre-hook is on the prefix (`forward_hooks.py` says which are foreign), or a pre-hook above it
that could change its inputs after they were keyed, or a global one, steps are computed and not stored (a warning
names each hook, once). NEFTune (`TrainingArguments(neftune_noise_alpha=...)`) is refused by name: it noises the
embeddings only in training mode and differently at every step, so the prefix's output never repeats.

Past `cache_max_bytes` (outputs and keys together), new examples are computed and not stored; nothing is ever served
that was not computed from the same inputs by the same frozen weights (unfreezing empties the cache).

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
from .cache_keys import example_keys, take_rows
from .cache_layout import PrefixLayout, prefix_layout
from .events import FreezeEvent
from .forward_hooks import ForeignHook, check_hook_internals, foreign_forward_hooks, foreign_global_forward_hooks
from .shard_sampler import FixedShardSampler
from .wrappers import is_compiled, unwrap_model

logger = logging.getLogger(__name__)

__all__ = ["ActivationCache", "FixedShardSampler", "PrefixLayout", "prefix_layout"]

DROPOUT_LAYERS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _frozen(module: nn.Module) -> bool:
    return all(not p.requires_grad for p in module.parameters())


@dataclass
class _Entry:
    cut: int
    output: torch.Tensor  # one example's output of block `cut`, on the host
    nbytes: int


@dataclass
class _Step:
    """What the current training forward does: `entries` is None on a miss."""

    keys: list[bytes]
    batch: int
    signature: tuple
    entries: list[_Entry] | None = None
    hidden: torch.Tensor | None = None  # a hit: the batch's state at the block being run
    shapes: dict[int, tuple] = field(default_factory=dict)


class ActivationCache:
    """
    A freeze listener that caches the frozen prefix's output per training example and skips the prefix's forward
    when a whole batch is cached (see the module docstring).

    Args:
        model (`torch.nn.Module`):
            The model, bare or wrapped (DDP, PEFT).
        max_bytes (`int`):
            Host-memory budget for cached outputs and their keys, in bytes.

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
        if is_fsdp_managed(unwrap_model(model)):
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
        self._step: _Step | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._wrapped: list[tuple[nn.Module, Callable]] = []
        self._warned_eval_mode = False
        self._warned_hooks: set[tuple[int, str]] = set()
        self.steps = self.hits = 0  # since the last `take_metrics()`
        self.total_steps = self.total_hits = 0  # over the freezer's life
        # The Trainer activates NEFTune in `train()`, before the callbacks' on_train_begin builds this: refuse it now.
        self._refuse_neftune(self._foreign_hooks([*self.layout.before, *self.layout.blocks]))

    @classmethod
    def from_freezer(cls, freezer: Any) -> ActivationCache | None:
        """With `cache_activations=True`: the model as given (a compiled one is refused), `cache_max_bytes`."""
        return cls(freezer.model, freezer.options.cache_max_bytes) if freezer.options.cache_activations else None

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
        if cut != self.cut:
            logger.info("Activation cache: the frozen prefix ends at block %d of %d.", cut, len(self.layout.blocks))
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
        """`layer_freeze/cache_hit_rate` (share of training forwards since the last call served from the cache; left
        out when there was none) and `layer_freeze/cache_bytes` (host memory held now)."""
        metrics: dict[str, float] = {"layer_freeze/cache_bytes": self.bytes}
        if self.steps:  # no training forward since the last call (the Trainer's closing log): no rate to report
            metrics["layer_freeze/cache_hit_rate"] = self.hits / self.steps
        self.steps = self.hits = 0
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
        """The foreign hooks a hit would skip or feed stale values: those on every module of `prefix`, the pre-hooks
        of the modules above it and the model's pre-hooks that run after the cache's (they may change the prefix's
        inputs after the cache keyed them), and the global ones."""
        found = foreign_global_forward_hooks()
        found += foreign_forward_hooks(m for top in prefix for m in top.modules())
        found += self._changed_without_hooks(m for top in prefix for m in top.modules())
        found += foreign_forward_hooks(self.layout.above, pre_hooks_only=True)
        if self._handles:
            found += foreign_forward_hooks([self.model], pre_hooks_only=True, after=self._handles[0].id)
        return found

    def _changed_without_hooks(self, modules: Any) -> list[ForeignHook]:
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
            if parametrize.is_parametrized(module):
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
        region = self._region()
        for region_module in region:
            region_module.eval()
        foreign = self._foreign_hooks(region)
        if foreign:  # checked at every step: a hook may come at any time
            self._compute_because_of(foreign)
            self.steps += 1
            self.total_steps += 1
            return None
        keyed = example_keys(args, kwargs)
        if keyed is None:
            return None
        keys, batch, signature = keyed
        entries = [self._entries.get(key) for key in keys]
        self.steps += 1
        self.total_steps += 1
        step = _Step(keys=keys, batch=batch, signature=signature)
        if all(e is not None for e in entries) and signature in self._shapes:
            step.entries = entries
            step.shapes = self._shapes[signature]
            self.hits += 1
            self.total_hits += 1
        self._step = step
        if self.layout.use_cache_input and kwargs.get("use_cache") is not False:
            return args, {**kwargs, "use_cache": False}
        return None

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._step = None

    def _wrap(self, module: nn.Module, level: int, index: int, original: Callable) -> Callable:
        def forward(*args: Any, **kwargs: Any) -> Any:
            step = self._step
            if step is None or level > self.cut:
                return original(*args, **kwargs)
            if step.entries is None:
                output = original(*args, **kwargs)
                self._record(step, index, level, output)
                return output
            return self._serve(step, index, level, original, args, kwargs)

        return forward

    # --- a miss: compute, and keep ------------------------------------------------------------------------------
    def _record(self, step: _Step, index: int, level: int, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.shape[:1] != (step.batch,):
            raise NotImplementedError(
                f"cache_activations=True: {type(self.layout.blocks[0]).__name__ if level >= 0 else 'a module'} "
                f"returned {type(output).__name__}, not one tensor of batch size {step.batch}; this model cannot be "
                "cached. Use cache_activations=False."
            )
        self._shapes.setdefault(step.signature, {})[index] = (tuple(output.shape[1:]), output.dtype)
        if level == self.cut:
            self._store(step, output.detach(), range(step.batch), level)

    def _store(self, step: _Step, output: torch.Tensor, rows: range | list[int], cut: int) -> None:
        host = output.to("cpu")
        for row in rows:
            key = step.keys[row]
            tensor = host[row].clone()
            nbytes = tensor.numel() * tensor.element_size() + len(key)
            old = self._entries.get(key)
            delta = nbytes - (old.nbytes if old is not None else 0)
            if self.bytes + delta > self.max_bytes:
                continue  # over budget: computed each time, never served stale
            self._entries[key] = _Entry(cut, tensor, nbytes)
            self.bytes += delta

    # --- a hit: skip the prefix -----------------------------------------------------------------------------------
    def _serve(self, step: _Step, index: int, level: int, original: Callable, args: tuple, kwargs: dict) -> Any:
        device = _device_of(args, kwargs, self.layout.blocks[0])
        lowest = min(entry.cut for entry in step.entries)
        if level < lowest:
            shape, dtype = step.shapes[index]
            return torch.zeros((step.batch, *shape), dtype=dtype, device=device)
        if level == lowest:
            rows = [r for r, e in enumerate(step.entries) if e.cut == level]
            if len(rows) == step.batch:
                step.hidden = torch.stack([e.output for e in step.entries]).to(device)
            else:
                shape, dtype = step.shapes[index]
                step.hidden = torch.zeros((step.batch, *shape), dtype=dtype, device=device)
                self._place(step, rows, device)
            step.shapes[index] = (tuple(step.hidden.shape[1:]), step.hidden.dtype)
            return step.hidden
        # a block frozen since some of these rows were cached: run it on those rows only
        rows = [r for r, e in enumerate(step.entries) if e.cut < level]
        hidden = step.hidden
        args, kwargs = (args[1:], kwargs) if args else ((), {k: v for k, v in kwargs.items() if k != "hidden_states"})
        with torch.no_grad():
            if len(rows) == step.batch:
                step.hidden = original(hidden, *args, **kwargs)
            else:
                select = torch.tensor(rows, device=hidden.device)
                sub_args, sub_kwargs = take_rows(args, step.batch, select), take_rows(kwargs, step.batch, select)
                computed = original(hidden.index_select(0, select), *sub_args, **sub_kwargs)
                # the other rows wait for their own cut (a stage may change the shape: a new tensor)
                waiting = computed.new_zeros((step.batch, *computed.shape[1:]))
                step.hidden = waiting.index_copy(0, select, computed)
        self._place(step, [r for r, e in enumerate(step.entries) if e.cut == level], device)
        step.shapes[index] = (tuple(step.hidden.shape[1:]), step.hidden.dtype)  # for hits from a deeper cut
        if level == self.cut:
            self._store(step, step.hidden, rows, level)  # these rows move to the new cut
        return step.hidden

    def _place(self, step: _Step, rows: list[int], device: torch.device) -> None:
        """Put the cached outputs of `rows` (cached at the block being run) into the batch's state."""
        if rows:
            cached = torch.stack([step.entries[r].output for r in rows]).to(device, step.hidden.dtype)
            step.hidden = step.hidden.index_copy(0, torch.tensor(rows, device=device), cached)


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
