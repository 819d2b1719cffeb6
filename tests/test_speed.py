"""Fast where it counts (issue 20), checked in-process: the Frechet distance against torchmetrics', the cached real
statistics, the non-finite check on the running sums, D's weights left out of G's step, and --compile compiling
each network once. Benchmarks measure (tools/bench.py); these check."""
from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn

from common import fid, gan_metrics
from common.data import full_batches
from common.errors import UserError
from common.run import Meter, Run
import dcgan_train
from conftest import make_mnist
from tiny_data import synthetic_digits


def torchmetrics_fid(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The reference: torchmetrics' FrechetInceptionDistance on features, in float64 (what we used before)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    metric = FrechetInceptionDistance(feature=gan_metrics._Precomputed(real.shape[1]))
    metric.set_dtype(torch.float64)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    return float(metric.compute())


class TinyFeatures(nn.Module):
    """A fixed random conv net standing in for Inception: uint8 [N, 3, H, W] -> ([N, 16] features, [N, 4])."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        features = self.net(x.float() / 255)
        return features, features[:, :4]


def images(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(synthetic_digits(n, 32, 3, seed)[0]).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# The Frechet distance


@pytest.mark.parametrize("shift, scale", [(0.0, 1.0), (0.3, 1.5)], ids=["same-distribution", "shifted"])
def test_frechet_distance_equals_torchmetrics_on_random_features(shift, scale):
    gen = torch.Generator().manual_seed(0)
    mixing = torch.randn(64, 64, generator=gen, dtype=torch.float64) / 8  # correlated features
    real = torch.randn(800, 64, generator=gen, dtype=torch.float64) @ mixing
    fake = (torch.randn(700, 64, generator=gen, dtype=torch.float64) @ mixing) * scale + shift
    ours, reference = fid.fid_from_features(real, fake), torchmetrics_fid(real, fake)
    assert ours == pytest.approx(reference, rel=1e-6)


def test_frechet_distance_equals_torchmetrics_on_features_of_images():
    """Real-ish features: a small conv net on the synthetic digits, one feature dead (a singular covariance: the
    eigendecomposition path instead of the Cholesky factor)."""
    extractor = TinyFeatures()
    real, _ = fid.extract_features(extractor, images(400, seed=1))
    fake, _ = fid.extract_features(extractor, (images(300, seed=2).int() + 30).clamp(0, 255).to(torch.uint8))
    assert fid.fid_from_features(real, fake) == pytest.approx(torchmetrics_fid(real, fake), rel=1e-6)
    real[:, 3], fake[:, 3] = 0.0, 0.0  # a feature that never varies
    assert torch.linalg.cholesky_ex(fid.feature_statistics(real)[1])[1].item() != 0
    assert fid.fid_from_features(real, fake) == pytest.approx(torchmetrics_fid(real, fake), rel=1e-6)
    assert abs(fid.fid_from_features(real, real)) < 1e-9


# ----------------------------------------------------------------------------------------------------------------
# The real images' statistics, cached


def test_real_statistics_are_cached_reused_and_rebuilt_when_an_input_changes(tmp_path):
    extractor, real, lines = TinyFeatures(), images(300, seed=1), []
    mean, cov = fid.real_statistics(extractor, real, tmp_path, batch_size=100, log=lines.append)
    assert extractor.calls == 3 and len(list(tmp_path.glob("*.pt"))) == 1 and "cached at" in lines[-1]
    features, _ = fid.extract_features(TinyFeatures(), real, batch_size=100)
    assert torch.equal(mean, fid.feature_statistics(features)[0]) and torch.equal(cov, fid.feature_statistics(features)[1])

    extractor.calls = 0
    again = fid.real_statistics(extractor, real, tmp_path, batch_size=100, log=lines.append)
    assert extractor.calls == 0, "the statistics were extracted again instead of read from the cache"
    assert torch.equal(again[0], mean) and torch.equal(again[1], cov) and "from" in lines[-1]

    fid.real_statistics(extractor, real[:299], tmp_path, batch_size=100, log=lines.append)  # other images
    assert extractor.calls == 3
    other_weights = TinyFeatures(seed=1)
    fid.real_statistics(other_weights, real, tmp_path, batch_size=100, log=lines.append)  # another extractor
    assert other_weights.calls == 3 and len(list(tmp_path.glob("*.pt"))) == 3
    assert not list(tmp_path.glob(".*tmp-*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_warns_and_computes_in_memory(tmp_path):
    folder = tmp_path / "fid-stats"
    folder.mkdir()
    folder.chmod(0o500)
    lines = []
    try:
        mean, _ = fid.real_statistics(TinyFeatures(), images(50, seed=1), folder, log=lines.append)
    finally:
        folder.chmod(0o700)
    assert mean.shape == (16,) and "could not cache" in lines[-1] and not list(folder.iterdir())


def test_an_unwritable_cache_path_warns_and_computes_in_memory(tmp_path):
    """As root (CI containers) a read-only folder is writable; a file where the folder should be is not."""
    (tmp_path / "fid-stats").write_text("not a folder")
    lines = []
    mean, _ = fid.real_statistics(TinyFeatures(), images(50, seed=1), tmp_path / "fid-stats", log=lines.append)
    assert mean.shape == (16,) and "could not cache" in lines[-1]


def test_the_classifier_fid_reuses_its_cached_test_statistics(tmp_path):
    data_dir = make_mnist(tmp_path / "data", n_train=200, n_test=120)
    first = gan_metrics.ClassifierFID.for_dataset("mnist", data_dir, "cpu", log=lambda _: None)
    assert len(list((data_dir / "fid-stats").glob("*.pt"))) == 1
    lines = []
    second = gan_metrics.ClassifierFID.for_dataset("mnist", data_dir, "cpu", log=lines.append)
    assert any("FID statistics of the real images from" in line for line in lines), lines
    for a, b in zip(first.reference_stats, second.reference_stats):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------------------
# The training step


def test_the_non_finite_check_reads_the_meter_and_names_the_steps_since_the_last_check(tmp_path):
    run, meter = Run.__new__(Run), Meter(torch.device("cpu"))
    meter.add(loss=torch.tensor(1.0), kl=torch.tensor(2.0))
    run.meter, run.divergence_hint = meter, "a lower --lr"
    run.dir, run.script, run.steps_per_epoch, run._finite_through, run.good_ckpt = tmp_path, "vae", 10, 10, None
    run.global_step = 13
    run._stop_if_non_finite()  # finite: nothing happens, the check moves on
    assert run._finite_through == 13
    meter.add(loss=torch.tensor(1.0), kl=torch.tensor(math.nan))
    run.global_step = 16
    with pytest.raises(UserError, match=r"non-finite loss at epoch 2, steps 4-6; stopped without saving"):
        run._stop_if_non_finite()
    run._finite_through = 15
    with pytest.raises(UserError, match=r"non-finite loss at epoch 2, step 6;"):
        run._stop_if_non_finite()


def one_gan_step(tmp_path, monkeypatch, *flags) -> dict:
    """One DCGAN step through dcgan_train.main (16 images, batch 16), with G, D and each update_ema call caught."""
    caught = {"ema": []}
    real_build, real_ema = dcgan_train.build_models, dcgan_train.update_ema

    def build_models(args, channels):
        caught["G"], caught["D"] = real_build(args, channels)
        caught["G_init"] = [p.detach().clone() for p in caught["G"].parameters()]
        caught["names"] = [name for name, _ in caught["D"].named_parameters()]
        caught["accumulated"] = []
        for name, param in caught["D"].named_parameters():
            param.register_post_accumulate_grad_hook(lambda p, name=name: caught["accumulated"].append(name))
        return caught["G"], caught["D"]

    def update_ema(ema_model, model, decay):
        real_ema(ema_model, model, decay)
        caught["ema"].append(([p.clone() for p in ema_model.parameters()], decay))
    monkeypatch.setattr(dcgan_train, "build_models", build_models)
    monkeypatch.setattr(dcgan_train, "update_ema", update_ema)
    data = make_mnist(tmp_path / "data")
    assert dcgan_train.main(["--data-dir", str(data), "--dataset", "mnist", "--train-limit", "16", "--batch-size",
                             "16", "--ngf", "8", "--ndf", "8", "--epochs", "1", "--fid", "off", "--device", "cpu",
                             "--run-dir", str(tmp_path / "run"), *flags]) == 0
    return caught


def test_g_step_leaves_d_weight_gradients_out_and_the_ema_is_one_foreach_lerp(tmp_path, monkeypatch):
    caught = one_gan_step(tmp_path, monkeypatch)
    assert sorted(caught["accumulated"]) == sorted(caught["names"]), "D's weights got gradients outside D's own step"
    assert all(p.requires_grad for p in caught["D"].parameters())
    (ema_after, decay), = caught["ema"]
    assert decay == dcgan_train.ema_decay(0.999, 0)
    for before, p_ema, p in zip(caught["G_init"], ema_after, caught["G"].parameters()):
        assert torch.equal(p_ema, before.lerp(p, 1 - decay))


def test_the_meter_keeps_named_sums_on_the_device_and_checkpoints_them():
    meter = Meter(torch.device("cpu"))
    meter.add(loss_d=torch.tensor(1.0), d_real=torch.tensor(0.5))  # D's step
    meter.add(loss_g=torch.tensor(3.0), d_fake=torch.tensor(0.25))  # G's step: names added later get columns
    meter.add(loss_d=torch.tensor(2.0), d_real=torch.tensor(0.75))  # a step without a G step
    assert meter.names == ["loss_d", "d_real", "loss_g", "d_fake"]
    assert meter.means() == meter.means(window=True) == {"loss_d": 1.5, "d_real": 0.625, "loss_g": 3.0, "d_fake": 0.25}
    assert meter.latest() == {"loss_d": 2.0, "d_real": 0.75, "loss_g": 3.0, "d_fake": 0.25}
    meter.next_window()
    meter.add(d_real=torch.tensor(0.5), loss_d=torch.tensor(4.0))  # another order: the columns are found
    window = meter.means(window=True)
    assert (window["loss_d"], window["d_real"]) == (4.0, 0.5) and math.isnan(window["loss_g"])
    assert meter.means()["loss_d"] == 7.0 / 3 and meter.finite()
    state = meter.state_dict()
    meter.add(loss_d=torch.tensor(9.0), d_real=torch.tensor(0.0))
    assert state["sums"][0] == 7.0, "the checkpoint's sums are a live view"
    restored = Meter(torch.device("cpu"))
    restored.load_state_dict(state)
    assert restored.means()["loss_d"] == 7.0 / 3 and restored.means(window=True)["d_real"] == 0.5
    restored.add(loss_d=2.0, d_real=0.5)  # Python numbers too
    assert restored.means(window=True)["d_real"] == 0.5
    restored.add(loss_d=torch.tensor(float("inf")), d_real=torch.tensor(0.0))
    assert not restored.finite()
    restored.next_epoch()
    assert restored.finite() and all(math.isnan(v) for v in restored.means().values())


def test_epochs_are_whole_full_batches():
    assert full_batches(200, 32) == 6 and full_batches(192, 32) == 6 and full_batches(20, 32) == 1


# ----------------------------------------------------------------------------------------------------------------
# --compile


@pytest.mark.slow  # inductor compiles three graphs on the CPU: 30-60 s the first time (its cache is kept after)
def test_compile_compiles_each_network_once_in_a_two_epoch_run(cifar_dir, tmp_path, capsys):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    # 200 images at batch 32: before full batches, each epoch ended with a batch of 8 (a recompile of G and D).
    dcgan_train.main(["--data-dir", str(cifar_dir), "--run-dir", str(tmp_path / "run"), "--epochs", "2", "--ngf", "8",
                      "--ndf", "8", "--batch-size", "32", "--fid", "off", "--compile"])
    # G, D in its own step, D in G's step (frozen weights: a frame of its own): three frames, none recompiled.
    assert counters["frames"]["total"] == 3 and counters["stats"]["unique_graphs"] == 3, dict(counters["frames"])
    for code in (dcgan_train.Generator.forward.__code__, dcgan_train.Discriminator.forward.__code__):
        assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code)) == 1  # no recompile
    assert "epoch 2/2" in capsys.readouterr().out
