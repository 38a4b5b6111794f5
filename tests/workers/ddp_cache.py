"""Worker for tests/test_activation_cache.py: a causal LM under 2-process DDP (gloo, CPU) with activation caching.

Run with `torchrun --nproc_per_node 2`. Each rank keeps its shard (`FixedShardSampler`) and caches its own examples.
After every optimizer step it writes the digest of every parameter, and at the end how many batches it served from its
cache: OUT/rank{N}.txt, OUT/hits{N}.txt.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import RandomTokenDataset, params_digest  # noqa: E402

from hf_layer_freeze import LayerFreezer  # noqa: E402
from hf_layer_freeze.activation_cache import FixedShardSampler  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64)  # fmt: skip
    model = DistributedDataParallel(LlamaForCausalLM(config))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    freezer = LayerFreezer(model, optimizer, granularity="block", cache_activations=True)
    dataset = RandomTokenDataset(n=32, length=12, vocab=64, causal=True)
    sampler = FixedShardSampler(dataset, seed=0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler)
    digests, step = [], 0
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in loader:
            model.train()
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            digests.append(params_digest(model))
            if step in (2, 5):  # the embeddings and layer 0, then layer 1
                freezer.freeze_units({2: 2, 5: 3}[step])
    out = Path(args.output)
    (out / f"rank{rank}.txt").write_text(" ".join(digests))
    (out / f"hits{rank}.txt").write_text(str(freezer.activation_cache.hits))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
