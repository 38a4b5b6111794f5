from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402


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


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)
