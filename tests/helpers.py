"""What the tests and the multi-process workers share: tiny models and data, free ports, digests to compare ranks
and runs, and an all-reduce counting hook. Imported as `from helpers import ...` (pytest puts `tests/` on the path;
the workers add it themselves)."""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Iterable

import timm
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from transformers import TrainerCallback


def tiny_timm(name: str = "resnet10t", num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A timm model small enough for 32x32 CPU tests, created without the hub."""
    torch.manual_seed(seed)
    kwargs = {"img_size": 32, "patch_size": 8} if name.startswith(("vit", "deit")) else {}
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


class RandomImages(torch.utils.data.Dataset):
    """Fixed random 32x32 images with labels, as dicts the Trainer and TimmWrapper understand."""

    def __init__(self, n: int = 64, num_classes: int = 10, seed: int = 0, size: int = 32) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, size, size, generator=generator)
        self.labels = torch.randint(0, num_classes, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def train_steps(model, optimizer, steps: int = 2, seed: int = 0, batch: int = 4) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        x = torch.randn(batch, 3, 32, 32, generator=generator)
        y = torch.randint(0, 10, (batch,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def free_port() -> int:
    """A TCP port nobody listens on right now, for a launcher's rendezvous (not derived from the process id, which
    two test sessions on one machine can share modulo 1000)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tensors_digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the tensors' bytes, in order: equal digests mean bitwise-equal tensors."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def params_digest(model: torch.nn.Module) -> str:
    # Parameters only: DDP re-broadcasts buffers (BatchNorm statistics) from rank 0 at each forward.
    return tensors_digest(model.parameters())


class CountingState:
    """Comm-hook state that counts the gradient elements handed to all-reduce."""

    def __init__(self, process_group=None):
        self.process_group = process_group
        self.elements = 0


def counting_allreduce_hook(state: CountingState, bucket):
    state.elements += bucket.buffer().numel()
    return default_hooks.allreduce_hook(state.process_group, bucket)


class StepWatch(TrainerCallback):
    """
    Watches every optimizer step of a `Trainer` run: `steps` gets, per step, (trainable tensors that changed,
    tensors still trainable after the step, frozen tensors that changed). List it after `LayerFreezingCallback`, so
    a tensor frozen at the end of a step is not counted as trainable for that step.
    """

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        still = [n for n in self.trainable if params[n].requires_grad]
        frozen = [n for n in self.before if n not in self.trainable]
        self.steps.append(
            (
                sum(not torch.equal(self.before[n], params[n]) for n in still),
                len(still),
                sum(not torch.equal(self.before[n], params[n]) for n in frozen),
            )
        )

    def trained_exactly_the_unfrozen(self) -> bool:
        """Every still-trainable tensor changed at every step, and no frozen one ever did."""
        return bool(self.steps) and all(changed == still and not moved for changed, still, moved in self.steps)


class RandomTokenDataset(torch.utils.data.Dataset):
    """Fixed random token sequences as dicts the Trainer understands: `labels` is a class (sequence classification)
    or, with `causal=True`, the tokens themselves (causal LM)."""

    def __init__(self, n: int = 40, length: int = 12, vocab: int = 100, num_classes: int = 3, causal: bool = False):
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=generator)
        self.classes = torch.randint(0, num_classes, (n,), generator=generator)
        self.causal = causal

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.ids[index]
        labels = ids if self.causal else self.classes[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


class FreezeTimeline(TrainerCallback):
    """
    Which parameters are frozen after every optimizer step of a `Trainer` run, read from `requires_grad` (the ground
    truth, not the freezer's own account). `trainable_at_begin` / `frozen_at_begin`: parameter names at
    `on_train_begin`; `steps[i]`: the names of `trainable_at_begin` frozen after step i + 1; `unfrozen_at_begin`: the
    names of `frozen_at_begin` (a PEFT base weight) that required a gradient after any step. List it after
    `LayerFreezingCallback`.
    """

    def __init__(self) -> None:
        self.steps: list[frozenset[str]] = []
        self.unfrozen_at_begin: set[str] = set()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        named = dict(model.named_parameters())
        self.trainable_at_begin = [n for n, p in named.items() if p.requires_grad]
        self.frozen_at_begin = {n for n, p in named.items() if not p.requires_grad}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        named = dict(model.named_parameters())
        self.steps.append(frozenset(n for n in self.trainable_at_begin if not named[n].requires_grad))
        self.unfrozen_at_begin |= {n for n in self.frozen_at_begin if named[n].requires_grad}

    def first_frozen_step(self, name: str) -> int | None:
        """The step (1-based) after which `name` was first frozen, `None` if never."""
        return next((i + 1 for i, frozen in enumerate(self.steps) if name in frozen), None)
