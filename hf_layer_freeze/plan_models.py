"""The models `plan` knows, built from their configs on the meta device (no weights, no data, no compute).

A timm model (built with `pretrained=False`) or a transformers model (a model type or a local directory holding a
`config.json`, built with `from_config`), optionally wrapped with PEFT's LoRA, with the inputs of one training step.
`plan_simulation` runs the schedule on what is built here; `plan` prints it.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["COMPOSED_MODEL_TYPES", "TASKS", "PlanModel", "build_plan_model", "model_source"]


@dataclass(frozen=True)
class _Task:
    auto_class: str  # the transformers Auto class building the head
    mapping: str  # its model-type mapping in `transformers.models.auto.modeling_auto`
    peft_task_type: str | None  # PEFT's `TaskType` (None: PEFT wraps the model as it is)
    images: bool  # inputs are `pixel_values`, else `input_ids`


TASKS: dict[str, _Task] = {
    "causal-lm": _Task("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "CAUSAL_LM", False),
    "masked-lm": _Task("AutoModelForMaskedLM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", None, False),
    "sequence-classification": _Task(
        "AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "SEQ_CLS", False
    ),
    "token-classification": _Task(
        "AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "TOKEN_CLS", False
    ),
    "question-answering": _Task(
        "AutoModelForQuestionAnswering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "QUESTION_ANS", False
    ),
    "image-classification": _Task(
        "AutoModelForImageClassification", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", None, True
    ),
    # PEFT wraps it plainly: PEFT 0.21's PeftModelForSeq2SeqLM reads a method transformers 5 no longer has
    "seq2seq-lm": _Task("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", None, False),
}
"""`--task`: the heads a transformers model can be planned with (encoder-decoders: `seq2seq-lm`)."""

COMPOSED_MODEL_TYPES = ("encoder-decoder", "vision-encoder-decoder", "speech-encoder-decoder")
"""Model types whose config composes two others: planned from a directory holding their `config.json`."""


@dataclass(frozen=True, eq=False)
class PlanModel:
    """
    A model built for planning on the meta device, with the inputs of one training step.

    Args:
        model (`torch.nn.Module`): the model (LoRA-wrapped if asked), in training mode.
        args (`tuple`): positional inputs of one step (`model(*args, **kwargs)`).
        kwargs (`dict`): keyword inputs of one step.
        description (`str`): what was built: the kind of model, its config overrides, LoRA, its trainable parameters.
        inputs (`str`): the inputs in words, e.g. `"at 224 px"` or `"on 8 × 512 tokens"`.
    """

    model: nn.Module
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    inputs: str = ""


def model_source(name: str) -> str:
    """
    Where `--model` comes from: `"timm"` (a timm model name, checked first), `"directory"` (a local directory holding
    a transformers `config.json`) or `"model_type"` (a transformers model type, e.g. `"llama"`).

    Raises:
        `ValueError`: none of the three, in one line naming both kinds.

    Example:

    ```python
    >>> from hf_layer_freeze.plan_models import model_source
    >>> model_source("resnet18"), model_source("llama")
    ('timm', 'model_type')

    ```
    """
    import timm

    if timm.is_model(name):  # accepts pretrained tags (resnet18.a1_in1k), refuses wildcards
        return "timm"
    if os.path.isfile(os.path.join(name, "config.json")):
        return "directory"
    from transformers import CONFIG_MAPPING

    if name in CONFIG_MAPPING:
        return "model_type"
    where = " (that directory has no config.json)" if os.path.isdir(name) else ""
    raise ValueError(
        f"--model: {name!r} is not a timm model name (see timm.list_models()), nor a transformers model type (see "
        f"transformers.CONFIG_MAPPING) or a local directory holding a config.json{where}"
    )


def _positive(name: str, value: Any) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _parse_config_overrides(config: Any, overrides: str) -> dict[str, Any]:
    """
    `"key=value,key=value"` as run_clm's `--config_overrides` reads it (`PretrainedConfig.update_from_string`: each
    key must exist in `config`, values typed like its current value), as keyword arguments.
    """
    pairs = [item.partition("=") for item in overrides.split(",")]
    for key, sep, _ in pairs:
        if not sep or not key:
            raise ValueError(f"config_overrides must be key=value pairs joined by commas, got {overrides!r}")
    scratch = copy.deepcopy(config)
    try:
        scratch.update_from_string(overrides)
    except (ValueError, TypeError) as error:
        raise ValueError(f"config_overrides {overrides!r}: {error}") from None
    return {key: getattr(scratch, key) for key, _, _ in pairs}


def _default_task(model_type: str) -> str:
    """Causal LM for decoders, sequence classification for encoders, image classification for vision models."""
    from transformers.models.auto import modeling_auto

    def has(task: str) -> bool:
        return model_type in getattr(modeling_auto, TASKS[task].mapping)

    if has("causal-lm") and not has("masked-lm"):
        return "causal-lm"
    for task in ("sequence-classification", "image-classification"):
        if has(task):
            return task
    raise ValueError(f"no default head for model type {model_type!r}: pass --task, one of {', '.join(TASKS)}")


def _build_timm(name: str, input_size: int | None, batch_size: int, num_classes: int | None) -> PlanModel:
    import timm

    input_size = 224 if input_size is None else input_size
    num_classes = 1000 if num_classes is None else num_classes
    with torch.device("meta"):
        try:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=input_size)
        except TypeError:  # convnets do not take img_size
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
        x = torch.empty(batch_size, 3, input_size, input_size)
    built = f"timm {name} (pretrained=False, num_classes={num_classes})"
    return PlanModel(model, (x,), {}, built, f"at {input_size} px")


def _build_transformers(
    name: str,
    source: str,
    task: str | None,
    input_size: int | None,
    seq_len: int | None,
    batch_size: int,
    num_classes: int | None,
    config_overrides: str | None,
) -> tuple[PlanModel, str]:
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    if source == "model_type" and name in COMPOSED_MODEL_TYPES:
        raise ValueError(
            f"model {name!r} is composed of an encoder and a decoder of other types, which a model type does not "
            "say: plan a directory holding its config.json (EncoderDecoderConfig.from_encoder_decoder_configs(...)"
            ".save_pretrained(directory))"
        )
    default = AutoConfig.from_pretrained(name) if source == "directory" else AutoConfig.for_model(name)
    model_type = default.model_type
    encoder_decoder = bool(getattr(default, "is_encoder_decoder", False))
    if encoder_decoder and task not in (None, "seq2seq-lm"):
        raise ValueError(
            f"task {task!r}: model {name!r} is an encoder-decoder ({model_type}), planned as seq2seq-lm only (a "
            "training step of its other heads needs inputs plan does not build)"
        )
    task = ("seq2seq-lm" if encoder_decoder else _default_task(model_type)) if task is None else task
    spec = TASKS[task]
    if model_type not in getattr(modeling_auto, spec.mapping):
        heads = [t for t, s in TASKS.items() if model_type in getattr(modeling_auto, s.mapping)]
        raise ValueError(
            f"task {task!r}: transformers has no such head for model type {model_type!r} "
            f"(it has: {', '.join(heads) or 'none of ' + ', '.join(TASKS)})"
        )
    if spec.images and seq_len is not None:
        raise ValueError(f"seq_len applies to text models; {task} takes images (input_size)")
    if not spec.images and input_size is not None:
        raise ValueError(f"input_size applies to vision models; {task} takes tokens (seq_len, batch_size)")
    overrides = _parse_config_overrides(default, config_overrides) if config_overrides else {}
    if spec.images and input_size is not None and hasattr(default, "image_size"):
        overrides["image_size"] = input_size  # as timm's img_size: position embeddings follow the input size
    if num_classes is not None and task in ("sequence-classification", "token-classification", "image-classification"):
        overrides["num_labels"] = num_classes
    if source == "directory":  # as run_clm: the saved config, attributes set over it
        config = AutoConfig.from_pretrained(name, **overrides)
    else:  # built from the overrides, so that derived sizes (Llama's head_dim) follow them
        config = AutoConfig.for_model(model_type, **overrides)
    if spec.images:
        size = input_size or getattr(config, "image_size", 224)
        size = size[0] if isinstance(size, (list, tuple)) else size
        shape, inputs = (batch_size, getattr(config, "num_channels", 3), size, size), f"at {size} px"
    else:
        seq_len = 512 if seq_len is None else seq_len
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and seq_len > limit:
            raise ValueError(f"seq_len must be at most {model_type}'s max_position_embeddings={limit}, got {seq_len}")
        shape, inputs = (batch_size, seq_len), f"on {batch_size} × {seq_len} tokens"
    # eager attention for encoder-decoders: the sdpa mask BART's decoder builds reads tensor values, which the meta
    # device has not (the FLOPs are the same matrix products)
    attention = {"attn_implementation": "eager"} if task == "seq2seq-lm" else {}
    with torch.device("meta"):
        model = getattr(transformers, spec.auto_class).from_config(config, **attention)
        if spec.images:
            kwargs = {"pixel_values": torch.empty(shape)}
        else:
            kwargs = {"input_ids": torch.zeros(shape, dtype=torch.long)}
        if task == "seq2seq-lm":  # teacher forcing: decoder inputs as long as the encoder's
            kwargs["decoder_input_ids"] = torch.zeros(shape, dtype=torch.long)
    origin = f"AutoConfig.from_pretrained({name!r})" if source == "directory" else f"AutoConfig.for_model({name!r})"
    shown = f" with config overrides {config_overrides}" if config_overrides else ""
    built = f"transformers {type(model).__name__} ({task}) from {origin}{shown}"
    return PlanModel(model, (), kwargs, built, inputs), task


def _wrap_with_lora(
    model: nn.Module, model_type: str | None, task: str | None, lora_r: int, target_modules: Sequence[str] | None
) -> tuple[nn.Module, str]:
    try:
        import peft
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    except ImportError:
        raise ImportError("lora_r > 0 (--lora-r) needs PEFT: pip install peft") from None

    origin = ""
    if not target_modules:
        target_modules = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
        origin = f" (PEFT's default for {model_type})"
        if not target_modules:
            what = f"model type {model_type!r}" if model_type else "timm models"
            raise ValueError(
                f"PEFT has no default LoRA target modules for {what}: name them with --lora-target-modules "
                "(lora_target_modules): names of the model's linear layers, as in model.named_modules()"
            )
    task_type = TASKS[task].peft_task_type if task else None
    config = peft.LoraConfig(r=lora_r, target_modules=list(target_modules), task_type=task_type)
    try:
        with warnings.catch_warnings():  # PEFT reads transformers' deprecated `is_gradient_checkpointing`
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            model = peft.get_peft_model(model, config)
    except ValueError as error:  # no module matches the targets
        first_line = str(error).strip().splitlines()[0]
        raise ValueError(f"LoRA on {', '.join(target_modules)}: {first_line}") from None
    return model, f"LoRA r={lora_r} on {','.join(target_modules)}{origin}"


def build_plan_model(
    model_name: str,
    *,
    task: str | None = None,
    input_size: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 2,
    num_classes: int | None = None,
    config_overrides: str | None = None,
    lora_r: int = 0,
    lora_target_modules: str | Sequence[str] | None = None,
) -> PlanModel:
    """
    Build the model a plan is made for, on the meta device (no weights), with the inputs of one training step.

    Args:
        model_name (`str`):
            A timm model name (`"resnet50"`), a transformers model type (`"llama"`), or a local directory holding a
            transformers `config.json`; see `model_source`.
        task (`str`, *optional*):
            Transformers only: the head, one of `TASKS`. Defaults to `"causal-lm"` for decoders,
            `"sequence-classification"` for encoders, `"image-classification"` for vision models, `"seq2seq-lm"`
            (the only one) for encoder-decoders (T5, BART; an `EncoderDecoderModel` from a directory).
        input_size (`int`, *optional*):
            Vision models: the image side in pixels. Defaults to 224 for timm, to the config's `image_size` otherwise.
        seq_len (`int`, *optional*):
            Text models: tokens per sequence. Defaults to 512.
        batch_size (`int`, *optional*, defaults to 2):
            Images or sequences per step (two images: BatchNorm refuses one at 1x1 in training).
        num_classes (`int`, *optional*):
            Classes of the classifier. Defaults to 1000 for timm, to the config's `num_labels` otherwise.
        config_overrides (`str`, *optional*):
            Transformers only: `"num_hidden_layers=4,hidden_size=256"`, read as run_clm's `--config_overrides`. A
            model type's config is built with them (derived sizes follow); a directory's is loaded, then updated.
        lora_r (`int`, *optional*, defaults to 0):
            LoRA rank; 0 for no LoRA. The model is wrapped with `peft.get_peft_model`.
        lora_target_modules (`str` or `list[str]`, *optional*):
            Modules LoRA wraps (`"q_proj,v_proj"`). Defaults to PEFT's default for the model type.

    Returns:
        `PlanModel`: the model, its inputs, and what was built in words.
    """
    _positive("batch_size", batch_size)
    _positive("input_size", input_size)
    _positive("seq_len", seq_len)
    _positive("num_classes", num_classes)
    if isinstance(lora_r, bool) or not isinstance(lora_r, int) or lora_r < 0:
        raise ValueError(f"lora_r must be an integer >= 0 (0: no LoRA), got {lora_r!r}")
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if isinstance(lora_target_modules, str):
        lora_target_modules = [m.strip() for m in lora_target_modules.split(",") if m.strip()]
    if lora_target_modules and not lora_r:
        raise ValueError("lora_target_modules needs lora_r > 0 (--lora-r)")
    source = model_source(model_name)
    if source == "timm":
        for option, value in (("task", task), ("config_overrides", config_overrides), ("seq_len", seq_len)):
            if value is not None:
                raise ValueError(f"{option} applies to transformers models; {model_name!r} is a timm model")
        plan_model = _build_timm(model_name, input_size, batch_size, num_classes)
        model_type = None
    else:
        plan_model, task = _build_transformers(
            model_name, source, task, input_size, seq_len, batch_size, num_classes, config_overrides
        )
        model_type = plan_model.model.config.model_type
    model, built = plan_model.model, plan_model.description
    if lora_r:
        model, lora = _wrap_with_lora(model, model_type, task, lora_r, lora_target_modules)
        built = f"{built}, {lora}"
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    built = f"{built}, on the meta device: {trainable:,} of {total:,} parameters train"
    return PlanModel(model, plan_model.args, plan_model.kwargs, built, plan_model.inputs)
