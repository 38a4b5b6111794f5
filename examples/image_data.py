"""Image-classification data for the examples: an embedded default, any Hub dataset, or an image folder.

The default needs no network: scikit-learn ships the UCI handwritten digits (1,797 real 8x8 grey images of 10
classes) inside its package. They become a `datasets.Dataset` with a fixed, stratified train/test split and are
upsampled to a small RGB size, so a timm model sees ordinary images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

IMAGE_COLUMNS = ("image", "img", "pixel_values", "images")
LABEL_COLUMNS = ("label", "labels", "fine_label", "target")
MATERIALIZE_MAX_IMAGES = 20_000
datasets.disable_progress_bars()  # the examples draw their own progress bars

METRIC_PATH = str(Path(__file__).resolve().parent / "metrics" / "accuracy")


@dataclass
class ImageData:
    train: datasets.Dataset
    test: datasets.Dataset
    num_classes: int
    source: str


def digits_dataset(seed: int = 0, test_size: float = 0.2) -> datasets.DatasetDict:
    """scikit-learn's handwritten digits as a `datasets.DatasetDict` with a stratified train/test split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8), mode="L") for img in digits.images]
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    )
    dataset = datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    return dataset.train_test_split(test_size=test_size, stratify_by_column="label", seed=seed)


def _column(dataset: datasets.Dataset, candidates: tuple[str, ...], what: str, argument: str) -> str:
    for name in candidates:
        if name in dataset.column_names:
            return name
    raise ValueError(
        f"{argument}: the dataset has no {what} column (looked for {', '.join(candidates)}); "
        f"its columns are {dataset.column_names}"
    )


def load_image_data(
    dataset: str | None = None,
    data_dir: str | None = None,
    image_size: int = 32,
    seed: int = 0,
) -> ImageData:
    """
    Load train/test splits as `datasets.Dataset`s yielding `{"pixel_values": float tensor, "label": int}`.

    Args:
        dataset: a Hugging Face image-classification dataset name (needs internet), or `None`.
        data_dir: an `imagefolder` tree (`class_name/image.png`, optionally under `train/` and `test/`), or `None`.
        image_size: side of the square images the model gets.
        seed: seed of the train/test split when the source has no test split.
    With neither `dataset` nor `data_dir`, the embedded digits are used.
    """
    if dataset and data_dir:
        raise ValueError("--dataset and --data-dir are exclusive: give one of them (or neither for the digits)")
    if data_dir is not None:
        argument = "--data-dir"
        if not os.path.isdir(data_dir):
            raise ValueError(f"--data-dir: {data_dir!r} is not a directory")
        try:
            splits = datasets.load_dataset("imagefolder", data_dir=data_dir)
        except Exception as error:  # datasets raises many types for a malformed tree
            raise ValueError(f"--data-dir: {data_dir!r} is not a readable imagefolder tree ({error})") from error
        source = f"imagefolder:{data_dir}"
    elif dataset is not None:
        argument = "--dataset"
        try:
            splits = datasets.load_dataset(dataset)
        except Exception as error:
            raise ValueError(
                f"--dataset: could not load {dataset!r} ({type(error).__name__}: {error}). It must be a Hugging Face "
                "image-classification dataset and the machine must reach the Hub; offline, use --data-dir or "
                "leave both out for the embedded digits."
            ) from error
        source = dataset
    else:
        argument = "digits"
        splits = digits_dataset(seed=seed)
        source = "sklearn digits (embedded)"

    if "train" not in splits:
        raise ValueError(f"{argument}: no 'train' split (splits: {list(splits)})")
    train = splits["train"]
    test_name = next((name for name in ("test", "validation", "valid", "val") if name in splits), None)
    if test_name is None:
        label_col = _column(train, LABEL_COLUMNS, "label", argument)
        stratify = label_col if isinstance(train.features[label_col], datasets.ClassLabel) else None
        split = train.train_test_split(test_size=0.2, seed=seed, stratify_by_column=stratify)
        train, test = split["train"], split["test"]
    else:
        test = splits[test_name]

    image_col = _column(train, IMAGE_COLUMNS, "image", argument)
    label_col = _column(train, LABEL_COLUMNS, "label", argument)
    label_feature = train.features[label_col]
    if isinstance(label_feature, datasets.ClassLabel):
        num_classes = label_feature.num_classes
    else:
        num_classes = int(max(train[label_col])) + 1
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"{argument}: empty split (train {len(train)}, test {len(test)} examples)")

    transform = T.Compose(
        [
            T.ToImage(),
            T.RGB(),
            T.Resize((image_size, image_size), antialias=True),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]
    )

    def to_tensors(batch):
        try:  # images are decoded here, on first access
            pixel_values = [transform(image).as_subclass(torch.Tensor) for image in batch[image_col]]
        except (OSError, SyntaxError) as error:  # PIL's UnidentifiedImageError is an OSError
            raise ValueError(f"{argument}: an image cannot be decoded ({error})") from error
        return {"pixel_values": pixel_values, "label": list(batch[label_col])}

    def to_arrays(batch):
        return {
            "pixel_values": np.stack([t.numpy() for t in to_tensors(batch)["pixel_values"]]),
            "label": list(batch[label_col]),
        }

    def prepare(split: datasets.Dataset) -> datasets.Dataset:
        if len(split) <= MATERIALIZE_MAX_IMAGES:
            # Small data: decode and resize once, so that timings measure training, not image decoding.
            columns = [c for c in split.column_names if c not in ("pixel_values", "label")]
            features = datasets.Features(
                {
                    "pixel_values": datasets.Array3D((3, image_size, image_size), "float32"),
                    "label": split.features[label_col] if label_col == "label" else datasets.Value("int64"),
                }
            )
            mapped = split.map(to_arrays, batched=True, remove_columns=columns, features=features, keep_in_memory=True)
            return mapped.with_format("torch")
        return split.with_transform(to_tensors)

    return ImageData(train=prepare(train), test=prepare(test), num_classes=num_classes, source=source)


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples]),
        "labels": torch.tensor([int(e["label"]) for e in examples], dtype=torch.long),
    }
