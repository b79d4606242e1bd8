"""fid.py against pytorch-fid's reference figures (tests/golden/inception_fid.safetensors) and on tiny image sets."""
import json
import math
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from scipy.spatial.distance import cdist

import fid

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def rule_weights(keys_tsv):
    """The Inception weight rule of tests/golden/README.md: one seeded generator walks the key list in order."""
    g, state = torch.Generator().manual_seed(0), {}
    for line in open(keys_tsv):
        key, shape = line.rstrip("\n").split("\t")[:2]
        shape = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) * 0.5 + 0.75
        elif key.endswith("running_mean") or key.endswith(".bias"):
            state[key] = torch.randn(shape, generator=g) * 0.01
        elif key.endswith("bn.weight"):
            state[key] = 1 + torch.randn(shape, generator=g) * 0.1
        else:
            state[key] = torch.randn(shape, generator=g) * math.sqrt(2 / math.prod(shape[1:]))
    return state


@pytest.fixture(scope="module")
def golden():
    path = os.path.join(GOLDEN, "inception_fid.safetensors")
    with safe_open(path, "pt") as f:
        meta = {k: json.loads(v) for k, v in f.metadata().items()}
    return load_file(path), meta


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-rule.pth"
    torch.save(rule_weights(os.path.join(GOLDEN, "pt_inception.keys.tsv")), path)
    return str(path)


@pytest.fixture(scope="module")
def model(weights):
    return fid.load_inception(weights)  # the path users take with --inception PATH


def uint8_images(n, size, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_folder(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(folder, f"{i:06d}.png"))
    return str(folder)


def one_sentence_error(argv, *fragments):
    with pytest.raises(SystemExit) as e:
        fid.main(argv)
    msg = str(e.value.code)
    assert "\n" not in msg and msg.startswith("fid.py: error: "), msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


# ----------------------------------------------------------------------------- the network and the distance

def test_keys_in_file_order():
    keys = [line.split("\t")[0] for line in open(os.path.join(GOLDEN, "pt_inception.keys.tsv"))]
    assert list(fid.FIDInceptionV3().state_dict().keys()) == keys


def test_pool3_matches_pytorch_fid(golden, model):
    tensors, _ = golden
    with torch.inference_mode():
        pool3 = model(tensors["images"])
    ref = tensors["pool3"]
    assert pool3.shape == (4, 2048)
    assert (pool3 - ref).abs().max() / ref.abs().max() < 1e-5  # measured 4.4e-7
    torch.testing.assert_close(pool3, ref, rtol=1e-4, atol=1e-5)


def test_frechet_distance_matches_pytorch_fid(golden):
    tensors, meta = golden
    st = {k: fid.statistics(tensors[f"fd.{k}"].numpy()) for k in "ABCD"}
    assert fid.frechet_distance(*st["A"], *st["B"]) == pytest.approx(meta["fd_AB"], rel=1e-6)
    assert fid.frechet_distance(*st["C"], *st["D"]) == pytest.approx(meta["fd_CD_singular"], rel=1e-6)
    assert abs(fid.frechet_distance(*st["A"], *st["A"])) < 1e-6


def test_frechet_distance_singular_offset_and_imaginary(monkeypatch, capsys):
    mu, sigma = np.zeros(3), np.diag([1.0, 2.0, 0.0])
    calls = []
    real_sqrtm = fid.linalg.sqrtm

    def sqrtm(m):  # the first call fails as a singular product does in older scipy
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)
    monkeypatch.setattr(fid.linalg, "sqrtm", sqrtm)
    d = fid.frechet_distance(mu, sigma, mu, sigma)
    np.testing.assert_allclose(calls[1], (sigma + 1e-6 * np.eye(3)) @ (sigma + 1e-6 * np.eye(3)))
    assert d == pytest.approx(-2 * 3 * 1e-6, abs=1e-12)  # Tr(s) + Tr(s) - 2 Tr(s + eps I)
    assert "adding 1e-06 to diagonal" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(fid.FIDError, match="imaginary component of 1"):  # sqrtm(-I) = iI
        fid.frechet_distance(mu, np.eye(3), mu, -np.eye(3))


def test_kernel_distance_matches_clean_fid_and_is_unbiased():
    """KID: clean-fid's value on its golden sets, the formula by brute force, no bias at small n."""
    with open(os.path.join(GOLDEN, "kid_cleanfid.json")) as f:
        golden = json.load(f)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8))
    y = rng.normal(size=(40, 8)) * 1.2 + 0.3
    assert fid.kernel_distance(x, y) == pytest.approx(golden["kid_xy"], rel=1e-12)
    a, b = x[:7], y[:5]  # unequal sizes: every pair by hand, an image never paired with itself
    k = [[(u @ v / 8 + 1) ** 3 for v in b] for u in a]
    kaa = sum((a[i] @ a[j] / 8 + 1) ** 3 for i in range(7) for j in range(7) if i != j) / (7 * 6)
    kbb = sum((b[i] @ b[j] / 8 + 1) ** 3 for i in range(5) for j in range(5) if i != j) / (5 * 4)
    assert fid.kernel_distance(a, b) == pytest.approx(kaa + kbb - 2 * np.mean(k), rel=1e-12)
    # one distribution, 30 images a set: the mean over 300 pairs of sets is 0 within its standard
    # error
    draws = [fid.kernel_distance(rng.normal(size=(30, 4)), rng.normal(size=(30, 4)))
             for _ in range(300)]
    assert abs(np.mean(draws)) < 3 * np.std(draws) / np.sqrt(300)
    subsets = fid.kernel_distance(x, y, num_subsets=20, subset_size=25, seed=1)
    assert subsets != fid.kernel_distance(x, y) and abs(subsets - golden["kid_xy"]) < 0.2
    with pytest.raises(fid.FIDError, match="same width"):
        fid.kernel_distance(x, y[:, :3])


# ----------------------------------------------------------------------------- IS and precision/recall

def test_inception_score():
    confident = 50.0 * np.eye(1008)[np.arange(100) % 10]  # each split of 10 holds 10 distinct sure classes
    assert fid.inception_score(confident) == pytest.approx((10.0, 0.0), abs=1e-9)
    assert fid.inception_score(np.zeros((20, 1008))) == pytest.approx((1.0, 0.0), abs=1e-12)
    logits = np.random.default_rng(0).normal(0, 3, (95, 1008))  # uneven splits: 9 or 10 rows
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    scores = []
    for i in range(10):  # improved-GAN's inception_score/model.py, verbatim in numpy
        part = p[(i * p.shape[0] // 10):((i + 1) * p.shape[0] // 10), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    assert fid.inception_score(logits) == pytest.approx((np.mean(scores), np.std(scores)), rel=1e-10)


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(0, 1, (60, 8)), rng.normal(0.7, 1.3, (50, 8))

    def brute(ref, x):  # fraction of x inside some ref ball of radius = distance to the 3rd neighbour
        radii = np.sort(cdist(ref, ref), axis=1)[:, 3]
        return float(np.mean((cdist(x, ref) <= radii).any(1)))
    precision, recall = fid.precision_recall(real, fake, batch_size=7)
    assert (precision, recall) == (brute(real, fake), brute(fake, real))
    assert 0 < precision < 1 and 0 < recall < 1
    assert fid.precision_recall(real, real) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 100) == (0.0, 0.0)


# ----------------------------------------------------------------------------- image sets, files, CLI

def test_folder_zip_and_npz_give_identical_statistics(tmp_path, model):
    images = uint8_images(2, 32, seed=1)
    folder = write_folder(tmp_path / "imgs", images)
    np.savez(tmp_path / "imgs.npz", arr_0=images)
    feats_folder = fid.compute_features(model, fid.open_set(folder, batch_size=1)["images"])
    feats_npz = fid.compute_features(model, fid.open_set(str(tmp_path / "imgs.npz"), batch_size=1)["images"])
    np.testing.assert_array_equal(feats_folder, feats_npz)
    for a, b in zip(fid.statistics(feats_folder), fid.statistics(feats_npz)):
        np.testing.assert_array_equal(a, b)
    with torch.inference_mode():  # and both equal the network on the images themselves
        direct = model(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).numpy()
    np.testing.assert_allclose(feats_npz, direct, rtol=1e-5, atol=1e-6)
    # A zip holds the same files: its batches are the same pixels, so its features are the same.
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for name in sorted(os.listdir(folder)):
            z.write(os.path.join(folder, name), f"imgs/{name}")
    count, batches = fid.open_set(str(tmp_path / "imgs.zip"))["images"]
    assert count == 2
    np.testing.assert_array_equal(np.concatenate(list(batches)), images)


def test_stats_file_round_trip(tmp_path, golden):
    tensors, meta = golden
    mu, sigma = fid.statistics(tensors["fd.A"].numpy())
    path = str(tmp_path / "a.npz")
    fid.save_statistics(path, mu, sigma)
    with np.load(path) as f:  # what pytorch-fid reads: f['mu'][:], f['sigma'][:]
        assert sorted(f.files) == ["mu", "sigma"]
        np.testing.assert_array_equal(f["mu"][:], mu)
        np.testing.assert_array_equal(f["sigma"][:], sigma)
    stats = fid.open_set(path)["stats"]
    np.testing.assert_array_equal(stats[0], mu)
    np.testing.assert_array_equal(stats[1], sigma)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_cli_save_stats_subprocess(tmp_path, weights, model):
    images = uint8_images(2, 24, seed=2)
    folder = write_folder(tmp_path / "imgs", images)
    out = tmp_path / "stats.npz"
    r = subprocess.run([sys.executable, "fid.py", folder, "--save-stats", str(out), "--inception", weights,
                        "--device", "cpu", "--batch-size", "1"], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr
    mu, sigma = fid.statistics(fid.compute_features(model, fid.open_set(folder)["images"]))
    with np.load(out) as f:
        np.testing.assert_allclose(f["mu"], mu, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(f["sigma"], sigma, rtol=1e-5, atol=1e-9)


def test_cli_adm_reference_batches_with_is_and_pr(tmp_path, golden, weights, monkeypatch, capsys):
    # ADM-style .npz: images in arr_0 and precomputed statistics; the FID uses the statistics, IS and PR the images.
    tensors, meta = golden
    ref_images, sample_images = uint8_images(4, 16, seed=3), uint8_images(10, 16, seed=4)
    for name, images, key in (("ref.npz", ref_images, "fd.A"), ("samples.npz", sample_images, "fd.B")):
        mu, sigma = fid.statistics(tensors[key].numpy())
        np.savez(tmp_path / name, arr_0=images, mu=mu, sigma=sigma)
    feats, compute_features = [], fid.compute_features
    monkeypatch.setattr(fid, "compute_features", lambda *a, **k: feats.append(compute_features(*a, **k)) or feats[-1])
    fid.main([str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "--is", "--pr", "--inception", weights,
              "--device", "cpu"])
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert float(out["FID"]) == pytest.approx(meta["fd_AB"], rel=1e-6)
    assert [len(f) for f in feats] == [4, 10]
    fc = rule_weights(os.path.join(GOLDEN, "pt_inception.keys.tsv"))["fc.weight"].double().numpy()
    is_mean, is_std = fid.inception_score(feats[1].astype(np.float64) @ fc.T)  # unbiased logits, float64
    assert [float(x) for x in out["IS"].split(" +- ")] == pytest.approx([is_mean, is_std], rel=1e-6)
    assert 1 <= is_mean < 10
    assert (float(out["precision"]), float(out["recall"])) == fid.precision_recall(*feats)


def test_download_to_cache_then_skip(tmp_path, weights, monkeypatch):
    real_download = fid.download
    monkeypatch.setenv("DMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fid, "FID_WEIGHTS_URL", "file://" + os.path.abspath(weights).replace(os.sep, "/"))
    fid.load_inception()
    cached = tmp_path / "cache" / os.path.basename(weights)
    assert cached.read_bytes() == open(weights, "rb").read()
    assert os.listdir(tmp_path / "cache") == [cached.name]  # no temp file left

    def no_download(*args):
        raise AssertionError("downloaded although the file is in the cache")
    monkeypatch.setattr(fid, "download", no_download)
    fid.load_inception()
    with pytest.raises(fid.FIDError, match="could not download"):
        real_download("file:///nonexistent/pt_inception.pth", str(tmp_path / "x.pth"))
    assert not os.path.exists(tmp_path / "x.pth")


def test_bad_input_is_one_clear_sentence(tmp_path):
    (tmp_path / "empty").mkdir()
    one_sentence_error([str(tmp_path / "empty"), "--save-stats", str(tmp_path / "o.npz")],
                       "empty", "contains no images")
    mixed = np.empty(2, dtype=object)
    mixed[0], mixed[1] = uint8_images(1, 16, 0)[0], uint8_images(1, 8, 0)[0]
    np.savez(tmp_path / "mixed.npz", arr_0=mixed)
    one_sentence_error([str(tmp_path / "mixed.npz"), "--save-stats", str(tmp_path / "o.npz")],
                       "mixed.npz", "same size")
    np.savez(tmp_path / "nomu.npz", sigma=np.eye(3))
    one_sentence_error([str(tmp_path / "nomu.npz"), str(tmp_path / "nomu.npz")], "nomu.npz", "no 'mu'")
    one_sentence_error([str(tmp_path / "missing"), str(tmp_path / "nomu.npz")], "missing", "does not exist")
    one_sentence_error([str(tmp_path / "empty"), "--save-stats", str(tmp_path / "o.npz"), "--inception",
                        str(tmp_path / "nope.pth")], "contains no images")  # inputs are checked before weights
    assert not os.path.exists(tmp_path / "o.npz")
    # A folder of images of different sizes is refused, not resized, naming the odd file.
    folder = write_folder(tmp_path / "sizes", uint8_images(2, 16, 0))
    Image.fromarray(uint8_images(1, 8, 0)[0]).save(os.path.join(folder, "000002.png"))
    with pytest.raises(fid.FIDError, match=r"000002.png is 8x8 but .*000000.png is 16x16"):
        list(fid.open_set(folder)["images"][1])
    with pytest.raises(fid.FIDError, match="is not pytorch-fid's Inception weights"):
        torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "w.pth")
        fid.load_inception(str(tmp_path / "w.pth"))
