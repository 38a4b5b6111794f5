"""The corpora and data sets of `bench_finetune.py`, all read from this machine's disk: no network, deterministic.

- **Python source** (`python_source_files`, `SourceSplit`): every `.py` file of the standard library
  (`sysconfig.get_paths()["stdlib"]`, its `site-packages` left out) and of the installed packages (`purelib`, the
  venv's `site-packages`), named by their path relative to those roots and sorted. Each file goes to one part by a
  hash of its name (`split_of`): `pretrain` (80%), `heldout` (10%: the pretraining's held-out loss) and `reserved`
  (10%: never seen in pretraining; the positive control and the classification task draw from it). So every split is
  by file, and the same files land in the same part whatever else is installed. Files over 256 kB (generated
  tables) and files that are not UTF-8 are skipped. Within a part, files are taken in the order of their name's hash
  (packages mixed, not alphabetical) until a character budget is reached.
- **The tokenizer**: byte-level BPE (`tokenizers`, `examples/text_data.build_tokenizer`) trained on the first
  `tokenizer_chars` characters of the pretraining part.
- **English text** (`pydoc_topics_split`): `pydoc_data.topics`, every topic cut at the paragraph break nearest 80%
  of its length: the beginnings for fine-tuning, the ends held out.
- **Docstrings by package** (`docstring_examples`): the docstrings of modules, classes and functions (`ast`, no
  import) of the reserved files of a few packages, labelled by the package, de-duplicated by exact text (a text found
  in two packages is dropped), split train/test by file.
- **Digits** (`digits_split`): scikit-learn's 8x8 digits (via `examples/image_data.py`) upsampled to 32x32 RGB.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "examples") not in sys.path:
    sys.path.insert(0, str(ROOT / "examples"))

from text_data import _cut_at_paragraph, build_tokenizer, load_topics, token_ids  # noqa: E402

MAX_FILE_BYTES = 256_000
PARTS = ("pretrain", "heldout", "reserved")


def source_roots() -> dict[str, Path]:
    """`{"stdlib": ..., "site": ...}`: the standard library's folder and the installed packages' folder."""
    paths = sysconfig.get_paths()
    return {"stdlib": Path(paths["stdlib"]), "site": Path(paths["purelib"])}


def python_source_files() -> list[tuple[str, Path]]:
    """`(name, path)` of every `.py` file under `source_roots()`, sorted by name (`"stdlib/ast.py"`,
    `"site/torch/nn/modules/linear.py"`); the standard library's own `site-packages` is left out."""
    files = []
    for label, root in source_roots().items():
        for path in root.rglob("*.py"):
            relative = path.relative_to(root)
            if label == "stdlib" and ("site-packages" in relative.parts or "dist-packages" in relative.parts):
                continue
            files.append((f"{label}/{relative.as_posix()}", path))
    return sorted(files)


def name_hash(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def split_of(name: str) -> str:
    """The part a file belongs to, by a hash of its name: 80% pretrain, 10% heldout, 10% reserved."""
    bucket = name_hash(name) % 100
    return "pretrain" if bucket < 80 else "heldout" if bucket < 90 else "reserved"


def package_of(name: str) -> str:
    """`"site/torch/nn/x.py"` -> `"torch"`; `"stdlib/json/x.py"` -> `"stdlib"`."""
    parts = name.split("/")
    return parts[1].removesuffix(".py") if parts[0] == "site" else "stdlib"


def read_source(path: Path) -> str | None:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class SourceSplit:
    """The files of one part, in hash order, with their text, up to a character budget."""

    part: str
    files: tuple[tuple[str, str], ...]  # (name, text)

    @property
    def chars(self) -> int:
        return sum(len(text) for _, text in self.files)


def source_part(
    part: str, max_chars: int, packages: tuple[str, ...] | None = None, files: list | None = None
) -> SourceSplit:
    """The files of `part` (optionally only of `packages`), in the order of their name's hash, until `max_chars`."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    chosen = [(n, p) for n, p in (files or python_source_files()) if split_of(n) == part]
    if packages is not None:
        chosen = [(n, p) for n, p in chosen if package_of(n) in packages]
    chosen.sort(key=lambda item: (name_hash(item[0]), item[0]))
    taken, total = [], 0
    for name, path in chosen:
        if total >= max_chars:
            break
        text = read_source(path)
        if text is None or not text.strip():
            continue
        taken.append((name, text))
        total += len(text)
    return SourceSplit(part, tuple(taken))


def train_tokenizer(texts: list[str], vocab_size: int, max_chars: int):
    """Byte-level BPE trained on the first `max_chars` characters of `texts` (in their order)."""
    sample, total = [], 0
    for text in texts:
        if total >= max_chars:
            break
        sample.append(text[: max_chars - total])
        total += len(sample[-1])
    return build_tokenizer(sample, vocab_size)


def token_stream(texts: list[str], tokenizer, block_size: int) -> torch.Tensor:
    """`text_data.token_ids` as one `[n, block_size]` tensor: every text tokenized, each followed by the
    end-of-sequence token, concatenated, cut into blocks (the remainder dropped)."""
    return torch.tensor(token_ids(texts, tokenizer, block_size), dtype=torch.long).view(-1, block_size)


def pydoc_topics_split(eval_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): each `pydoc_data.topics` topic cut near `1 - eval_fraction` of its length."""
    train, held = [], []
    for text in load_topics().values():
        head, tail = _cut_at_paragraph(text, 1 - eval_fraction)
        train.append(head)
        if tail:
            held.append(tail)
    return train, held


def _docstrings(text: str) -> list[str]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append(doc)
    return found


@dataclass(frozen=True)
class LabelledTexts:
    texts: list[str]
    labels: list[int]
    files: list[str]


def docstring_examples(
    packages: tuple[str, ...], min_chars: int, max_chars: int, parts: tuple[str, ...] = ("reserved", "heldout")
) -> dict[str, LabelledTexts]:
    """
    `{"train": ..., "test": ...}`: docstrings of `packages`' files in `parts` (never pretrained on), labelled by the
    package's index, de-duplicated by exact text across everything (a text seen twice is kept once, in its first
    file in name order; a text under two packages is dropped), at least `min_chars` long, cut to `max_chars`. Split
    by file: a file's name hash decides (even: train, odd: test), so no file gives to both sides.
    """
    files = [(n, p) for n, p in python_source_files() if split_of(n) in parts and package_of(n) in packages]
    first: dict[str, tuple[str, str]] = {}  # text -> (package, file)
    clashing: set[str] = set()
    for name, path in files:
        text = read_source(path)
        if text is None:
            continue
        for doc in _docstrings(text):
            doc = doc.strip()
            if len(doc) < min_chars:
                continue
            doc = doc[:max_chars]
            if doc in first:
                if first[doc][0] != package_of(name):
                    clashing.add(doc)
                continue
            first[doc] = (package_of(name), name)
    out = {"train": LabelledTexts([], [], []), "test": LabelledTexts([], [], [])}
    for doc, (package, name) in first.items():
        if doc in clashing:
            continue
        side = out["train" if (name_hash(name) >> 8) % 2 == 0 else "test"]
        side.texts.append(doc)
        side.labels.append(packages.index(package))
        side.files.append(name)
    return out


def digits_split(classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels) of the digits in `classes`, labels 0..len-1, from the
    fixed stratified 80/20 split of `examples/image_data.py`, 32x32 RGB, normalized."""
    from image_data import load_image_data

    data = load_image_data(None, None, 32, seed=0)
    train, test = data.train[:], data.test[:]
    remap = torch.full((data.num_classes,), -1, dtype=torch.long)
    remap[list(classes)] = torch.arange(len(classes))

    def take(split):
        x, y = split["pixel_values"], split["label"]
        keep = torch.tensor([int(v) in classes for v in y])
        return x[keep], remap[y[keep]]

    return (*take(train), *take(test))
