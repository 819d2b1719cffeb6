"""The Frechet distance of FID (Heusel et al., 2017) from feature statistics, and the real images' statistics
computed once and cached beside the data; Inception's FID and the classifier FID (gan_metrics.py) both use it.
Ours rather than torchmetrics' (`eigvals` of the non-symmetric S1 S2, on the CPU): the same number to 1e-6 relative
in a fraction of the time (tests/test_speed.py), in float64 throughout, as FID cancels large traces.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
import torch.nn as nn

from .files import atomic_path

STATS_VERSION = 1  # bump when what the statistics mean changes: old cache files are then never found
FID_BATCH = 250    # images per forward pass of the feature extractor


def math_device(device: torch.device) -> torch.device:
    """Where float64 maths on tensors from `device` runs: there if it has float64 (CUDA, CPU), else the CPU."""
    device = torch.device(device)
    return device if device.type in ("cuda", "cpu") else torch.device("cpu")


@torch.no_grad()
def extract_features(extractor: nn.Module, images_uint8: torch.Tensor, batch_size: int = FID_BATCH):
    """Run `extractor` over uint8 images [N, C, H, W], one-channel images repeated to RGB: a float64 tensor [N, d]
    on math_device(the extractor's device), or a tuple of them when the extractor returns several outputs."""
    device = next(extractor.parameters()).device
    keep = math_device(device)
    outputs = []
    for start in range(0, len(images_uint8), batch_size):
        x = images_uint8[start:start + batch_size].to(device)
        out = extractor(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)
        several = isinstance(out, (tuple, list))
        outputs.append([_to_float64(o, keep) for o in (out if several else [out])])
    columns = tuple(torch.cat(parts) for parts in zip(*outputs))
    return columns if several else columns[0]


def _to_float64(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Moved first, then converted: an MPS tensor cannot become float64 where it is."""
    return (tensor.cpu() if device.type == "cpu" else tensor.to(device)).double()


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [d], unbiased covariance [d, d]) of features [N, d], in float64 on math_device(their device)."""
    features = features.to(math_device(features.device)).double()
    mean = features.mean(0)
    return mean, symmetric_gram(features - mean) / (len(features) - 1)


def symmetric_gram(x: torch.Tensor, blocks: int = 8) -> torch.Tensor:
    """x^T x from its upper block triangle, mirrored: 36 of the 64 block products. The covariances are most of an
    FID's time on a CPU (10,000 x 2048 features on 2 cores: 0.64 s each this way, 1.02 s as one product)."""
    d = x.shape[1]
    out = torch.empty((d, d), dtype=x.dtype, device=x.device)
    edges = [d * i // blocks for i in range(blocks + 1)]
    for start, end in zip(edges, edges[1:]):
        row = x[:, start:end].T @ x[:, start:]
        out[start:end, start:] = row
        out[end:, start:end] = row[:, end - start:].T
    return out


def frechet_distance(mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor) -> float:
    """The Frechet distance between N(mean1, cov1) and N(mean2, cov2). tr(sqrt(S1 S2)) is the trace of the square
    root of F^T S2 F for any F with F F^T = S1 (it has the eigenvalues of S1 S2, and is symmetric): F is S1's
    Cholesky factor (a twentieth of the time of an eigendecomposition), or sqrt(S1) from eigh(S1) when S1 is
    singular (a feature that never varies). Tiny negative eigenvalues (rounding) count as 0."""
    device = math_device(mean1.device)
    mean1, cov1, mean2, cov2 = (t.to(device).double() for t in (mean1, cov1, mean2, cov2))
    factor, info = torch.linalg.cholesky_ex(cov1)
    if info.item() != 0:
        eigenvalues, eigenvectors = torch.linalg.eigh(cov1)
        factor = eigenvectors * eigenvalues.clamp(min=0).sqrt()
    middle = factor.T @ cov2 @ factor
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return float((mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt)


def fid_from_features(real_features: torch.Tensor, fake_features: torch.Tensor) -> float:
    """FID between two feature sets [N, d] (any N >= 2 each)."""
    return frechet_distance(*feature_statistics(real_features), *feature_statistics(fake_features))


def _hash_tensor(digest, tensor: torch.Tensor) -> None:
    digest.update(f"{tuple(tensor.shape)} {tensor.dtype};".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def statistics_key(extractor: nn.Module, images_uint8: torch.Tensor, batch_size: int) -> str:
    """A hash of what the real statistics depend on: the images' bytes (so the data set, --train-limit, the sample
    count and the seed that picked them), the extractor's class and weights, the device type (CPU and CUDA differ in
    the last bits) and the batch size."""
    device = next(extractor.parameters()).device
    digest = hashlib.sha256(f"v{STATS_VERSION} {type(extractor).__qualname__} {device.type} {batch_size};".encode())
    for name, tensor in sorted(extractor.state_dict().items()):
        digest.update(name.encode())
        _hash_tensor(digest, tensor)
    _hash_tensor(digest, images_uint8)
    return digest.hexdigest()[:24]


def statistics_dir(dataset: str, data_dir) -> Path:
    """Where a data set's cached statistics live: DATA_DIR/fid-stats/, or, for an image folder (where a new
    subfolder would be read as one more class of images), torch's hub cache."""
    return (Path(torch.hub.get_dir()) if dataset == "folder" else Path(data_dir)) / "fid-stats"


def real_statistics(extractor: nn.Module, images_uint8: torch.Tensor, cache_dir=None, batch_size: int = FID_BATCH,
                    log=print) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, covariance) of the extractor's (first) features of `images_uint8`: from cache_dir/<key>.pt when
    there, else extracted and cached there (atomically). cache_dir None: no cache."""
    keep = math_device(next(extractor.parameters()).device)
    path = Path(cache_dir) / f"{statistics_key(extractor, images_uint8, batch_size)}.pt" if cache_dir else None
    if path is not None and path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            mean, cov = cached["mean"], cached["cov"]
        except Exception as err:  # truncated or garbage: say so, compute them again (and replace it)
            log(f"FID statistics: {path} does not load ({type(err).__name__}); computing them again")
        else:
            log(f"FID statistics of the real images from {path}")
            return mean.to(keep), cov.to(keep)
    features = extract_features(extractor, images_uint8, batch_size)
    mean, cov = feature_statistics(features[0] if isinstance(features, tuple) else features)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save({"mean": mean.cpu(), "cov": cov.cpu(), "images": len(images_uint8)}, tmp)
            log(f"FID statistics of {len(images_uint8):,} real images cached at {path}")
        except OSError as err:  # a read-only data folder: the same numbers, computed again next time
            log(f"FID statistics: could not cache them at {path} ({err}); computed in memory, again next time")
    return mean, cov
