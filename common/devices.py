"""Which device a run uses (and why not a GPU that was meant), mixed precision, deterministic algorithms, fused
Adam, and data parallel under torchrun. Off, none of the speed options changes a single number on CPU.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .errors import EXIT_USER_ERROR, UserError

# The fixes for a GPU that PyTorch cannot use, in one line each: the make target, because a plain `pip install`
# keeps the torch already in .venv (docs/operations.md, "An older driver or GPU"; the Makefile's TORCH_INDEX).
INSTALL_FIX = ("replace this PyTorch by the CUDA 12.6 build, which runs on drivers from 525 and on GPUs from "
               "compute capability 5.0 (V100, P100): make torch TORCH_INDEX=cu126 (docs/operations.md, 'An older "
               "driver or GPU')")
CPU_FIX = "or pass --device cpu to train on the CPU on purpose"
# The NVIDIA kernel driver's folder: there on a machine with an NVIDIA GPU even when nvidia-smi is not (tests move it)
NVIDIA_PROC = Path("/proc/driver/nvidia")


def pick_device(name: str) -> torch.device:
    """--device: auto picks CUDA, then MPS, then the CPU, but never the CPU when this machine or job has a GPU that
    PyTorch cannot use (unusable_gpu; CUDA_VISIBLE_DEVICES naming no device hides them on purpose): that is a
    UserError saying which GPU, why and what to do."""
    with warnings.catch_warnings():  # its reason, once: why_no_cuda() quotes PyTorch's own words on the one line
        warnings.simplefilter("ignore")
        cuda = name in ("auto", "cuda") and torch.cuda.is_available()
    if cuda:
        check_cuda_kernels()
        return torch.device("cuda")
    if name == "cuda":
        raise UserError(f"--device cuda: {why_no_cuda()}, {CPU_FIX}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: this PyTorch has no MPS backend here (try --device auto)")
    if name == "auto":
        if torch.backends.mps.is_available():
            return torch.device("mps")
        if gpu := unusable_gpu():
            raise UserError(f"{gpu} but PyTorch cannot use it, and a run is not moved to the CPU without a word: "
                            f"{why_no_cuda()}, {CPU_FIX}")
    return torch.device("cpu" if name == "auto" else name)


def unusable_gpu() -> str | None:
    """Where torch.cuda.is_available() is False: 'this job was given a GPU (NAME=value)' or 'this machine has an
    NVIDIA GPU (its name, driver ...)', or None when there is no GPU to miss. The machine's GPUs do not count in a
    SLURM job (a CPU job on a GPU node; its GPUs are SLURM's to give) or when CUDA_VISIBLE_DEVICES hides them."""
    if given := gpus_given():
        return f"this job was given a GPU ({given})"
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None or os.environ.get("SLURM_JOB_ID"):
        return None
    gpu = nvidia_gpu()
    return f"this machine has an NVIDIA GPU ({gpu})" if gpu else None


def nvidia_gpu() -> str | None:
    """'NAME, driver VERSION' of this machine's NVIDIA GPU(s), whether or not PyTorch can use them, from nvidia-smi,
    else from the kernel driver's NVIDIA_PROC folder; None when neither shows one."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # no nvidia-smi, or it hangs: ask the driver
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60)
        rows = [line.rsplit(",", 1) for line in proc.stdout.splitlines() if "," in line]
        if proc.returncode == 0 and rows:
            names = sorted({name.strip() for name, _ in rows})
            return f"{len(rows)} x {' + '.join(names)}, driver {rows[0][1].strip()}"
    if not NVIDIA_PROC.is_dir():
        return None
    models = [line.split(":", 1)[1].strip() for info in sorted(NVIDIA_PROC.glob("gpus/*/information"))
              for line in info.read_text(errors="replace").splitlines() if line.startswith("Model:")]
    version = (NVIDIA_PROC / "version").read_text(errors="replace") if (NVIDIA_PROC / "version").exists() else ""
    driver = next((w for w in version.split() if w[:1].isdigit() and "." in w), "unknown")
    return f"{' + '.join(models) or 'model unknown'}, driver {driver}"


def gpus_given() -> str | None:
    """Which environment variable says this process was given a GPU, as 'NAME=value', or None. Empty, '-1',
    'none' and 'NoDevFiles' (what SLURM sets for a job without GPUs) name no device; neither does 0 GPUs."""
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = os.environ.get(key, "").strip()
        if value.lower() in ("", "-1", "none", "nodevfiles") or (key == "SLURM_GPUS_ON_NODE" and value == "0"):
            continue
        return f"{key}={value}"
    return None


def why_no_cuda() -> str:
    """Why torch.cuda.is_available() is False, in PyTorch's own words where it has them, and what to do."""
    if torch.version.cuda is None:
        return (f"this PyTorch ({torch.__version__}) is a CPU-only build; replace it by a CUDA build: make torch "
                f"TORCH_INDEX=cu130 (cu126 for a driver older than 580 or a GPU older than Turing: docs/operations.md)")
    try:
        torch.cuda.init()  # raises the reason is_available() only warned about (once, maybe before we looked)
        reason = "PyTorch sees no CUDA GPU"
    except Exception as err:  # RuntimeError or AssertionError, by PyTorch version
        reason = " ".join(str(err).split())
    if "too old" in reason:
        return (f"the NVIDIA driver is too old for this PyTorch's CUDA {torch.version.cuda} build ({reason}); "
                f"{INSTALL_FIX}")
    return (f"no usable GPU is visible to PyTorch {torch.__version__} (CUDA {torch.version.cuda} build): {reason}; "
            f"check that the job got a GPU and that nvidia-smi lists it")


def check_cuda_kernels() -> None:
    """UserError unless this PyTorch has kernels for the GPU: a cubin of the same major compute capability and a
    minor one no higher (sm_80 runs on 8.6, not the reverse), or PTX of a capability no higher (compiled on first
    use). Without it the first kernel fails with 'no kernel image is available' (a V100 under CUDA 13 builds)."""
    major, minor = torch.cuda.get_device_capability()
    arch_list = torch.cuda.get_arch_list()
    if not arch_list:
        return  # a build that does not say (ROCm): let PyTorch decide

    def version(arch):
        digits = arch.split("_")[1].rstrip("af")
        return int(digits[:-1]), int(digits[-1])

    cubins = [version(a) for a in arch_list if a.startswith("sm_")]
    ptx = [version(a) for a in arch_list if a.startswith("compute_")]
    if any(m == major and n <= minor for m, n in cubins) or any((m, n) <= (major, minor) for m, n in ptx):
        return
    raise UserError(f"this PyTorch ({torch.__version__}, CUDA {torch.version.cuda}) has no kernels for the GPU "
                    f"{torch.cuda.get_device_name()} (compute capability {major}.{minor}; the build has "
                    f"{' '.join(arch_list)}): {INSTALL_FIX}, {CPU_FIX}")


def describe(device: torch.device, precision: str) -> dict:
    """What a run records about where it ran: device, its name, precision, torch / CUDA / cuDNN versions."""
    info = {"device": str(device), "precision": precision, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        info.update(device_name=torch.cuda.get_device_name(device), capability=f"{major}.{minor}",
                    gpus_visible=torch.cuda.device_count())
    elif device.type == "mps":
        info["device_name"] = "Apple GPU (MPS)"
    else:
        info["device_name"] = f"CPU, torch threads: {torch.get_num_threads()}"
    return info


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL with one GPU per
    rank on CUDA, gloo on CPU. A plain `python script.py` is one process and joins nothing."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        local_rank, n_gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        if local_world > n_gpus:  # every rank sees it before any waits for the others: all exit 2, one says why
            if local_rank == 0:
                raise UserError(f"torchrun started {local_world} processes on this node but {n_gpus} GPU(s) are "
                                f"visible; one process per GPU: --nproc_per_node {n_gpus}")
            raise SystemExit(EXIT_USER_ERROR)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size, device


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (unchanged with one process)."""
    box = [obj]
    if dist.is_initialized():
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
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces CUDA tensors only
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def average_gradients(model: torch.nn.Module) -> None:
    """What DistributedDataParallel does after backward, by hand (docs/design.md, "Several GPUs", says why): the
    gradients averaged over the ranks, all of a model's in one flattened all-reduce (a step of these small models is
    bound by launches and latency, so one collective a model, not one a parameter). Nothing with one process."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for grad, averaged in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(averaged)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for --amp, or None for full float32. auto: bf16 where the GPU has it in hardware
    (compute capability 8.0, Ampere, and newer), fp16 with a loss scaler on older CUDA GPUs (a T4, a V100:
    is_bf16_supported() also counts emulated bf16, which is slow there), float32 on the CPU and MPS."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def precision_name(dtype: torch.dtype | None) -> str:
    """'bf16', 'fp16' or 'fp32': what a checkpoint and config.json record."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none. A disabled scaler
    passes everything straight through (scale() returns the loss, step() calls optimizer.step())."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


@contextlib.contextmanager
def determinism(mode: str):
    """--deterministic on: the same GPU model, precision and flags give the same numbers run after run, so a
    resumed run equals an uninterrupted one there too (PyTorch documents CUDA convolutions as nondeterministic
    otherwise). off: cuDNN picks its fastest algorithms by timing them (cudnn.benchmark), the fast path.
    Enter it before any CUDA work: cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it starts (PyTorch's
    "Reproducibility" notes). Restores PyTorch's previous settings on the way out (a test in one process).
    Without the NaN fill of every new tensor that deterministic mode turns on: a debugging aid that changes no
    result of correct code but costs 277 of a DCGAN step's 1,397 aten ops (docs/results.md)."""
    on = mode == "on"
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    flags = torch.utils.deterministic
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark, flags.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = on, not on
    flags.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]
        flags.fill_uninitialized_memory = before[3]


def adam(params, device: torch.device, **kwargs) -> torch.optim.Adam:
    """Adam, fused into one kernel on CUDA (same maths, fewer launches); the default implementation elsewhere."""
    return torch.optim.Adam(params, fused=device.type == "cuda", **kwargs)


def compiled(fn, device: torch.device):
    """--compile: torch.compile with CUDA graphs on CUDA ("reduce-overhead": a step of a small model is bound by
    kernel launches, and a graph replays them all at once; it needs fixed shapes, which full batches give), the
    default mode elsewhere. Each network is compiled once per run: its first call traces it, later calls reuse it."""
    return torch.compile(fn, mode="reduce-overhead" if device.type == "cuda" else None)
