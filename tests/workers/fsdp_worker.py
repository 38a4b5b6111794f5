"""Worker for tests/test_multiprocess.py: LayerFreezer under FSDP2 (`fully_shard`) or FSDP1, 2 processes, gloo.

Run with `torchrun --nproc_per_node 2 fsdp_worker.py --out DIR --fsdp {2,1-orig,1-flat}`. Checks after every step
that the full (unsharded) parameters are identical on both ranks and that frozen ones are unchanged; with `1-flat`,
that the freezer refuses the wrapper and the module inside it. Midway, after a freeze event, it saves the optimizer
through torch's distributed checkpoint (`get_optimizer_state_dict` + `dcp.save`), and at the end loads that
checkpoint (`dcp.load` + `set_optimizer_state_dict`) into the frozen optimizer and into a fresh model's fresh one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import timm
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import tensors_digest  # noqa: E402

from hf_layer_freeze import LayerFreezer  # noqa: E402


def full_parameters(model) -> dict[str, torch.Tensor]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            return {n: p.detach().clone() for n, p in model.module.named_parameters()}
    out = {}
    for name, param in model.named_parameters():
        tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
        out[name] = tensor.detach().clone()
    return out


def digest(tensors: dict[str, torch.Tensor]) -> str:
    return tensors_digest(tensors[name] for name in sorted(tensors))


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's full (unsharded) state through torch's distributed checkpoint API: a digest of its tensors,
    the parameter names its groups hold and those that have state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    state = full["state"]
    tensors = [torch.as_tensor(state[name][key]) for name in sorted(state) for key in sorted(state[name])]
    grouped = sorted(name for group in full["param_groups"] for name in group["params"])
    return {"digest": tensors_digest(tensors), "grouped": grouped, "with_state": sorted(state)}


def save_optimizer(model, optimizer, checkpoint: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=checkpoint)


def load_optimizer(model, optimizer, checkpoint: str) -> None:
    """As Accelerate's FSDP2 loading does: a template from the optimizer, filled by `dcp.load`, then set."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    template = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(template, checkpoint_id=checkpoint)
    set_optimizer_state_dict(model, optimizer, template["optimizer"])


def build(mode: str, world: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    if mode == "2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            fully_shard(stage, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=mode == "1-orig")


def all_same(value) -> bool:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return all(v == values[0] for v in values)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--fsdp", required=True, choices=["2", "1-orig", "1-flat"])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(args.fsdp, world)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    result = {"rank": rank, "world_size": world}
    try:
        freezer = LayerFreezer(model, optimizer, freeze_start=0.2, freeze_level=1.0)
    except NotImplementedError as error:
        result["refused"] = str(error)
        freezer = None
    if args.fsdp == "1-flat":  # the module inside the wrapper holds the flat parameters: refused too
        try:
            LayerFreezer(model.module, optimizer, freeze_start=0.2, freeze_level=1.0)
        except NotImplementedError as error:
            result["refused_inner_module"] = str(error)
    identical, unchanged, counts = True, True, []
    if freezer is not None:
        generator = torch.Generator().manual_seed(100 + rank)
        frozen_before: dict[str, torch.Tensor] = {}
        for step in range(1, args.steps + 1):
            x = torch.randn(8, 3, 32, 32, generator=generator)
            y = torch.randint(0, 10, (8,), generator=generator)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            params = full_parameters(model)
            digests = [None] * world
            dist.all_gather_object(digests, digest(params))
            identical &= len(set(digests)) == 1
            for name, before in frozen_before.items():
                unchanged &= torch.equal(before, params[name])
            freezer.update(step / args.steps)
            counts.append(freezer.frozen_units)
            frozen_names = {n for u in freezer.units[: freezer.frozen_units] for n in u.parameter_names}
            for name in frozen_names:
                frozen_before.setdefault(name, params[name])
            if step == args.steps // 2:  # after a freeze event, some units still training
                checkpoint = os.path.join(args.out, "optimizer-checkpoint")
                saved = optimizer_state(model, optimizer)
                save_optimizer(model, optimizer, checkpoint)
                result.update(saved=saved, frozen_at_save=sorted(frozen_names), saved_same=all_same(saved))
        result.update(num_units=freezer.num_units, counts=counts)
        # the checkpoint, loaded into the (now more) frozen optimizer, whose state went on, and into a fresh one
        result["before_load"] = optimizer_state(model, optimizer)
        before = full_parameters(model)
        result["names"] = sorted(before)
        load_optimizer(model, optimizer, checkpoint)
        result["loaded_frozen"] = optimizer_state(model, optimizer)
        result["parameters_kept"] = digest(full_parameters(model)) == digest(before)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        trainable = {id(p) for group in optimizer.param_groups for p in group["params"]}
        result["still_frozen"] = len(frozen) > 0 and all(id(p) not in trainable and p.grad is None for p in frozen)
        fresh = build(args.fsdp, world)
        fresh_optimizer = torch.optim.SGD(fresh.parameters(), lr=0.05, momentum=0.9)
        load_optimizer(fresh, fresh_optimizer, checkpoint)
        result["loaded_fresh"] = optimizer_state(fresh, fresh_optimizer)
        result["loaded_same"] = all_same([result["loaded_frozen"], result["loaded_fresh"]])
    result.update(identical=identical, unchanged=unchanged)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
