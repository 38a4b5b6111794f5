"""English text for the language-model examples, with no network: the documentation topics shipped with Python.

`pydoc_data.topics.topics` maps a topic name (`"assert"`, `"formatstrings"`, `"specialnames"`, ...) to its page of
the Python language reference as plain text: about 80 topics, 460,000 characters, present in every CPython
install (the text follows the Python version, so figures compare only on the same one). The functions here split
it by topic, train a small byte-level BPE tokenizer on it, and cut it into fixed-length blocks for causal language
modeling:

    topics = load_topics()
    split = split_topics(topics)                       # pretraining topics / fine-tuning topics, disjoint
    tokenizer = build_tokenizer(split.pretrain.values())
    train_set = token_blocks(split.finetune_train.values(), tokenizer, block_size=128)

Nothing is written to disk unless `build_tokenizer` is given a `cache_dir`.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import datasets
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
datasets.disable_progress_bars()


def load_topics() -> dict[str, str]:
    """
    Python's documentation topics: topic name -> its text, in sorted order of names.

    Example:

    ```python
    >>> topics = load_topics()
    >>> "assert" in topics and topics["assert"].startswith("The \\"assert\\" statement")
    True

    ```
    """
    from pydoc_data.topics import topics

    return {name: topics[name] for name in sorted(topics)}


@dataclass(frozen=True)
class TopicSplit:
    """
    The three parts of `split_topics`, each topic name -> text.

    `pretrain` and the fine-tuning parts never share a topic. `finetune_eval` holds the held-out end of the
    fine-tuning topics' pages, so its keys are a subset of `finetune_train`'s and its text is disjoint from it.
    """

    pretrain: dict[str, str]
    finetune_train: dict[str, str]
    finetune_eval: dict[str, str]


def split_topics(
    topics: dict[str, str], held_out_fraction: float = 0.3, eval_fraction: float = 0.2, seed: int = 0
) -> TopicSplit:
    """
    Split the topics, deterministically, into pretraining topics and fine-tuning topics; the last paragraphs of
    each fine-tuning topic are held out for evaluating the fine-tuning.

    The topics are shuffled with `seed` and taken in that order into the fine-tuning part until it holds
    `held_out_fraction` of all characters (topic sizes vary 300-fold, so counting topics would make the amount of
    fine-tuning text depend on the seed); the rest is the pretraining part. Each fine-tuning topic is then cut at
    the paragraph break nearest to `1 - eval_fraction` of its length: the text before it is fine-tuning training
    text, the text after it evaluation text. So the evaluation measures what fine-tuning is for: text of the
    fine-tuning topics that the model saw neither in pretraining nor in fine-tuning. A topic of a single paragraph
    stays whole in the training part.

    Args:
        topics (`dict[str, str]`):
            Topic name -> text, as `load_topics` returns.
        held_out_fraction (`float`, *optional*, defaults to 0.3):
            Share of the characters, in (0, 1), whose topics are held out of pretraining for fine-tuning.
        eval_fraction (`float`, *optional*, defaults to 0.2):
            Share of each fine-tuning topic, in (0, 1), held out for evaluation.
        seed (`int`, *optional*, defaults to 0):
            Seeds the order in which topics are drawn; the same seed gives the same split.

    Example:

    ```python
    >>> split = split_topics(load_topics(), seed=0)
    >>> set(split.pretrain).isdisjoint(split.finetune_train)
    True

    ```
    """
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if len(topics) < 2:
        raise ValueError(f"split_topics needs at least 2 topics, got {len(topics)}")
    names = sorted(topics)
    random.Random(seed).shuffle(names)
    total = sum(len(text) for text in topics.values())
    finetune_names: list[str] = []
    held_out = 0
    for name in names[:-1]:  # the pretraining part keeps at least one topic
        if held_out >= held_out_fraction * total:
            break
        finetune_names.append(name)
        held_out += len(topics[name])
    finetune_train, finetune_eval = {}, {}
    for name in sorted(finetune_names):
        train_text, eval_text = _cut_at_paragraph(topics[name], 1 - eval_fraction)
        finetune_train[name] = train_text
        if eval_text:
            finetune_eval[name] = eval_text
    pretrain = {name: topics[name] for name in sorted(set(names) - set(finetune_names))}
    return TopicSplit(pretrain=pretrain, finetune_train=finetune_train, finetune_eval=finetune_eval)


def _cut_at_paragraph(text: str, fraction: float) -> tuple[str, str]:
    """`text` cut at the paragraph break nearest to `fraction` of its length; `(text, "")` if it has none."""
    breaks = [match.start() for match in re.finditer("\n\n", text)]
    if not breaks:
        return text, ""
    cut = min(breaks, key=lambda i: abs(i - fraction * len(text)))
    return text[:cut].rstrip(), text[cut:].lstrip()


def build_tokenizer(
    texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2, cache_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """
    Train a byte-level BPE tokenizer on `texts` (GPT-2's scheme: any string encodes, nothing is unknown) and wrap it
    as a `transformers.PreTrainedTokenizerFast` with `<|endoftext|>` as its end-of-sequence token and `<|pad|>` as
    its padding token (ids 0 and 1). Training is offline and deterministic: the same texts give the same vocabulary.

    Args:
        texts (`Iterable[str]`):
            The training text, e.g. `split.pretrain.values()`.
        vocab_size (`int`, *optional*, defaults to 2048):
            Size of the vocabulary, special tokens and the 256 byte tokens included.
        min_frequency (`int`, *optional*, defaults to 2):
            A merge is learned only for a pair seen at least this often.
        cache_dir (`str` or `Path`, *optional*):
            When given, the tokenizer is saved in a subfolder named by a hash of the texts and settings, and loaded
            from there the next time instead of trained again.

    Example:

    ```python
    >>> tokenizer = build_tokenizer(["The quick brown fox jumps over the lazy dog."] * 10, vocab_size=300)
    >>> tokenizer.decode(tokenizer("The lazy fox.")["input_ids"])
    'The lazy fox.'

    ```
    """
    texts = list(texts)
    if vocab_size <= 258:
        raise ValueError(f"vocab_size must be > 258 (256 bytes and 2 special tokens), got {vocab_size}")
    folder = None
    if cache_dir is not None:
        key = hashlib.sha256(json.dumps([texts, vocab_size, min_frequency]).encode()).hexdigest()[:16]
        folder = Path(cache_dir) / f"tokenizer-{key}"
        if (folder / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    if folder is not None:
        wrapped.save_pretrained(folder)
    return wrapped


def token_ids(texts: Iterable[str], tokenizer: PreTrainedTokenizerFast, block_size: int) -> list[list[int]]:
    """
    The token ids of `token_blocks`' rows: every text tokenized and followed by the end-of-sequence token, all
    concatenated, cut into `len // block_size` lists of `block_size` ids (the remainder dropped).

    Raises:
        `ValueError`: `block_size` not positive, a tokenizer without an end-of-sequence token, or a text shorter than
            one block.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if tokenizer.eos_token_id is None:
        raise ValueError("token_blocks needs a tokenizer with an end-of-sequence token (eos_token)")
    ids: list[int] = []
    for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    count = len(ids) // block_size
    if count == 0:
        raise ValueError(f"block_size {block_size} is longer than the whole text ({len(ids)} tokens): no block")
    return [ids[i * block_size : (i + 1) * block_size] for i in range(count)]


def token_blocks(texts: Iterable[str], tokenizer: PreTrainedTokenizerFast, block_size: int) -> datasets.Dataset:
    """
    Causal-LM training examples the way `run_clm.py` makes them: every text tokenized and followed by the
    end-of-sequence token, all concatenated, and cut into blocks of `block_size` tokens (the remainder shorter than
    a block is dropped). Each row has `input_ids`, `attention_mask` (all ones) and `labels` (equal to `input_ids`;
    the model shifts them), so `transformers.default_data_collator` batches them. The dataset lives in memory.

    Args:
        texts (`Iterable[str]`):
            The text, e.g. `split.finetune_train.values()`.
        tokenizer (`PreTrainedTokenizerFast`):
            A tokenizer with an end-of-sequence token, e.g. from `build_tokenizer`.
        block_size (`int`):
            Tokens per row.

    Example:

    ```python
    >>> tokenizer = build_tokenizer(["one two three four five six seven"] * 10, vocab_size=300)
    >>> blocks = token_blocks(["one two three four five six seven"] * 4, tokenizer, block_size=8)
    >>> len(blocks), len(blocks[0]["input_ids"])
    (4, 8)

    ```
    """
    blocks = token_ids(texts, tokenizer, block_size)
    count = len(blocks)
    return datasets.Dataset.from_dict(
        {"input_ids": blocks, "attention_mask": [[1] * block_size] * count, "labels": [list(b) for b in blocks]}
    )
