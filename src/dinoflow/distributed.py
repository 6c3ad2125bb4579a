"""Distributed state, a leaf every layer may use: world, device, backend, process group, FSDP2.

Processes are started by torchrun or SLURM (``dinoflow.launch``); this module only answers
"which process am I, on which device" and holds the collective helpers the training loop and
the losses need. Outside torch.distributed every helper is the single-process identity.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- who am I
def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside torch.distributed."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """Global rank 0, or the only process: the one that writes files and logs to MLflow."""
    return world()[0] == 0


def resolve_device(want: str, key: str = "pretrain.train.device") -> torch.device:
    """A ``device`` setting (auto / cpu / cuda, or an explicit one such as cuda:1) -> a device.
    auto and cuda: this process's GPU (LOCAL_RANK's), so every stage of a run (training,
    evaluation, curation's embedder, embed, export) lands where training does."""
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{key}={want} but no CUDA device is visible")
    if want == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(want)


def backend_for(backend: str, device: torch.device) -> str:
    """``launcher.backend``; auto: NCCL when training on CUDA, Gloo on CPU."""
    if backend != "auto":
        return backend
    return "nccl" if device.type == "cuda" else "gloo"


def visible_gpus() -> int:
    """CUDA devices this process can see (0 without CUDA)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def log_per_rank() -> None:
    """Logging for a process a launcher started (no Kedro logging there): INFO on rank 0,
    warnings only elsewhere, each line naming its rank."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# --------------------------------------------------------------------------- the group
def init_from_env(backend: str) -> bool:
    """Join the process group torchrun/submitit describe in the env (RANK, WORLD_SIZE, MASTER_*).

    Binds this process's GPU from LOCAL_RANK first (NCCL needs it). Returns False, doing
    nothing, when the environment describes no group or the group is already joined.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or is_distributed():
        return False
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, init_method="env://")
    log.info("rank %d of %d joined (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def leave() -> None:
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In place sum over processes (identity on one process); returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """In place mean over processes of equal-sized contributions; returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return tensor


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.broadcast(tensor, 0)
    return tensor


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's picklable ``obj``, in rank order ([obj] on one process)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object_from_main(obj: Any) -> Any:
    """Rank 0's picklable ``obj`` on every process (``obj`` itself on one process)."""
    if not is_distributed():
        return obj
    box = [obj if is_main_process() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- FSDP2
def shard_ssl_model(model: Any, device_type: str) -> None:
    """FSDP2 (``fully_shard``) in place: each ViT block, the backbone, each head, the root.

    Parameters become DTensors sharded over all processes; each unit is gathered for its
    forward and its gradients reduce-scattered in backward. ``forward_features`` and
    ``teacher_forward`` are not ``forward``: they are registered so they gather too.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for block in model.backbone.vit.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model.backbone, mesh=mesh)
    register_fsdp_forward_method(model.backbone, "forward_features")
    register_fsdp_forward_method(model.backbone, "get_intermediate_layers")  # online kNN
    for head in model.heads().values():
        fully_shard(head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    register_fsdp_forward_method(model, "teacher_forward")


def _fqn_order(optimizer: torch.optim.Optimizer) -> list[str]:
    """Model paths of the optimizer's parameters in its own order (its state-dict indices).

    ``param_groups`` names backbone parameters relative to the backbone, heads by their key.
    """
    return [
        name if group.get("is_backbone") is False else f"backbone.{name}"
        for group in optimizer.param_groups
        for name in group["param_names"]
    ]


def gather_full_state(
    model: Any, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict, dict | None]:
    """Unsharded (model, optimizer) state dicts on CPU, in the plain single-process layout
    (optimizer state keyed by index, as ``optimizer.state_dict()``); a collective call.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    if optimizer is None:
        return model_sd, None
    by_fqn = get_optimizer_state_dict(model, optimizer, options=options)
    index = {fqn: i for i, fqn in enumerate(_fqn_order(optimizer))}
    plain = optimizer.state_dict()  # param_groups (hyper-parameters, names) with index lists
    plain["state"] = {index[fqn]: v for fqn, v in by_fqn.get("state", {}).items()}
    return model_sd, plain


def load_full_state(
    model: Any,
    model_sd: dict,
    optimizer: torch.optim.Optimizer | None = None,
    optim_sd: dict | None = None,
) -> None:
    """Load plain (unsharded) state dicts, as ``gather_full_state`` or one process writes them,
    into a sharded model and its optimizer; every process calls it with the same dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_sd, options=options)
    if optimizer is None or optim_sd is None:
        return
    fqns = _fqn_order(optimizer)
    groups, start = [], 0
    for saved, live in zip(optim_sd["param_groups"], optimizer.param_groups, strict=True):
        n = len(live["params"])
        groups.append({**saved, "params": fqns[start : start + n]})
        start += n
    by_fqn = {
        "state": {fqns[int(i)]: v for i, v in optim_sd["state"].items()},
        "param_groups": groups,
    }
    set_optimizer_state_dict(model, optimizer, by_fqn, options=options)
