"""Activation caching: a cached run trains exactly like an uncached one whose frozen prefix runs in eval mode, for
every supported family; augmented inputs never hit; the memory budget holds; resume and DDP stay exact."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from helpers import RandomTokenDataset, free_port, tiny_timm
from test_callback import _train_state
from transformers import Trainer, TrainingArguments

from hf_layer_freeze import LayerFreezer, LayerFreezingCallback
from hf_layer_freeze.activation_cache import prefix_layout
from hf_layer_freeze.cache_keys import example_keys

TEXT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64)
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
           intermediate_size=64, num_labels=3)  # fmt: skip
N, BATCH = 24, 8  # three batches an epoch, every batch the same shape
# With freeze_at {3: 2, 6: 3, 8: 4}: the first step whose batch mixes examples cached at two cuts (epoch 4)
MIXED_CUTS_FROM = 10
ROUNDING = 1e-4  # a few steps on from float32 rounding differences in a sub-batch's activations


def _llama():
    return tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT, num_key_value_heads=2))


def _llama_lora():
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(_llama(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))


FAMILIES = {
    # name: (model factory, batch kind)
    "llama": (_llama, "causal"),
    "llama-lora": (_llama_lora, "causal"),
    "bert": (lambda: tf.BertForSequenceClassification(tf.BertConfig(**TEXT, num_labels=3)), "padded"),
    "roberta": (lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**TEXT, num_labels=3)), "padded"),
    "vit": (lambda: tf.ViTForImageClassification(tf.ViTConfig(**VIT)), "images"),
    "timm-vit": (lambda: tiny_timm("vit_tiny_patch16_224", num_classes=3), "timm"),
    "timm-resnet": (lambda: tiny_timm("resnet10t", num_classes=3), "timm"),
    "timm-wrapper-resnet": (
        lambda: tf.TimmWrapperForImageClassification(tf.TimmWrapperConfig(architecture="resnet10t", num_labels=3)),
        "images",
    ),
}


def _data(kind: str, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    if kind in ("causal", "padded"):
        ids = torch.randint(3, 64, (N, 12), generator=generator)
        mask = torch.ones_like(ids)
        if kind == "padded":  # right padding of various lengths inside the fixed length
            for row in range(N):
                mask[row, 6 + row % 6 :] = 0
            ids = ids * mask
        labels = ids if kind == "causal" else torch.randint(0, 3, (N,), generator=generator)
        return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(N)]
    images = torch.randn(N, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 3, (N,), generator=generator)
    key = "pixel_values" if kind == "images" else "x"
    return [{key: images[i], "labels": labels[i]} for i in range(N)]


def _forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "x" in batch:
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["labels"])
    return model(**batch).loss


class _EvalPrefix:
    """The reference: an uncached model whose frozen prefix (embeddings and whole frozen blocks) runs in eval mode."""

    def __init__(self, model):
        self.layout = prefix_layout(model)
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        if not module.training:
            return
        frozen = lambda m: not any(p.requires_grad for p in m.parameters())  # noqa: E731
        if all(frozen(m) for m in self.layout.before):
            for m in self.layout.before:
                m.eval()
            for block in self.layout.blocks:
                if not frozen(block):
                    break
                block.eval()


def _train(model, data, freeze_at: dict[int, int], cache: bool, epochs=4, augment=False, after_step=None, **options):
    """Train `epochs` epochs in a fixed shuffled order; return the losses, every step's gradients and the freezer.
    `after_step(step, freezer)`, if given, runs after each step."""
    torch.manual_seed(4)  # dropout after the prefix draws the same numbers in both runs
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    freezer = LayerFreezer(model, optimizer, granularity="block", cache_activations=cache, **options)
    if not cache:
        _EvalPrefix(model)
    generator = torch.Generator().manual_seed(2)
    noise = torch.Generator().manual_seed(3)
    losses, grads, step = [], [], 0
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator).tolist()
        for start in range(0, len(data), BATCH):
            batch = {k: torch.stack([data[i][k] for i in order[start : start + BATCH]]) for k in data[0]}
            if augment:
                batch["x"] = batch["x"] + 0.01 * torch.randn(batch["x"].shape, generator=noise)
            model.train()
            loss = _forward(model, batch)
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
            step += 1
            if step in freeze_at:
                freezer.freeze_units(freeze_at[step])
            if after_step is not None:
                after_step(step, freezer)
    return losses, grads, freezer


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_cached_run_trains_exactly_like_an_uncached_run_with_its_prefix_in_eval_mode(family):
    build, kind = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    data = _data(kind)
    # the prefix grows at an epoch end (entries then serve the deeper cut) and mid-epoch (a batch mixes cuts)
    freeze_at = {3: 2, 6: 3, 8: 4}
    expected_losses, expected_grads, reference = _train(copy.deepcopy(model), data, freeze_at, cache=False)
    losses, grads, freezer = _train(model, data, freeze_at, cache=True)
    cache = freezer.activation_cache
    assert cache.cut >= 1 and cache.bytes > 0
    assert cache.hits > 0  # batches were served from the cache, some from an older cut
    # Through step 9 every batch's examples were cached at one cut: each block ran on whole batches of the shapes the
    # uncached run used, so bitwise equality is forced. From step 10 (epoch 4, after the mid-epoch freeze at 8) a
    # batch mixes cuts and a block runs on a sub-batch, a shape whose rounding is the CPU's kernels' business: equal
    # to rounding, as the module says (bitwise on some CPUs, not on all).
    mixed = MIXED_CUTS_FROM
    assert [loss.item() for loss in losses[: mixed - 1]] == [loss.item() for loss in expected_losses[: mixed - 1]]
    for step, (got, expected) in enumerate(zip(grads, expected_grads, strict=True), start=1):
        assert len(got) == len(expected)
        if step < mixed:
            assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True)), f"step {step}"
        else:
            for g, e in zip(got, expected, strict=True):
                torch.testing.assert_close(g, e, rtol=ROUNDING, atol=ROUNDING, msg=lambda m, step=step: f"{step}: {m}")
    torch.testing.assert_close(torch.stack(losses), torch.stack(expected_losses), rtol=ROUNDING, atol=ROUNDING)


def test_random_augmentation_never_hits_and_trains_exactly_like_the_uncached_run():
    data = _data("timm")
    torch.manual_seed(0)
    model = tiny_timm("vit_tiny_patch16_224", num_classes=3)
    freeze_at = {2: 3}
    expected, _, _ = _train(copy.deepcopy(model), data, freeze_at, cache=False, augment=True)
    got, _, freezer = _train(model, data, freeze_at, cache=True, augment=True)
    assert freezer.activation_cache.hits == 0 and freezer.activation_cache.steps > 0
    assert freezer.activation_cache.total_rows_served == 0  # not a single row
    assert [x.item() for x in got] == [x.item() for x in expected]


def test_the_memory_budget_holds_and_past_it_examples_are_computed():
    data = _data("causal")
    torch.manual_seed(0)
    model = _llama()
    one_entry = 12 * 32 * 4  # an example's output of a layer: 12 tokens x 32 hidden, fp32 (plus its key)
    budget = 10 * one_entry + 10 * 300
    expected, _, _ = _train(copy.deepcopy(model), data, {2: 3}, cache=False)
    got, _, freezer = _train(model, data, {2: 3}, cache=True, cache_max_bytes=budget)
    cache = freezer.activation_cache
    assert 0 < cache.bytes <= budget and len(cache._entries) < N  # some stored, not all
    assert cache.hits == 0  # no batch is whole in the cache: each computes its rows that are not in it
    assert 0 < cache.total_rows_served < cache.total_rows  # and takes the others from it, never stale
    # a batch of cached and computed rows runs the prefix on a sub-batch: equal to rounding (the module docstring)
    torch.testing.assert_close(torch.stack(got), torch.stack(expected), rtol=ROUNDING, atol=ROUNDING)


def test_unsupported_models_compiled_models_and_bad_options_are_refused_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NotImplementedError, match="cache_activations=True supports transformers bert"):
        LayerFreezer(model, optimizer, cache_activations=True)
    gpt2 = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=32))
    with pytest.raises(NotImplementedError, match="model_type 'gpt2'"):
        LayerFreezer(gpt2, torch.optim.SGD(gpt2.parameters(), lr=0.1), cache_activations=True)
    timm_model = tiny_timm()
    compiled = torch.compile(timm_model, backend="eager")
    with pytest.raises(NotImplementedError, match="does not support a compiled model"):
        LayerFreezer(compiled, torch.optim.SGD(timm_model.parameters(), lr=0.1), cache_activations=True)
    for options, match in (
        ({"cache_activations": "yes"}, "cache_activations must be True or False, got 'yes'"),
        ({"cache_max_bytes": 0}, "cache_max_bytes must be an integer >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            LayerFreezingCallback(**options)


def test_the_prefix_runs_in_eval_mode_and_a_warning_says_so_when_it_has_dropout():
    torch.manual_seed(0)
    model = tf.BertForSequenceClassification(tf.BertConfig(**TEXT, num_labels=3, hidden_dropout_prob=0.5))
    freezer = LayerFreezer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), granularity="block", cache_activations=True
    )
    with pytest.warns(UserWarning, match="the frozen prefix runs in eval mode.*dropout layer"):
        freezer.freeze_units(3)  # the embeddings and two layers
    model.train()
    batch = {k: torch.stack([e[k] for e in _data("padded")[:BATCH]]) for k in ("input_ids", "attention_mask")}
    model(**batch)
    assert not model.bert.embeddings.training and not model.bert.encoder.layer[1].training
    assert model.bert.encoder.layer[2].training  # what trains keeps its dropout


def test_the_eval_mode_warning_names_stochastic_depth_attention_dropout_and_batchnorm():
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8,
                            drop_path_rate=0.2)  # fmt: skip
    llama = tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT, num_key_value_heads=2, attention_dropout=0.1))
    for model, options, match in (
        (vit, {}, r"drop-path/drop-block layer\(s\) \(stochastic depth\)"),
        (llama, {}, r"2 attention module\(s\) with attention dropout"),
        (tiny_timm("resnet10t", num_classes=3), {}, r"BatchNorm layer\(s\), now on their running statistics"),
    ):
        freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), granularity="block",
                               cache_activations=True, **options)  # fmt: skip
        with pytest.warns(UserWarning, match="the frozen prefix runs in eval mode.*" + match):
            freezer.freeze_units(3)  # the embeddings (or stem) and two blocks
    model = tiny_timm("resnet10t", num_classes=3)
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), granularity="block",
                           cache_activations=True, freeze_batchnorm=True)  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # freeze_batchnorm=True locked them already: eval mode turns nothing off
        freezer.freeze_units(3)


def test_neftune_with_caching_is_refused_by_name_at_train_begin_and_when_it_comes_mid_run(tmp_path):
    from transformers.integrations.neftune import activate_neftune

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, use_cpu=True,
                             report_to=[], save_strategy="no", neftune_noise_alpha=5.0, disable_tqdm=True)  # fmt: skip
    dataset = RandomTokenDataset(n=24, length=12, vocab=64, causal=True)
    callback = LayerFreezingCallback(freeze_start=0.0, granularity="block", cache_activations=True)
    trainer = Trainer(model=_llama(), args=args, train_dataset=dataset, callbacks=[callback])
    refusal = r"does not support NEFTune \(forward hook .*neftune_post_forward_hook on model.embed_tokens.*"
    with pytest.raises(
        NotImplementedError, match=refusal + "Use neftune_noise_alpha=None, or cache_activations=False"
    ):
        trainer.train()
    # NEFTune switched on later (a loop of one's own, other code): refused when the cache would next serve a step
    model = _llama()
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), granularity="block",
                           cache_activations=True)  # fmt: skip
    freezer.freeze_units(2)
    batch = {k: torch.stack([e[k] for e in _data("causal")[:BATCH]]) for k in ("input_ids", "labels")}
    model.train()
    model(**batch)
    activate_neftune(model, 5.0)
    with pytest.raises(NotImplementedError, match=refusal):
        model(**batch)


def test_a_foreign_hook_on_the_prefix_keeps_its_effect_steps_are_computed_while_it_is_there_and_a_warning_says_so():
    """Hooks registered mid-run on a module inside a frozen block and for every module (a global one), which change
    the block's output by a call-count-dependent offset: while they are there every step is computed and not stored,
    so their calls and effect are those of the uncached run; once they are removed, the cache serves again."""

    def run(model, cache: bool):
        calls = {"mlp": 0, "norm": 0}
        norm = model.model.layers[0].input_layernorm
        handles, hits = [], {}

        def offset(module, args, output):  # deterministic, but a stale cached output would show
            calls["mlp"] += 1
            return output + 1e-3 * calls["mlp"]

        def count(module, args, output):
            calls["norm"] += module is norm

        def after_step(step, freezer):
            if step == 7:
                handles.append(model.model.layers[0].mlp.register_forward_hook(offset))
                handles.append(torch.nn.modules.module.register_module_forward_hook(count))
            if step == 10:
                for handle in handles:
                    handle.remove()
            if cache:
                hits[step] = freezer.activation_cache.total_hits

        try:
            losses, grads, _ = _train(model, _data("causal"), {3: 2}, cache=cache, after_step=after_step)
        finally:
            for handle in handles:
                handle.remove()
        return losses, grads, calls, hits

    torch.manual_seed(0)
    model = _llama()
    expected_losses, expected_grads, expected_calls, _ = run(copy.deepcopy(model), cache=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, grads, calls, hits = run(model, cache=True)
    assert calls == expected_calls == {"mlp": 3, "norm": 3}  # steps 8 to 10, one call each
    assert [loss.item() for loss in losses] == [loss.item() for loss in expected_losses]  # bitwise
    for step, (got, expected) in enumerate(zip(grads, expected_grads, strict=True)):
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True)), f"step {step + 1}"
    assert hits[7] > 0  # the cache served before the hooks came
    assert hits[10] == hits[7]  # none while they were there
    assert hits[12] > hits[10]  # and again once they were gone: what it stored before is still true
    hook_warnings = [
        str(w.message) for w in caught if "would be skipped by a step served from the cache" in str(w.message)
    ]
    assert len(hook_warnings) == 1  # once, naming both hooks and where they are
    assert "forward hook" in hook_warnings[0] and ".offset on model.layers.0.mlp" in hook_warnings[0]
    assert "global forward hook" in hook_warnings[0] and ".count" in hook_warnings[0]


@pytest.mark.parametrize("change", ["accelerate-hook", "patched-forward", "parametrization"])
def test_a_prefix_module_changed_without_a_torch_hook_keeps_its_effect(change):
    """Accelerate's `add_hook_to_module`, a forward patched on the instance and a parametrization change a frozen
    block's output without a torch hook: while they are there every step is computed, exactly as uncached."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
    from torch.nn.utils import parametrize

    def run(model, cache: bool):
        mlp = model.model.layers[0].mlp
        calls = [0]

        def offset(output):
            calls[0] += 1
            return output + 1e-3 * calls[0]

        class Offset(ModelHook):
            def post_forward(self, module, output):
                return offset(output)

        class Scale(torch.nn.Module):
            def forward(self, weight):
                calls[0] += 1
                return weight * 1.01

        original = mlp.forward

        def after_step(step, freezer):
            if step == 7 and change == "accelerate-hook":
                add_hook_to_module(mlp, Offset())
            elif step == 7 and change == "patched-forward":
                mlp.forward = lambda *args, **kwargs: offset(original(*args, **kwargs))
            elif step == 7:
                parametrize.register_parametrization(mlp.down_proj, "weight", Scale())

        try:
            losses, grads, _ = _train(model, _data("causal"), {3: 2}, cache=cache, after_step=after_step)
        finally:
            if change == "accelerate-hook":
                remove_hook_from_module(mlp)
            elif change == "patched-forward":
                vars(mlp).pop("forward", None)
        return losses, grads, calls[0]

    torch.manual_seed(0)
    model = _llama()
    expected_losses, expected_grads, expected_calls = run(copy.deepcopy(model), cache=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, grads, calls = run(model, cache=True)
    assert calls == expected_calls > 0
    assert [loss.item() for loss in losses] == [loss.item() for loss in expected_losses]  # bitwise
    for step, (got, expected) in enumerate(zip(grads, expected_grads, strict=True)):
        assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True)), f"step {step + 1}"
    said = [str(w.message) for w in caught if "would be skipped by a step served from the cache" in str(w.message)]
    assert len(said) == 1 and ("replaced forward" in said[0] or "parametrization" in said[0]), said


def test_trainer_logs_the_cache_and_a_resumed_cached_run_equals_the_uninterrupted_one(tmp_path):
    def trainer(output_dir, seed, callback):
        torch.manual_seed(seed)
        args = TrainingArguments(
            output_dir=str(output_dir), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-3,
            use_cpu=True, report_to=[], save_strategy="steps", save_steps=7, logging_steps=3, seed=0, data_seed=0,
            disable_tqdm=True,
        )  # fmt: skip
        dataset = RandomTokenDataset(n=24, length=12, vocab=64, causal=True)
        return Trainer(model=_llama(), args=args, train_dataset=dataset, callbacks=[callback])

    # freezing at epoch ends: every batch of an epoch is cached at one cut, no block runs on a sub-batch (whose
    # rounding is the CPU's), and a run resumed mid-epoch with an empty cache computes what the full run served
    options = dict(freeze_start=0.0, freeze_level=0.8, freeze_every="epoch", granularity="block")
    options["cache_activations"] = True
    full_callback = LayerFreezingCallback(**options)
    full = trainer(tmp_path / "full", 0, full_callback)
    full.train()
    logs = [log for log in full.state.log_history if "loss" in log]
    assert all("layer_freeze/cache_bytes" in log for log in logs)
    rates = [log["layer_freeze/cache_hit_rate"] for log in logs if "layer_freeze/cache_hit_rate" in log]
    assert rates and max(rates) > 0  # reported once the prefix can be cached, and batches were served
    served = [log for log in logs if "layer_freeze/cache_hit_rate" in log]
    assert all(
        "layer_freeze/cache_rows_served" in log and "layer_freeze/cache_forward_flops_skipped" in log for log in served
    )
    assert max(log["layer_freeze/cache_forward_flops_skipped"] for log in served) > 0
    # the closing summary log follows no training forward: it reports no rate rather than a false 0
    assert "layer_freeze/cache_hit_rate" not in full.state.log_history[-1]
    resumed = trainer(tmp_path / "resumed", 7, LayerFreezingCallback(**options))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-7"))
    expected_tensors, expected_groups = _train_state(full)
    tensors, groups = _train_state(resumed)
    assert groups == expected_groups
    assert all(torch.equal(tensors[k], expected_tensors[k]) for k in expected_tensors)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ddp_processes_with_caching_stay_identical(tmp_path):
    worker = Path(__file__).parent / "workers" / "ddp_cache.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(worker), "--output", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    digests = [(tmp_path / f"rank{rank}.txt").read_text().split() for rank in range(2)]
    assert digests[0] == digests[1] and len(digests[0]) == 12  # every step, both ranks bitwise identical
    hits = [int((tmp_path / f"hits{rank}.txt").read_text()) for rank in range(2)]
    assert all(h > 0 for h in hits)  # each rank served its own cached examples


def test_dynamic_padding_stays_correct_and_only_identically_padded_examples_hit():
    """`DataCollatorWithPadding` pads each batch to its longest example: an example's key (its padded inputs) changes
    with the batch it falls in, so it hits only when padded the same way again. Every step is computed from the
    same inputs as uncached (to a sub-batch's rounding where a batch mixes served and computed rows)."""
    generator = torch.Generator().manual_seed(1)
    lengths = [4 + (i * 7) % 9 for i in range(N)]
    examples = [{"input_ids": torch.randint(3, 64, (n,), generator=generator).tolist()} for n in lengths]
    for example in examples:
        example["attention_mask"] = [1] * len(example["input_ids"])
        example["labels"] = len(example["input_ids"]) % 3
    collator = tf.DataCollatorWithPadding(_ByteTokenizer(), padding="longest")

    def run(cache: bool):
        torch.manual_seed(0)
        model = tf.BertForSequenceClassification(tf.BertConfig(**TEXT, num_labels=3, hidden_dropout_prob=0.0))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        freezer = LayerFreezer(model, optimizer, granularity="block", cache_activations=cache)
        if not cache:
            _EvalPrefix(model)
        freezer.freeze_units(2)
        order_generator = torch.Generator().manual_seed(2)
        losses = []
        for _ in range(4):
            order = torch.randperm(N, generator=order_generator).tolist()
            for start in range(0, N, BATCH):
                batch = collator([examples[i] for i in order[start : start + BATCH]])
                model.train()
                loss = model(**batch).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(loss.item())
        return losses, freezer

    expected, _ = run(cache=False)
    got, freezer = run(cache=True)
    # identically padded examples are served, the others in their batch computed: a sub-batch's rounding
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=ROUNDING, atol=ROUNDING)
    assert freezer.activation_cache.steps == 4 * N // BATCH  # every step looked the batch up (hits: reported)
    assert 0 < freezer.activation_cache.total_rows_served < 3 * N


# One batch's sub-batch rounding, from a single forward and backward (the run-long bound is ROUNDING).
SUB_BATCH = 1e-5
PARTIAL = ("llama", "bert", "timm-resnet")


def _batch(data: list[dict[str, torch.Tensor]], rows: list[int]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([data[i][k] for i in rows]) for k in data[0]}


def _loss_and_grads(model, batch):
    torch.manual_seed(5)  # dropout after the prefix draws the same numbers in both models
    model.train()
    loss = _forward(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _prefix_flops_per_example(model, batch, cut: int) -> float:
    """Ground truth: the forward FLOPs of the embeddings (or stem) and blocks 0..cut, from one uncached forward of
    `batch` in eval mode, per example."""
    from torch.utils.flop_counter import FlopCounterMode

    layout = prefix_layout(model)
    names = {id(m): n for n, m in model.named_modules()}
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False, depth=None) as counter:
        _forward(model, batch)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    prefix = [*layout.before, *layout.blocks[: cut + 1]]
    total = sum(sum(counts.get(f"{root}.{names[id(m)]}", {}).values()) for m in prefix)
    return total / len(next(iter(batch.values())))


@pytest.mark.parametrize("family", PARTIAL)
def test_a_batch_runs_the_prefix_only_on_its_rows_that_are_not_cached(family):
    """Rows cached and rows not in one batch: the prefix (embeddings or stem included) runs on the new rows only,
    the batch is assembled at the cut, and the new rows are stored. A batch wholly computed or wholly served is
    bitwise the uncached one; a mixed batch equals it to a sub-batch's rounding. Rows served and the prefix FLOPs
    they skip are counted."""
    build, kind = FAMILIES[family]
    torch.manual_seed(0)
    model = build()
    reference = copy.deepcopy(model)
    data = _data(kind)
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), granularity="block",
                           cache_activations=True)  # fmt: skip
    freezer.freeze_units(3)  # the embeddings (or stem) and blocks 0 and 1
    LayerFreezer(reference, torch.optim.SGD(reference.parameters(), lr=0.1), granularity="block").freeze_units(3)
    _EvalPrefix(reference)
    cache = freezer.activation_cache
    first = list(range(BATCH))
    mixed = [0, 8, 1, 9, 2, 10, 3, 11]  # cached rows between new ones: every level runs on a sub-batch
    per_example = _prefix_flops_per_example(copy.deepcopy(reference), _batch(data, first), cut=1)
    assert per_example > 0
    served = []
    for step, rows in enumerate((first, first, mixed)):
        batch = _batch(data, rows)
        loss, grads = _loss_and_grads(model, batch)
        expected_loss, expected_grads = _loss_and_grads(reference, batch)
        assert grads.keys() == expected_grads.keys()
        if step < 2:  # wholly computed, then wholly served: bitwise
            assert torch.equal(loss, expected_loss), step
            assert all(torch.equal(grads[n], expected_grads[n]) for n in grads), step
        else:
            torch.testing.assert_close(loss, expected_loss, rtol=SUB_BATCH, atol=SUB_BATCH)
            for name in grads:
                torch.testing.assert_close(grads[name], expected_grads[name], rtol=SUB_BATCH, atol=SUB_BATCH)
        served.append(cache.take_metrics())
    assert [m["layer_freeze/cache_rows_served"] for m in served] == [0, BATCH, 4]
    assert [m["layer_freeze/cache_row_hit_rate"] for m in served] == [0.0, 1.0, 0.5]
    assert [m["layer_freeze/cache_hit_rate"] for m in served] == [0.0, 1.0, 0.0]  # batches served entirely
    flops = [m["layer_freeze/cache_forward_flops_skipped"] for m in served]
    assert flops == [0.0, pytest.approx(BATCH * per_example), pytest.approx(4 * per_example)]
    assert (cache.total_rows, cache.total_rows_served) == (3 * BATCH, BATCH + 4)
    assert cache.total_flops_skipped == pytest.approx((BATCH + 4) * per_example)
    assert len(cache._entries) == 12  # the mixed batch's new rows were stored
    # and served: the mixed batch again is wholly cached
    _loss_and_grads(model, _batch(data, mixed))
    assert cache.take_metrics()["layer_freeze/cache_hit_rate"] == 1.0


def test_flops_are_counted_beside_a_forward_whose_inputs_require_a_gradient():
    """`enable_input_require_grads()` (gradient checkpointing's companion) makes the embeddings' output require a
    gradient, so the blocks of a computed batch build a graph: their FLOPs are counted on one row beside them, and
    the run stays bitwise the uncached one."""
    torch.manual_seed(0)
    model = _llama()
    reference = copy.deepcopy(model)
    data = _data("causal")
    batch = _batch(data, list(range(BATCH)))
    per_example = _prefix_flops_per_example(copy.deepcopy(model), batch, cut=1)
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), granularity="block",
                           cache_activations=True)  # fmt: skip
    for m in (model, reference):
        m.enable_input_require_grads()
    freezer.freeze_units(3)
    LayerFreezer(reference, torch.optim.SGD(reference.parameters(), lr=0.1), granularity="block").freeze_units(3)
    _EvalPrefix(reference)
    for _ in range(2):  # computed, then served
        loss, grads = _loss_and_grads(model, batch)
        expected_loss, expected_grads = _loss_and_grads(reference, batch)
        assert torch.equal(loss, expected_loss)
        assert all(torch.equal(grads[n], expected_grads[n]) for n in expected_grads)
    assert freezer.activation_cache.total_flops_skipped == pytest.approx(BATCH * per_example)


def test_past_the_budget_rows_are_neither_copied_nor_stored():
    torch.manual_seed(0)
    model = _llama()
    data = _data("causal")
    batch = _batch(data, list(range(BATCH)))
    keys, _, _ = example_keys((), {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    one_entry = 12 * 32 * 4 + len(keys[0])  # 12 tokens x 32 hidden, fp32, and its key
    freezer = LayerFreezer(model, torch.optim.SGD(model.parameters(), lr=0.1), granularity="block",
                           cache_activations=True, cache_max_bytes=3 * one_entry)  # fmt: skip
    freezer.freeze_units(3)
    cache = freezer.activation_cache
    _loss_and_grads(model, batch)
    assert len(cache._entries) == 3 and cache.bytes == 3 * one_entry  # the rows that fit, and only those
    _loss_and_grads(model, batch)
    assert cache.take_metrics()["layer_freeze/cache_rows_served"] == 3 + 0
    assert cache.total_rows_served == 3

    class Uncopyable:
        """A cut output that fails if anything copies it."""

        shape = (BATCH, 12, 32)

        def __len__(self):
            return BATCH

        def __getitem__(self, row):
            return torch.zeros(12, 32)

        def element_size(self):
            return 4

        def __getattr__(self, name):
            raise AssertionError(f"the output was read past the budget check: {name}")

    from hf_layer_freeze.activation_cache import _Step

    full = _Step([b"new" + k for k in keys], BATCH, (), [None] * BATCH, [-2] * BATCH, served=0)
    cache._store(full, Uncopyable(), range(BATCH), cache.cut)  # the budget is full: nothing is copied
    assert len(cache._entries) == 3 and cache.bytes == 3 * one_entry


def test_closing_gives_the_model_back_as_given_after_partial_batches():
    torch.manual_seed(0)
    model = tiny_timm("resnet10t", num_classes=3)
    given = copy.deepcopy(model)
    data = _data("timm")
    hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with LayerFreezer(model, optimizer, granularity="block", cache_activations=True) as freezer:
        freezer.freeze_units(3)
        for rows in (list(range(8)), [0, 8, 1, 9, 2, 10, 3, 11]):
            _forward(model, _batch(data, rows)).backward()
            optimizer.step()
            optimizer.zero_grad()
        assert freezer.activation_cache.total_rows_served == 4
    assert all("forward" not in vars(m) for m in model.modules())  # the cache's wrappers are gone
    assert {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()} == hooks
    assert all(p.requires_grad for p in model.parameters())
    frozen = dict(given.named_parameters())
    for name, param in list(model.named_parameters())[:20]:  # the stem and layer1, frozen throughout
        if name.startswith(("conv1", "bn1", "layer1")):
            assert torch.equal(param, frozen[name]), name
    # it computes as a plain model again: train mode everywhere, BatchNorm on batch statistics
    plain = copy.deepcopy(given)
    plain.load_state_dict(model.state_dict())
    batch = _batch(data, list(range(8)))
    model.train()
    plain.train()
    assert all(m.training for m in model.modules())
    assert torch.equal(model(batch["x"]), plain(batch["x"]))


class _ByteTokenizer(tf.PreTrainedTokenizerBase):
    """Just enough of a tokenizer for `DataCollatorWithPadding`: right padding with id 0."""

    pad_token = "<pad>"
    pad_token_id = 0
    padding_side = "right"
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self):
        pass


@pytest.mark.parametrize(
    ("tied", "embeddings", "never"),
    [
        (True, "unit", "model.embed_tokens.weight"),
        (False, "skip", "model.embed_tokens.weight"),
        (False, "merge", None),
    ],
    ids=["tied-embedding", "embeddings-skip", "untied-merge"],
)
def test_a_cache_that_can_never_serve_says_why_when_built(tied, embeddings, never):
    # A tied Llama's embed_tokens is the head's and embeddings="skip" keeps it training: the prefix can never be
    # frozen whole, so caching would silently do nothing all run.
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**TEXT, num_key_value_heads=2, tie_word_embeddings=tied))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        freezer = LayerFreezer(model, optimizer, cache_activations=True, embeddings=embeddings, head=["lm_head"])
    said = [str(w.message) for w in caught if "can never serve" in str(w.message)]
    if never is None:
        assert said == []
    else:
        assert len(said) == 1 and never in said[0] and (embeddings != "skip" or 'embeddings="skip"' in said[0])
    freezer.close()


def test_fsdp_is_refused_by_name_at_the_root_only_and_per_block(tmp_path):
    # ranks that skip a frozen module's forward would skip its all-gather: FSDP is refused however it wraps the model
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        root_only = FullyShardedDataParallel(_llama(), device_id=torch.device("cpu"), use_orig_params=True)
        per_block = _llama()
        for layer in per_block.model.layers:
            fully_shard(layer)
        fully_shard(per_block)
        for model in (root_only, per_block):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
            with pytest.raises(NotImplementedError, match="cache_activations=True does not support FSDP"):
                LayerFreezer(model, optimizer, cache_activations=True)
            LayerFreezer(model, optimizer).close()  # without caching: served
    finally:
        dist.destroy_process_group()
