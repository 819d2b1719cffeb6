"""Devices, precision and more than one process: which device a run uses, mixed precision, fused Adam, and data
parallel under torchrun (gradients averaged across ranks after each backward). Off, none of the speed options
changes a single number on CPU.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from .errors import UserError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA GPU here (try --device auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: this PyTorch has no MPS backend here (try --device auto)")
    return torch.device(name)


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL with one GPU per
    rank on CUDA, gloo on CPU. A plain `python script.py` is one process and joins nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (unchanged with one process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place (unchanged with one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (a plain bool with one process)."""
    if not dist.is_initialized():
        return bool(flag)
    on_gpu = dist.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
    tensor = torch.tensor([1 if flag else 0], device=torch.cuda.current_device() if on_gpu else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def average_gradients(*models: torch.nn.Module) -> None:
    """What DistributedDataParallel does after backward, done by hand: average each gradient over ranks.

    By hand, because the GAN calls D twice per step (real, then fake) and the VAE's loss goes through encode()
    and decoder() rather than forward(): DDP's hooks expect one forward per backward. Without bucketing this is
    slower than DDP for large models, but it cannot silently skip a parameter.
    """
    if not dist.is_initialized():
        return
    world_size = dist.get_world_size()
    for model in models:
        for param in model.parameters():
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad.div_(world_size)


def shard(batch_indices: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global batch: every world_size-th index, starting at its rank."""
    if not dist.is_initialized():
        return batch_indices
    return batch_indices[dist.get_rank()::dist.get_world_size()]


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp, or None for full float32."""
    if amp == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none. A disabled scaler
    passes everything straight through (scale() returns the loss, step() calls optimizer.step())."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def adam(params, device: torch.device, **kwargs) -> torch.optim.Adam:
    """Adam, fused into one kernel on CUDA (same maths, fewer launches); the default implementation elsewhere."""
    return torch.optim.Adam(params, fused=device.type == "cuda", **kwargs)


def compiled(fn, device: torch.device):
    """--compile: torch.compile with CUDA graphs on CUDA ("reduce-overhead": a step of a small model is bound by
    kernel launches, and a graph replays them all at once; it needs fixed shapes, which full batches give), the
    default mode elsewhere. Each network is compiled once per run: its first call traces it, later calls reuse it."""
    return torch.compile(fn, mode="reduce-overhead" if device.type == "cuda" else None)
