"""experiments.py on hand-made run folders (config.json, metrics.csv, export.json and model files written here):
which folders are runs, sweeps by name, labels from the settings that differ, images seen, the run that counts."""
from __future__ import annotations

import json
import os

import pytest

from common import experiments
from common.errors import UserError

VAE_ARGS = {"arch": "conv", "latent_dim": 16, "beta": 1.0, "likelihood": "bernoulli", "lr": 1e-3, "epochs": 2,
            "batch_size": 128, "seed": 0, "dataset": "mnist", "train_limit": 0, "data_dir": "/data", "name": None,
            "sweep": None, "runs_root": "/runs", "device": "auto"}
GAN_ARGS = {"nz": 100, "ngf": 64, "ndf": 64, "image_size": 32, "d_norm": "batch", "loss": "bce",
            "label_smoothing": 1.0, "instance_noise": 0.0, "epochs": 2, "batch_size": 128, "seed": 0,
            "dataset": "cifar10", "train_limit": 0, "data_dir": "/data", "name": None, "sweep": None}


def make_run(root, folder, script="vae", epochs_done=2, finished=True, started="2025-01-01T00:00:00",
             images_per_epoch=None, **args):
    """A run folder as the training scripts leave it: config.json, metrics.csv (with images_seen when
    images_per_epoch is given), and when finished, export.json and the model files."""
    run_dir = root / folder
    run_dir.mkdir(parents=True)
    full_args = {**(VAE_ARGS if script == "vae" else GAN_ARGS), **args}
    config = {"script": script, "args": full_args, "starts": [{"time": started}]}
    (run_dir / "config.json").write_text(json.dumps(config))
    columns = ["epoch", "test_recon", "test_kl"] + (["images_seen"] if images_per_epoch else [])
    rows = [[e, 100.0 - e, 10.0 + e] + ([e * images_per_epoch] if images_per_epoch else [])
            for e in range(1, epochs_done + 1)]
    (run_dir / "metrics.csv").write_text("\n".join(",".join(map(str, r)) for r in [columns] + rows) + "\n")
    if finished:
        files = experiments.MODEL_FILES[script]
        for file_name in files:
            (run_dir / file_name).write_bytes(b"model")
        (run_dir / "export.json").write_text(json.dumps({"epoch": full_args["epochs"], "global_step": 10,
                                                         "files": files}))
    return run_dir


def link(root, name, target):
    os.symlink(target, root / name)


def test_a_glob_over_runs_skips_what_is_not_a_run_with_one_note_each(tmp_path):
    a = make_run(tmp_path, "20250101-000000-vae-beta1", beta=1.0)
    b = make_run(tmp_path, "20250101-000001-vae-beta4", beta=4.0)
    make_run(tmp_path, "20250101-000002-dcgan", script="dcgan")
    (tmp_path / "compare" / "vae-betas").mkdir(parents=True)
    link(tmp_path, "latest-vae", b.name)
    notes = []
    runs = experiments.collect_runs(sorted(tmp_path.iterdir()), "vae", log=notes.append)
    assert [run.dir for run in runs] == [a, b]
    assert notes == [f"note: skipping {tmp_path / '20250101-000002-dcgan'}: a dcgan run, not a vae run",
                     f"note: skipping {tmp_path / 'compare'}: not a run folder (no config.json)",
                     f"note: skipping {tmp_path / 'latest-vae'}: the same run as {b}"]


def test_one_folder_that_is_not_a_run_is_an_error_and_so_is_a_glob_of_none(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        experiments.collect_runs([tmp_path / "empty"], "vae")
    with pytest.raises(UserError, match="none of the 2 folders given is a vae_train.py run"):
        experiments.collect_runs([tmp_path / "empty", tmp_path / "missing"], "vae", log=lambda _: None)


def test_labels_name_the_settings_that_differ(tmp_path):
    betas = [make_run(tmp_path, f"b{beta}", beta=beta, name=f"vae-beta{beta}", sweep="vae-betas")
             for beta in (0.5, 1.0, 4.0)]
    runs = [experiments.read_run(d) for d in betas]
    # name and sweep are bookkeeping; beta=1 is the default, named because the runs differ in it
    assert experiments.run_labels(runs) == ["beta=0.5", "beta=1", "beta=4"]

    variants = {"baseline": {}, "spectral": {"d_norm": "spectral"}, "hinge": {"d_norm": "spectral", "loss": "hinge"},
                "smooth": {"label_smoothing": 0.9, "instance_noise": 0.1}}
    runs = [experiments.read_run(make_run(tmp_path, f"dcgan-{name}", script="dcgan", name=f"dcgan-{name}", **args))
            for name, args in variants.items()]
    assert experiments.run_labels(runs) == [
        "defaults",  # the reference run: every differing flag at the script's default
        "d_norm=spectral", "d_norm=spectral, loss=hinge", "instance_noise=0.1, label_smoothing=0.9"]


def test_a_flag_added_after_a_run_was_made_counts_as_its_default(tmp_path):
    old = experiments.read_run(make_run(tmp_path, "old", script="dcgan"))  # no --diffaug in its config
    new = experiments.read_run(make_run(tmp_path, "new", script="dcgan", diffaug="none", loss="hinge", fid="off"))
    assert experiments.differing_keys([old, new]) == ["loss"]  # fid is evaluation: bookkeeping
    assert experiments.run_labels([old, new]) == ["loss=bce", "loss=hinge"]


def test_labels_fall_back_to_folder_names_only_for_ties(tmp_path):
    same = [experiments.read_run(make_run(tmp_path, name, data_dir=f"/data/{name}")) for name in ("x", "y")]
    assert experiments.run_labels(same) == ["x", "y"]  # only bookkeeping (data_dir) differs
    runs = [experiments.read_run(make_run(tmp_path, name, beta=beta, seed=seed))
            for name, beta, seed in (("p", 2.0, 0), ("q", 2.0, 1))]
    assert experiments.run_labels(runs) == ["seed=0", "seed=1"]


def test_images_seen_from_the_column_or_from_the_config(tmp_path):
    with_column = experiments.read_run(make_run(tmp_path, "a", epochs_done=3, images_per_epoch=640))
    assert with_column.images_seen() == [640, 1280, 1920]
    limited = experiments.read_run(make_run(tmp_path, "b", epochs_done=2, train_limit=1000))
    assert limited.images_seen() == [1000, 2000]
    full_cifar = experiments.read_run(make_run(tmp_path, "c", script="dcgan", epochs_done=1))
    assert full_cifar.images_seen() == [50_000]
    folder = experiments.read_run(make_run(tmp_path, "d", script="dcgan", epochs_done=2, dataset="folder"))
    assert folder.images_seen() is None
    assert experiments.x_axis([limited, with_column]) == ("training images seen", [[1000, 2000], [640, 1280, 1920]])
    assert experiments.x_axis([limited, folder]) == ("epoch", [[1, 2], [1, 2]])


def test_finished_means_export_json_at_the_last_epoch_and_the_files_there(tmp_path):
    done = make_run(tmp_path, "done", script="dcgan")
    assert experiments.read_run(done).finished
    (done / "DCGAN_model_D.pth").unlink()
    assert not experiments.read_run(done).finished
    running = experiments.read_run(make_run(tmp_path, "running", epochs_done=1, finished=False, epochs=5))
    assert not running.finished and running.status() == "unfinished: 1 of 5 epochs"
    extended = make_run(tmp_path, "extended", epochs=2)  # exported at 2, then resumed with --epochs 4
    config = json.loads((extended / "config.json").read_text())
    config["args"]["epochs"] = 4
    (extended / "config.json").write_text(json.dumps(config))
    assert not experiments.read_run(extended).finished


def test_a_sweep_is_the_runs_with_its_name_newest_per_setting(tmp_path):
    make_run(tmp_path, "old-b4", beta=4.0, sweep="vae-betas", started="2025-01-01T00:00:00")
    new_b4 = make_run(tmp_path, "new-b4", beta=4.0, sweep="vae-betas", started="2025-01-02T00:00:00")
    b05 = make_run(tmp_path, "b05", beta=0.5, sweep="vae-betas", epochs_done=1, finished=False)
    make_run(tmp_path, "b2", beta=2.0, sweep="vae-betas", epochs_done=0, finished=False)
    make_run(tmp_path, "other-sweep", beta=8.0, sweep="big-betas")
    make_run(tmp_path, "main", beta=1.0)
    notes = []
    runs = experiments.sweep_runs(tmp_path, "vae", "vae-betas", log=notes.append)
    assert [run.dir for run in runs] == [b05, new_b4]  # sorted by beta
    assert sorted(notes) == ["note: sweep vae-betas: b05 is unfinished: 1 of 2 epochs",
                             "note: sweep vae-betas: b2 left out: no finished epoch yet",
                             "note: sweep vae-betas: old-b4 left out: new-b4 is a newer run of the same settings"]


def test_the_run_that_counts_is_the_longest_finished_one_outside_sweeps(tmp_path):
    """Issue 29: a one-epoch check made after the main run (and moving latest-vae) does not become the run that
    counts; one line names it, with how to choose it. A longer sweep member and a run still training never count."""
    main = make_run(tmp_path, "20250101-vae", epochs=8, epochs_done=8, started="2025-01-01T00:00:00")
    make_run(tmp_path, "20250102-vae-beta4", beta=4.0, sweep="vae-betas", epochs=30, epochs_done=30,
             started="2025-01-02T00:00:00")
    make_run(tmp_path, "20250103-vae", started="2025-01-03T00:00:00", epochs_done=1, finished=False, epochs=10)
    toy = make_run(tmp_path, "my run", epochs=1, epochs_done=1, train_limit=2000, started="2025-01-04T00:00:00")
    link(tmp_path, "latest-vae", toy.name)
    lines = []
    run, why = experiments.counted_run(tmp_path, "vae", how_to_name="make report VAE_RUN", log=lines.append)
    assert run.dir == main
    assert why == "the longest finished vae run not in a sweep (480,000 training images)"
    assert lines == [f"note: not chosen: my run, newer but shorter (2,000 training images seen, against 480,000); "
                     f"to use it: make report VAE_RUN='{toy}'"]

    # Runs of the same length: the newest.
    again = make_run(tmp_path, "20250105-vae", epochs=8, epochs_done=8, started="2025-01-05T00:00:00")
    assert experiments.counted_run(tmp_path, "vae", log=lines.append)[0].dir == again


def test_no_run_that_counts_says_why_and_how_to_name_one(tmp_path):
    make_run(tmp_path, "20250102-vae-beta4", beta=4.0, sweep="vae-betas")
    link(tmp_path, "latest-vae", "20250102-vae-beta4")  # as a sweep made before sweeps were recorded would
    with pytest.raises(UserError) as err:
        experiments.counted_run(tmp_path, "vae", how_to_name="make report VAE_RUN")
    assert "no finished vae run (vae_train.py) that is not a sweep member" in str(err.value)
    assert "is a member of sweep 'vae-betas'" in str(err.value) and "make report VAE_RUN=RUN_DIR" in str(err.value)


def test_a_run_named_explicitly_is_used_with_warnings(tmp_path):
    member = make_run(tmp_path, "20250102-vae-beta4", beta=4.0, sweep="vae-betas", epochs_done=1, finished=False)
    lines = []
    run, why = experiments.counted_run(tmp_path, "vae", explicit=member, log=lines.append)
    assert run.dir == member and why == "named explicitly"
    assert lines == ["warning: 20250102-vae-beta4 is a member of sweep 'vae-betas', used because it was named "
                     "explicitly",
                     "warning: 20250102-vae-beta4 is unfinished: 1 of 2 epochs (no export.json for the last epoch)"]
    with pytest.raises(UserError, match="not a VAE run"):
        experiments.counted_run(tmp_path, "vae", explicit=make_run(tmp_path, "gan", script="dcgan"))


def test_a_shorter_run_named_explicitly_gets_a_warning(tmp_path):
    make_run(tmp_path, "long", epochs=30, epochs_done=30, started="2025-01-01T00:00:00")
    short = make_run(tmp_path, "short", epochs=2, started="2025-01-02T00:00:00")
    lines = []
    run, _ = experiments.counted_run(tmp_path, "vae", explicit=short, log=lines.append)
    assert run.dir == short
    assert lines == ["warning: long is a longer finished vae run (1,800,000 training images seen, against 120,000); "
                     "it counts when no run is named"]
