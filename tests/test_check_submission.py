"""check_submission.py: passes on the files tiny real runs export, fails with the right message on bad ones.

The good files come from real (tiny) runs of vae_train.py and dcgan_train.py on the synthetic data of conftest.py;
each bad case changes one file and checks the FAIL line names that file and the problem, and the exit code is 1.
"""
from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import torch
import torch.nn as nn

from conftest import VAE_THAT_LEARNS, run_script

import check_submission
from common.errors import UserError
import dcgan_train

TINY_GAN = ["--ngf", "8", "--ndf", "8", "--batch-size", "32", "--epochs", "1", "--ckpt-every-min", "1000"]


@pytest.fixture(scope="module")
def runs_root(mnist_dir, cifar_dir, tmp_path_factory):
    """A runs root with tiny finished runs (conv VAE on synthetic MNIST, DCGAN on CIFAR-10), as make vae and make
    dcgan leave it (latest-vae and latest-dcgan links)."""
    root = tmp_path_factory.mktemp("submission") / "runs"
    run_script("vae_train.py", "--data-dir", mnist_dir, "--runs-root", root, *VAE_THAT_LEARNS)
    run_script("dcgan_train.py", "--data-dir", cifar_dir, "--runs-root", root, *TINY_GAN)
    return root


@pytest.fixture(scope="module")
def good_dir(runs_root):
    """A folder with the three files of the runs in runs_root."""
    folder = runs_root.parent / "files"
    folder.mkdir()
    shutil.copy(runs_root / "latest-vae" / "VAE_model.pth", folder)
    for name in ("DCGAN_model_G.pth", "DCGAN_model_D.pth"):
        shutil.copy(runs_root / "latest-dcgan" / name, folder)
    return folder


def copy_as_sweep_member(run_dir, target):
    """A copy of a finished run, recorded as a newer member of sweep vae-betas (what make vae-betas makes)."""
    shutil.copytree(run_dir, target, symlinks=True)
    config = json.loads((target / "config.json").read_text())
    config["args"]["sweep"] = "vae-betas"
    config["starts"][0]["time"] = "2999-01-01T00:00:00"
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture
def bad_dir(good_dir, tmp_path):
    """A copy of the good folder, for a test to break one file in."""
    folder = tmp_path / "files"
    shutil.copytree(good_dir, folder)
    return folder


class Result:
    def __init__(self, returncode: int, stdout: str):
        self.returncode, self.stdout = returncode, stdout


@pytest.fixture
def check(capsys):
    """check_submission.main in this process: exit code and printed lines. The command line itself (run_main, exit
    codes 1 and 2) is tested through conftest.run_script below."""
    def run(folder, *flags, mnist_dir=None):
        data_dir = mnist_dir if mnist_dir is not None else folder / "no-data"
        capsys.readouterr()
        code = check_submission.main([str(folder), "--data-dir", str(data_dir), *map(str, flags)])
        return Result(code, capsys.readouterr().out)
    return run


def fail_lines(proc) -> list[str]:
    return [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("FAIL")]


def test_passes_on_files_from_tiny_runs(check, good_dir, mnist_dir, tmp_path):
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "vae_samples.png").write_bytes(b"\x89PNG fake")
    proc = check(good_dir, "--zip", tmp_path / "CW2.zip", "--figures", figures, mnist_dir=mnist_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fail_lines(proc) == [] and "SKIP" not in proc.stdout
    assert "15 passed, 0 failed, 0 skipped: all checks passed" in proc.stdout
    assert f"MNIST test images from {mnist_dir}" in proc.stdout  # the real test files, transformed
    for what in ("Conv2d layers in children's children", "(100, 1, 28, 28), the shape of x",
                 "torch.randn(100, 100, 1, 1) (nz from G's first layer) -> (100, 3, 32, 32)",
                 "(100, 3, 32, 32) -> (100,), (7, 3, 32, 32) -> (7,)", "G + D parameters at most 25,000,000"):
        assert what in proc.stdout, what
    with zipfile.ZipFile(tmp_path / "CW2.zip") as bundle:
        assert sorted(bundle.namelist()) == ["DCGAN_model_D.pth", "DCGAN_model_G.pth", "VAE_model.pth",
                                             "figures/vae_samples.png"]
        assert bundle.read("VAE_model.pth") == (good_dir / "VAE_model.pth").read_bytes()
    assert not list(tmp_path.glob(".CW2.zip.tmp-*"))
    assert (f"wrote {tmp_path / 'CW2.zip'}: VAE_model.pth, DCGAN_model_G.pth, DCGAN_model_D.pth and 1 figure"
            in proc.stdout)


def test_without_mnist_says_the_inputs_are_synthetic(check, good_dir):
    proc = check(good_dir)
    assert proc.returncode == 0, proc.stdout
    assert (f"WARN  VAE_model.pth: input x: 100 SYNTHETIC uniform [0, 1] images: no MNIST test files in "
            f"{good_dir / 'no-data' / 'MNIST' / 'raw'} (--data-dir)") in proc.stdout


def test_without_dir_checks_the_runs_that_count_on_their_own_data(runs_root, mnist_dir, tmp_path, capsys):
    """make submission: no folder, no --data-dir; a newer sweep member does not become the submitted VAE."""
    main_vae = (runs_root / "latest-vae").resolve()
    member = copy_as_sweep_member(main_vae, runs_root / "29990101-000000-vae-beta4")
    try:
        code = check_submission.main(["--runs-root", str(runs_root), "--n-images", "20"])
        out = capsys.readouterr().out
    finally:
        shutil.rmtree(member)
    assert code == 0, out
    assert f"VAE: {main_vae.name}: the longest finished vae run not in a sweep" in out
    assert f"DCGAN: {(runs_root / 'latest-dcgan').resolve().name}: " in out
    assert f"check_submission: {main_vae / 'VAE_model.pth'}, " in out
    assert f"input x: 20 MNIST test images from {mnist_dir}" in out  # the run's own --data-dir, from config.json
    assert "WARN" not in out


def test_a_sweep_member_is_refused_unless_named(runs_root, tmp_path, capsys):
    root = tmp_path / "runs"
    root.mkdir()
    member = copy_as_sweep_member((runs_root / "latest-vae").resolve(), root / "20250101-000000-vae-beta4")
    shutil.copytree((runs_root / "latest-dcgan").resolve(), root / "20250101-000001-dcgan")
    with pytest.raises(UserError, match="no finished vae run .* not a sweep member.*make submission VAE_RUN="):
        check_submission.main(["--runs-root", str(root)])
    code = check_submission.main(["--runs-root", str(root), "--vae-run", str(member), "--n-images", "10"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"VAE: {member.name}: named explicitly" in out
    assert "warning: 20250101-000000-vae-beta4 is a member of sweep 'vae-betas'" in out


def test_zip_into_a_missing_folder_makes_it(check, good_dir, tmp_path):
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "a.png").write_bytes(b"\x89PNG fake")
    target = tmp_path / "drive" / "genmodels" / "CW2.zip"
    proc = check(good_dir, "--zip", target, "--figures", figures)
    assert proc.returncode == 0, proc.stdout
    assert f"made the folder {target.parent} for --zip" in proc.stdout and zipfile.is_zipfile(target)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(UserError, match="cannot create the folder"):
        check_submission.main([str(good_dir), "--zip", str(tmp_path / "a-file" / "CW2.zip")])


def test_a_report_of_other_runs_fails_the_check(runs_root, tmp_path, capsys):
    report_dir = tmp_path / "report"
    (report_dir / "figures").mkdir(parents=True)
    (report_dir / "figures" / "a.png").write_bytes(b"\x89PNG fake")
    (report_dir / "report.json").write_text(json.dumps({"vae_run": str(tmp_path / "20250101-000000-vae"),
                                                        "gan_run": str((runs_root / "latest-dcgan").resolve())}))
    code = check_submission.main(["--runs-root", str(runs_root), "--n-images", "10", "--figures",
                                  str(report_dir / "figures"), "--zip", str(tmp_path / "CW2.zip")])
    out = capsys.readouterr().out
    assert code == 1 and not (tmp_path / "CW2.zip").exists()
    assert fail_lines(Result(code, out)) == [
        f"FAIL  report: the report shows the VAE checked: it shows the VAE run 20250101-000000-vae, but the VAE "
        f"checked is {(runs_root / 'latest-vae').resolve().name}: run make report again (with the same runs)"]


def test_garbage_file_fails_with_its_name(check, bad_dir, tmp_path):
    (bad_dir / "DCGAN_model_D.pth").write_bytes(b"not a model" * 100)
    proc = check(bad_dir, "--zip", tmp_path / "CW2.zip")
    assert proc.returncode == 1
    assert len(fail_lines(proc)) == 1
    assert fail_lines(proc)[0].startswith("FAIL  DCGAN_model_D.pth: torch.jit.load: does not load: not a "
                                          "TorchScript file (corrupted, truncated, or not a model)")
    assert "SKIP  DCGAN_model_D.pth: one value per image: the file did not load" in proc.stdout
    assert "NOT READY" in proc.stdout and not (tmp_path / "CW2.zip").exists()


def test_state_dict_file_is_told_to_export_torchscript(check, bad_dir):
    torch.save(dcgan_train.Generator(ngf=8).state_dict(), bad_dir / "DCGAN_model_G.pth")
    proc = check(bad_dir)
    assert proc.returncode == 1
    assert fail_lines(proc)[0].startswith("FAIL  DCGAN_model_G.pth: torch.jit.load: does not load: it is a torch.save "
                                          "file (a state_dict or a pickled model), not TorchScript")


def test_missing_file_fails_with_its_path(check, bad_dir):
    (bad_dir / "VAE_model.pth").unlink()
    proc = check(bad_dir)
    assert proc.returncode == 1
    assert fail_lines(proc) == [f"FAIL  VAE_model.pth: torch.jit.load: {bad_dir / 'VAE_model.pth'} does not exist "
                                f"(the training script, vae_train.py, writes it when a run finishes)"]


def test_mlp_vae_fails_the_conv2d_check(check, bad_dir, mnist_dir, tmp_path):
    run_script("vae_train.py", "--data-dir", mnist_dir, "--run-dir", tmp_path / "mlp", "--arch", "mlp",
               *VAE_THAT_LEARNS)  # one that learns: this test is about the missing Conv2d layers alone
    shutil.copy(tmp_path / "mlp" / "VAE_model.pth", bad_dir)
    proc = check(bad_dir, mnist_dir=mnist_dir)
    assert proc.returncode == 1
    assert fail_lines(proc) == ["FAIL  VAE_model.pth: Conv2d layers in children's children: none found: an MLP-only "
                                "VAE fails the coursework's test; train with vae_train.py --arch conv"]


def test_too_large_generator_fails_the_parameter_budget(check, bad_dir):
    # A real Generator just wide enough that G alone is over the budget (26.1M parameters), scripted as exported.
    generator = dcgan_train.Generator(nz=100, ngf=384, channels=3, image_size=32).eval()
    n_g = sum(p.numel() for p in generator.parameters())
    assert n_g > dcgan_train.MAX_PARAMS
    torch.jit.script(generator).save(str(bad_dir / "DCGAN_model_G.pth"))
    n_d = sum(p.numel() for p in torch.jit.load(str(bad_dir / "DCGAN_model_D.pth")).parameters())
    proc = check(bad_dir)
    assert proc.returncode == 1
    assert fail_lines(proc) == [f"FAIL  DCGAN_model_G.pth: G + D parameters at most 25,000,000: G {n_g:,} + D {n_d:,}"
                                f" = {n_g + n_d:,}, {n_g + n_d - 25_000_000:,} too many: lower --ngf / --ndf"]


def test_one_channel_generator_is_named_as_the_problem(check, bad_dir, mnist_dir, tmp_path):
    run_dir = tmp_path / "mnist-gan"
    run_script("dcgan_train.py", "--dataset", "mnist", "--data-dir", mnist_dir, "--run-dir", run_dir,
               "--train-limit", 64, *TINY_GAN)
    shutil.copy(bad_dir / "VAE_model.pth", run_dir)
    proc = check(run_dir)  # a run folder: its config.json says which data set it was trained on
    assert proc.returncode == 1
    failures = fail_lines(proc)
    assert len(failures) == 2
    assert failures[0].startswith("FAIL  DCGAN_model_G.pth: G(z) shape: G makes 1-channel (greyscale) images "
                                  "(100, 1, 32, 32), but the coursework needs CIFAR-10 RGB images (100, 3, 32, 32)")
    assert "trained with --dataset mnist. Retrain with dcgan_train.py --dataset cifar10" in failures[0]
    assert failures[1].startswith("FAIL  DCGAN_model_D.pth: one value per image: D fails on input of shape "
                                  "(100, 3, 32, 32)")
    assert "D's first layer takes 1-channel images" in failures[1]


class ScalarDiscriminator(nn.Module):
    """One value for the whole batch: what a D ending in .mean() would give."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 4)

    def forward(self, x):
        return self.conv(x).mean()


class UnboundedGenerator(nn.Module):
    """Right shape, no tanh at the end."""

    def __init__(self):
        super().__init__()
        self.net = nn.ConvTranspose2d(100, 3, 32)

    def forward(self, z):
        return self.net(z) * 100


def test_wrong_outputs_fail_with_what_was_expected(check, bad_dir):
    torch.jit.script(ScalarDiscriminator()).save(str(bad_dir / "DCGAN_model_D.pth"))
    torch.jit.script(UnboundedGenerator()).save(str(bad_dir / "DCGAN_model_G.pth"))
    proc = check(bad_dir)
    assert proc.returncode == 1
    failures = fail_lines(proc)
    assert any(line.startswith("FAIL  DCGAN_model_G.pth: G(z) values in [-1, 1]:") and "end G with tanh" in line
               for line in failures), failures
    assert any(line.startswith("FAIL  DCGAN_model_D.pth: one value per image: D(x) for x of shape (100, 3, 32, 32) "
                               "gives (), expected 100 values") for line in failures), failures


def test_command_line_exit_codes(good_dir, bad_dir, tmp_path):
    """As make submission sees it: 0 all passed, 1 a check failed, 2 a bad command line (one line, no traceback)."""
    (bad_dir / "DCGAN_model_G.pth").unlink()
    proc = run_script("check_submission.py", bad_dir, check=False)
    assert proc.returncode == 1 and "FAIL  DCGAN_model_G.pth" in proc.stdout
    proc = run_script("check_submission.py", tmp_path / "nowhere", check=False)
    assert proc.returncode == 2 and "no such folder" in proc.stderr and "Traceback" not in proc.stderr
    with pytest.raises(UserError, match="--figures is only used with --zip"):
        check_submission.main([str(good_dir), "--figures", str(tmp_path)])


def test_no_report_figures_no_zip(check, good_dir, tmp_path):
    proc = check(good_dir, "--zip", tmp_path / "CW2.zip", "--figures", tmp_path / "report" / "figures")
    assert proc.returncode == 1
    assert fail_lines(proc) == [f"FAIL  figures: report figures to pack: no PNG figures in "
                                f"{tmp_path / 'report' / 'figures'}; build the report first (make report)"]
    assert "not written: fix the failures above first" in proc.stdout
    assert not (tmp_path / "CW2.zip").exists()


def test_first_layer_nz_reads_the_noise_size():
    scripted = torch.jit.script(dcgan_train.Generator(nz=37, ngf=4))
    assert check_submission.first_layer_nz(scripted) == 37
    assert check_submission.first_layer_nz(torch.jit.script(nn.Sequential(nn.Linear(12, 3)))) == 12
