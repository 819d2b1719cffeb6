"""gan_metrics.py on a tiny synthetic MNIST in the real IDX format (seconds on CPU)."""
from __future__ import annotations

import pytest
import torch

from common import gan_metrics
import dcgan_train
from conftest import make_mnist


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_mnist(tmp_path_factory.mktemp("cfid-data"), n_train=400, n_test=300)


@pytest.fixture(scope="module")
def evaluator(data_dir):
    return gan_metrics.ClassifierFID.for_dataset("mnist", data_dir, "cpu", log=lambda _: None)


def test_classifier_is_trained_once_cached_with_its_accuracy_and_reused(data_dir, evaluator):
    path = gan_metrics.cache_path("mnist", data_dir)
    assert path.is_file() and not list(path.parent.glob(".*tmp-*"))
    cached = torch.load(path, map_location="cpu", weights_only=True)
    assert 0.5 < cached["test_accuracy"] <= 1.0  # ten well-separated squares: far above chance
    assert cached["train_images"] == 400 and cached["version"] == gan_metrics.VERSION
    mtime, lines = path.stat().st_mtime_ns, []
    again = gan_metrics.ClassifierFID.for_dataset("mnist", data_dir, "cpu", log=lines.append)
    assert path.stat().st_mtime_ns == mtime, "the cache was rewritten instead of reused"
    assert any("from" in line and str(path) in line for line in lines), lines
    assert again.info["test_accuracy"] == cached["test_accuracy"]
    for a, b in zip(again.extractor.state_dict().values(), evaluator.extractor.state_dict().values()):
        assert torch.equal(a, b)


def test_training_is_deterministic_and_leaves_the_global_rng_alone(data_dir):
    images, labels = gan_metrics.load_split("mnist", data_dir, train=True)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = gan_metrics.train_classifier(images, labels, epochs=1).state_dict()
    second = gan_metrics.train_classifier(images, labels, epochs=1).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_cache_made_from_other_data_is_replaced(tmp_path, data_dir):
    other = make_mnist(tmp_path / "other", n_train=200, n_test=50)
    path = gan_metrics.cache_path("mnist", other)
    path.parent.mkdir()
    path.write_bytes(gan_metrics.cache_path("mnist", data_dir).read_bytes())  # trained on the 400-image set
    lines = []
    gan_metrics.ClassifierFID.for_dataset("mnist", other, "cpu", log=lines.append)
    assert any("other mnist data" in line for line in lines), lines
    assert torch.load(path, weights_only=True)["train_images"] == 200


def test_real_images_score_near_zero_and_noise_scores_worse(data_dir, evaluator):
    test_images, _ = gan_metrics.load_split("mnist", data_dir, train=False)
    real = evaluator.score_images(test_images)
    noise = evaluator.score_images(torch.randint(0, 256, test_images.shape, generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.uint8))
    assert abs(real["cfid"]) < 1e-3 * noise["cfid"]
    assert noise["cfid"] > 1.0
    assert real["class_min"] > 0.02  # the synthetic labels are roughly uniform, and the classifier sees them


def test_generator_samples_class_shares_sum_to_one_and_rng_untouched(evaluator):
    torch.manual_seed(0)
    generator = dcgan_train.Generator(nz=8, ngf=8, channels=1, image_size=32)
    generator.train()
    before = torch.get_rng_state()
    scores = evaluator(generator, nz=8, n_samples=600, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    assert generator.training, "the generator's mode was not restored"
    assert sum(scores["class_shares"]) == pytest.approx(1.0)
    assert scores["class_min"] == min(scores["class_shares"]) and scores["class_max"] == max(scores["class_shares"])
    assert scores == evaluator(generator, nz=8, n_samples=600, seed=3)  # same noise, same numbers


def test_three_channel_data_sets_are_not_supported(tmp_path):
    assert gan_metrics.ClassifierFID.for_dataset("cifar10", tmp_path, "cpu") is None
