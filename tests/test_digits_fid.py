"""digits_fid.py: the committed feature net, the bootstrap's weighted FD and KID, matched counts."""
from pathlib import Path

import numpy as np
import pytest
import torch

import digits_fid
import fid
import inception
from checkpoints import CheckpointError, read_state_dict
from conftest import error_line

QUALITY = ("fd_train", "kid_train", "fd_heldout", "kid_heldout")


@pytest.fixture(scope="module")
def digits():
    return digits_fid.digits_split()


def test_the_committed_classifier_and_its_recorded_accuracy(digits):
    """assets/digits_classifier.pt gets 296 of the 297 held-out digits, as assets/README.md says."""
    (train_x, train_y), (held_x, held_y) = digits
    net = digits_fid.load_classifier()
    recorded = read_state_dict(digits_fid.CLASSIFIER)
    assert recorded["command"] == "python digits_fid.py --train"
    assert digits_fid.accuracy(net, held_x, held_y) == recorded["heldout_accuracy"] == 296 / 297
    assert digits_fid.accuracy(net, train_x, train_y) == recorded["train_accuracy"] == 1496 / 1500
    assert len(held_y) == 297 and len(train_y) == 1500
    assert digits_fid.features(net, held_x[:3]).shape == (3, 64)


def test_weighted_metrics_equal_the_resampled_sets():
    """A resample as integer weights: FD of the repeated rows, KID without an image's copies paired."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(9, 3)) + 0.5
    wx, wy = rng.integers(0, 3, 12).astype(float), np.ones(9)
    wx[0] = 2
    repeated = np.repeat(x, wx.astype(int), axis=0)
    mu, sigma = fid.statistics(y)
    expected = inception.frechet_distance(*fid.statistics(repeated), mu, sigma)
    assert digits_fid.weighted_fd(x, wx, mu, sigma) == pytest.approx(expected, rel=1e-10)
    kxx, kyy = inception.polynomial_kernel(x, x), inception.polynomial_kernel(y, y)
    kxy = inception.polynomial_kernel(x, y)
    kid = digits_fid.weighted_kid(kxx, kyy, kxy, np.ones(12), wy)
    assert kid == pytest.approx(inception.kernel_distance(x, y), rel=1e-12)
    src = np.repeat(np.arange(12), wx.astype(int))  # the source image of each resampled row
    pairs = [(i, j) for i in range(len(src)) for j in range(len(src)) if src[i] != src[j]]
    within = np.mean([kxx[src[i], src[j]] for i, j in pairs])
    expected = within + (kyy.sum() - np.trace(kyy)) / 72 - 2 * kxy[src].mean()
    assert digits_fid.weighted_kid(kxx, kyy, kxy, wx, wy) == pytest.approx(expected, rel=1e-12)


def test_sample_quality_is_measured_at_matched_counts_with_fixed_draws(digits):
    (train_x, _), (held_x, _) = digits
    net = digits_fid.load_classifier()
    quality = digits_fid.SampleQuality(net, train_x, held_x, replicates=30, chunks=2)
    assert quality.n == 297 and quality.train_sets.shape == (2, 297, 64)
    train = quality.refs["train"]
    assert np.allclose(train.mean(0), 0) and np.allclose(train.std(0), 1)
    fake = torch.cat([held_x, held_x.flip(3)])  # 2 x 297 "samples": the held-out digits, mirrored
    a = quality.of_samples(fake)
    assert a == quality.of_samples(fake.clone())  # fixed draws: same samples, same replicates
    assert len(a["fd_train_boot"]) == 30
    # the estimate is the mean over the 2 sets of each set's FD against the reference, computed
    # here from fid.statistics and inception's FD, not from the weighted path
    sets = quality.standardise(digits_fid.features(net, fake)).reshape(2, 297, -1)
    ref = fid.statistics(quality.refs["heldout"])
    expected = np.mean([inception.frechet_distance(*fid.statistics(s), *ref) for s in sets])
    assert a["fd_heldout"] == pytest.approx(expected, rel=1e-9)
    held = quality.measure(quality.refs["heldout"][None], refs=("heldout",))
    assert abs(held["fd_heldout"]) < 1e-6  # the held-out set is at distance 0 from itself
    floor = quality.floor()
    assert set(floor) == {m + b for m in QUALITY for b in ("", "_boot")}
    assert floor["fd_train"] < a["fd_train"]
    with pytest.raises(ValueError, match="2 x 297"):
        quality.of_samples(held_x)


def test_a_missing_classifier_is_one_clear_sentence(tmp_path):
    with pytest.raises(CheckpointError, match="python digits_fid.py --train"):
        digits_fid.load_classifier(tmp_path / "none.pt")


def test_a_checkpoint_with_nan_weights_is_one_sentence(tmp_path, unchanged):
    """Issue 24, item 14: a NaN checkpoint ended in scipy's LinAlgError, a traceback."""
    entries = read_state_dict(Path(digits_fid.__file__).parent / "assets" / "dit_digits.pt")
    entries["ema"]["final_layer.linear.bias"][0] = float("nan")
    torch.save(entries, tmp_path / "nan.pt")
    kept = unchanged(tmp_path)
    with pytest.raises(SystemExit) as e:
        digits_fid.main([str(tmp_path / "nan.pt")])
    assert error_line(str(e.value.code)).endswith("nan.pt: 1 of its weights are not finite (NaN or inf); it is a "
                                                  "diverged or damaged checkpoint")
    kept()


def test_fd_of_two_gaussians_is_the_closed_form():
    """
    Features whose mean and covariance are exactly m and diag(s) (m +- c_j e_j), against a reference
    N(mu, diag(r)): FD = |m - mu|^2 + sum (sqrt s - sqrt r)^2, and unchanged when both are rotated.
    """
    m, s = np.array([1.0, -2.0, 0.5]), np.array([4.0, 1.0, 0.25])
    mu, r = np.array([0.0, 1.0, 0.5]), np.array([1.0, 9.0, 0.25])
    d = len(m)
    c = np.sqrt(s * (2 * d - 1) / 2)  # 2d points m +- c_j e_j: covariance (ddof 1) 2 c^2 / (2d - 1)
    x = np.concatenate([m + np.diag(c), m - np.diag(c)])
    expected = np.sum((m - mu) ** 2) + np.sum((np.sqrt(s) - np.sqrt(r)) ** 2)  # 1 + 9, plus 1 + 4: 15
    assert expected == 15.0
    assert digits_fid.weighted_fd(x, np.ones(2 * d), mu, np.diag(r)) == pytest.approx(15.0, rel=1e-9)
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))  # a rotation of both
    fd = digits_fid.weighted_fd(x @ q.T, np.ones(2 * d), q @ mu, q @ np.diag(r) @ q.T)
    assert fd == pytest.approx(15.0, rel=1e-7)
    # a resample: both points of the first axis taken twice, as a set with that repetition
    w = np.array([2.0, 1, 1, 2, 1, 1])
    y = np.repeat(x, w.astype(int), axis=0)
    ym, ys = y.mean(0), np.cov(y, rowvar=False)
    assert np.allclose(ys, np.diag(np.diag(ys)))  # still diagonal: the closed form holds
    closed = np.sum((ym - mu) ** 2) + np.sum((np.sqrt(np.diag(ys)) - np.sqrt(r)) ** 2)
    assert digits_fid.weighted_fd(x, w, mu, np.diag(r)) == pytest.approx(closed, rel=1e-9)


def test_the_bootstrap_interval_matches_the_large_sample_value():
    """
    The bootstrap's counts (digits_fid.multinomial) and half_width on a statistic whose bootstrap
    spread is known: the mean of n values has a bootstrap standard deviation of sd0 / sqrt(n) (sd0
    with ddof 0), so the 95% half-width is 1.96 sd0 / sqrt(n). From R replicates the standard
    deviation's relative standard error is 1 / sqrt(2 (R - 1)) = 1.1% at R = 4000: 5% is 4.5 of it.
    Worked by hand: replicates 1..5 have a standard deviation of sqrt(2.5), a half-width of 3.0990.
    """
    assert digits_fid.half_width([1, 2, 3, 4, 5]) == pytest.approx(3.0990, abs=1e-4)
    rng = np.random.default_rng(1)
    x = rng.exponential(size=50)
    counts = digits_fid.multinomial(np.random.default_rng(2), len(x), size=4000)
    assert counts.shape == (4000, 50) and (counts.sum(1) == 50).all()
    means = counts @ x / 50
    assert digits_fid.half_width(means) == pytest.approx(1.96 * x.std() / np.sqrt(50), rel=0.05)
