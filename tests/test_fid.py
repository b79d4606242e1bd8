"""
fid.py against pytorch-fid's reference figures (tests/golden/inception_fid.safetensors), on tiny
image sets, and the evaluation commands of docs/evaluation.md on tiny stand-ins of the real dataset
layouts.

Two networks: the FID Inception itself with the seeded weights of tests/golden/README.md (`model`,
`weights`), where a test checks what the network computes; and PixelNet, a deterministic stand-in
of a few pixel averages, where a test checks plumbing (files, layouts, statistics, which statistics
are used). A Fréchet distance on the real 2048-d features takes 25-35 s of scipy's sqrtm on 2 CPU
cores, and the golden file pins the real features already.
"""
import hashlib
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from scipy.spatial.distance import cdist

import fid
from conftest import error_line
import inception
import sample
from dataset import center_crop_arr

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
ROOT = Path(__file__).resolve().parent.parent


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
    assert list(inception.FIDInceptionV3().state_dict().keys()) == keys


def test_pool3_matches_pytorch_fid_and_spatial_is_mixed_6d_conv(golden, model):
    tensors, _ = golden
    branch = []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: branch.append(output))
    with torch.inference_mode():
        pool3, spatial = model.features(tensors["images"])
    hook.remove()
    ref = tensors["pool3"]
    assert pool3.shape == (4, 2048)
    assert (pool3 - ref).abs().max() / ref.abs().max() < 1e-5  # measured 4.4e-7
    torch.testing.assert_close(pool3, ref, rtol=1e-4, atol=1e-5)
    # ADM's sFID features: mixed_6/conv (Mixed_6d's 1x1 branch after its ReLU), channels 0-6, NHWC.
    assert spatial.shape == (4, 17 * 17 * 7) == (4, 2023)
    assert branch[0].shape == (4, 192, 17, 17) and (branch[0] >= 0).all()
    assert torch.equal(spatial, branch[0][:, :7].permute(0, 2, 3, 1).reshape(4, 2023))


def test_frechet_distance_matches_pytorch_fid(golden):
    tensors, meta = golden
    st = {k: fid.statistics(tensors[f"fd.{k}"].numpy()) for k in "ABCD"}
    assert fid.frechet_distance(*st["A"], *st["B"]) == pytest.approx(meta["fd_AB"], rel=1e-6)
    assert fid.frechet_distance(*st["C"], *st["D"]) == pytest.approx(meta["fd_CD_singular"], rel=1e-6)
    assert abs(fid.frechet_distance(*st["A"], *st["A"])) < 1e-6


def test_frechet_distance_singular_offset_and_imaginary(monkeypatch, capsys):
    mu, sigma = np.zeros(3), np.diag([1.0, 2.0, 0.0])
    calls = []
    real_sqrtm = inception.linalg.sqrtm

    def sqrtm(m):  # the first call fails as a singular product does in older scipy
        calls.append(m)
        return np.full_like(m, np.nan) if len(calls) == 1 else real_sqrtm(m)
    monkeypatch.setattr(inception.linalg, "sqrtm", sqrtm)
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
    assert inception.kernel_distance(x, y) == pytest.approx(golden["kid_xy"], rel=1e-12)
    a, b = x[:7], y[:5]  # unequal sizes: every pair by hand, an image never paired with itself
    k = [[(u @ v / 8 + 1) ** 3 for v in b] for u in a]
    kaa = sum((a[i] @ a[j] / 8 + 1) ** 3 for i in range(7) for j in range(7) if i != j) / (7 * 6)
    kbb = sum((b[i] @ b[j] / 8 + 1) ** 3 for i in range(5) for j in range(5) if i != j) / (5 * 4)
    assert inception.kernel_distance(a, b) == pytest.approx(kaa + kbb - 2 * np.mean(k), rel=1e-12)
    # one distribution, 30 images a set: the mean over 300 pairs of sets is 0 within its standard
    # error
    draws = [inception.kernel_distance(rng.normal(size=(30, 4)), rng.normal(size=(30, 4)))
             for _ in range(300)]
    assert abs(np.mean(draws)) < 3 * np.std(draws) / np.sqrt(300)
    subsets = inception.kernel_distance(x, y, num_subsets=20, subset_size=25, seed=1)
    assert subsets != inception.kernel_distance(x, y) and abs(subsets - golden["kid_xy"]) < 0.2
    with pytest.raises(fid.FIDError, match="same width"):
        inception.kernel_distance(x, y[:, :3])


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
              "--device", "cpu", "--npz-stats", "file"])
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert float(out["FID"]) == pytest.approx(meta["fd_AB"], rel=1e-6)
    assert out[str(tmp_path / "ref.npz")].startswith("statistics from the file")
    assert out["sFID"].startswith("not computed")  # the golden statistics have no mu_s, sigma_s
    assert [len(f[0]) for f in feats] == [4, 10]
    assert [f[1].shape for f in feats] == [(4, 2023), (10, 2023)]
    fc = rule_weights(os.path.join(GOLDEN, "pt_inception.keys.tsv"))["fc.weight"].double().numpy()
    logits = feats[1][0].astype(np.float64) @ fc.T  # unbiased logits, float64
    is_mean, is_std = fid.inception_score(logits)
    assert [float(x) for x in out["IS"].split(" +- ")] == pytest.approx([is_mean, is_std], rel=1e-6)
    assert 1 <= is_mean < 10
    pr = fid.precision_recall(feats[0][0], feats[1][0])
    assert (float(out["precision"]), float(out["recall"])) == pr


def test_download_to_cache_then_skip(tmp_path, weights, monkeypatch):
    import checkpoints
    monkeypatch.setenv("DMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "FID_WEIGHTS_URL", "file://" + os.path.abspath(weights).replace(os.sep, "/"))
    fid.load_inception()
    cached = tmp_path / "cache" / os.path.basename(weights)
    assert cached.read_bytes() == open(weights, "rb").read()
    assert os.listdir(tmp_path / "cache") == [cached.name]  # no temp file left

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although the file is in the cache")
    monkeypatch.setattr(checkpoints.urllib.request, "urlopen", no_download)
    fid.load_inception()
    monkeypatch.undo()
    monkeypatch.setenv("DMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "FID_WEIGHTS_URL", "file:///nonexistent/pt_inception.pth")
    with pytest.raises(fid.FIDError, match="could not download file:///nonexistent"):
        fid.load_inception()
    assert os.listdir(tmp_path / "cache") == [cached.name]


def test_inception_sha256_under_the_official_name(tmp_path, weights, monkeypatch):
    """The official name promises a SHA-256 prefix: a cached, downloaded or given file under that
    name that breaks it is refused in one sentence; a file under another name is taken as given."""
    official = tmp_path / "given" / fid.FID_WEIGHTS_NAME
    official.parent.mkdir()
    shutil.copy(weights, official)
    digest = hashlib.sha256(official.read_bytes()).hexdigest()
    assert not digest.startswith(inception.FID_WEIGHTS_SHA256)
    with pytest.raises(fid.FIDError) as e:
        fid.load_inception(str(official))
    assert str(e.value) == (f"{official}: its SHA-256 begins {digest[:8]}, not 6726825d as the "
                            f"official file's name says, so it is damaged or not the official "
                            f"file.")
    folder = write_folder(tmp_path / "imgs", uint8_images(2, 8, 0))
    one_sentence_error([folder, folder, "--inception", str(official)], "SHA-256 begins",
                       "not 6726825d")
    # Under another name (the `model` fixture's pt_inception-rule.pth) a file is taken as given.
    # Downloaded under the official name: refused before it enters the cache.
    monkeypatch.setenv("DMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "FID_WEIGHTS_URL", official.as_uri())
    with pytest.raises(fid.FIDError, match=r"from file://.* \(not kept\): its SHA-256 begins"):
        fid.load_inception()
    assert os.listdir(tmp_path / "cache") == []
    # In the cache under the official name: checked before it is used.
    shutil.copy(official, tmp_path / "cache" / fid.FID_WEIGHTS_NAME)
    with pytest.raises(fid.FIDError, match=r"\(delete it to download it again\): its SHA-256"):
        fid.load_inception()
    monkeypatch.setattr(inception, "FID_WEIGHTS_SHA256", digest[:8])  # a file that keeps the promise
    assert fid.load_inception() is not None


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
    with pytest.raises(fid.FIDError, match=r"w.pth does not fit the FID Inception \(pytorch-fid's "
                       r"weights\): missing .* \(565\); wrong shape fc.weight \(1\)"):
        torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "w.pth")
        fid.load_inception(str(tmp_path / "w.pth"))


# ----------------------------------------------------------------------------- reference sets

class PixelNet(torch.nn.Module):
    """The plumbing stand-in for the Inception: 'pool3' = each channel's mean and standard
    deviation (6-d), 'spatial' = the 2 x 2 block means (12-d, NHWC), logits a fixed projection of
    pool3. It sees exactly the tensor the Inception would (uint8 / 255, NCHW)."""
    def features(self, x):
        pool = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
        return pool, F.adaptive_avg_pool2d(x, 2).permute(0, 2, 3, 1).flatten(1)

    def forward(self, x):
        return self.features(x)[0]

    def logits(self, pool):
        return pool @ torch.linspace(-3, 3, 6 * 1008, dtype=pool.dtype).reshape(1008, 6).T


@pytest.fixture
def pixelnet(monkeypatch):
    net = PixelNet()
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: net)
    return net


def save_image(path, size, seed, mode="RGB", fmt=None):
    """A smooth random image (so JPEG and resizing keep it recognisable) of size (w, h)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, len(mode)), dtype=np.uint8)
    small = small[..., 0] if mode == "L" else small
    im = Image.fromarray(small, mode).resize(size, Image.BILINEAR)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im.save(path, fmt)
    return path


def ffhq_like(root):
    """FFHQ's images1024x1024 layout: numbered subfolders of numbered PNGs, a stray text file."""
    for i, sub in enumerate(["00000", "00000", "01000", "01000"]):
        save_image(os.path.join(root, sub, f"{i * 500:05d}.png"), (72, 72), seed=i)
    Path(root, "LICENSE.txt").write_text("not an image\n")
    return root


def imagenet_like(root):
    """ImageNet's train layout: one folder per synset, JPEGs of any shape, a grayscale one."""
    files = [("n01440764", (50, 40), "RGB"), ("n01440764", (40, 60), "L"),
             ("n01443537", (64, 48), "RGB"), ("n01484850", (45, 45), "RGB")]
    for i, (syn, size, mode) in enumerate(files):
        save_image(os.path.join(root, syn, f"{syn}_{i}.JPEG"), size, 10 + i, mode=mode, fmt="JPEG")
    return root


def coco_like(images, annotations):
    """val2014 and its captions JSON: two captions for some images, none for one, a blank one."""
    names = [f"COCO_val2014_{i:012d}.jpg" for i in (42, 73, 74, 133)]
    for i, name in enumerate(names):
        save_image(os.path.join(images, name), (64 - 4 * i, 48), seed=20 + i, fmt="JPEG")
    anns = [dict(image_id=i, caption=f"  photo {i}\n  number {k} ")
            for i in (42, 73, 133) for k in range(2)]
    anns.insert(0, dict(image_id=133, caption="   "))  # a blank caption is no prompt
    coco = dict(images=[dict(id=int(n[13:25]), file_name=n) for n in names], annotations=anns)
    os.makedirs(os.path.dirname(annotations), exist_ok=True)
    Path(annotations).write_text(json.dumps(coco))
    return images


def laion_like(root):
    """img2dataset shards: 00000.tar and 00001.tar of 000000001.jpg beside 000000001.txt."""
    os.makedirs(root, exist_ok=True)
    for shard in range(2):
        with tarfile.open(os.path.join(root, f"{shard:05d}.tar"), "w") as t:
            for k in range(2):
                stem = f"{shard:04d}{k:05d}"
                jpg = save_image(str(Path(root).parent / "tmp" / f"{stem}.jpg"), (80, 60), 30 + k,
                                 fmt="JPEG")
                t.add(jpg, f"{stem}.jpg")
                txt = Path(jpg).with_suffix(".txt")
                txt.write_text(f"a caption\nof {stem}")
                t.add(str(txt), f"{stem}.txt")
    return root


def crops_by_hand(paths, size):
    """What ADM/DiT feed the model: center_crop_arr of the RGB image (prepare_data.py's crop)."""
    out = []
    for path in paths:
        with Image.open(path) as im:
            out.append(center_crop_arr(im.convert("RGB"), size))
    return np.stack(out)


def read_batch(path):
    with np.load(path) as f:
        assert f.files == ["arr_0"]
        return f["arr_0"]


def test_reference_images_are_center_crop_arr_for_folders_zips_and_tars(tmp_path):
    """The builder's images equal center_crop_arr applied by hand, pixel for pixel, in sorted path
    order, whatever holds the files; unreadable files are skipped, --max-images keeps the first."""
    root = ffhq_like(str(tmp_path / "ffhq"))
    Path(root, "00000", "00999.png").write_bytes(b"not a png")
    fid.main([root, "--resolution", "16", "--save-batch", str(tmp_path / "folder.npz"),
              "--num-workers", "0"])
    order = ["00000/00000.png", "00000/00500.png", "01000/01000.png", "01000/01500.png"]  # sorted
    want = crops_by_hand([os.path.join(root, f) for f in order], 16)  # the broken PNG skipped
    assert want.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(read_batch(tmp_path / "folder.npz"), want)
    with zipfile.ZipFile(tmp_path / "ffhq.zip", "w") as z:
        for f in order[::-1]:
            z.write(os.path.join(root, f), "images1024x1024/" + f)
    with tarfile.open(tmp_path / "ffhq.tar", "w") as t:
        for f in order[::-1]:
            t.add(os.path.join(root, f), f)
    for archive in ("ffhq.zip", "ffhq.tar"):
        out = tmp_path / (archive + ".npz")
        fid.main([str(tmp_path / archive), "--resolution", "16", "--save-batch", str(out),
                  "--num-workers", "0"])
        np.testing.assert_array_equal(read_batch(out), want)
    fid.main([root, "--resolution", "16", "--save-batch", str(tmp_path / "two.npz"),
              "--max-images", "2", "--num-workers", "0"])
    np.testing.assert_array_equal(read_batch(tmp_path / "two.npz"), want[:2])
    imagenet = imagenet_like(str(tmp_path / "train"))  # class folders, grayscale and odd shapes
    fid.main([imagenet, "--resolution", "24", "--save-batch", str(tmp_path / "in.npz"),
              "--num-workers", "0"])
    files = sorted(str(p) for p in Path(imagenet).rglob("*.JPEG"))
    np.testing.assert_array_equal(read_batch(tmp_path / "in.npz"), crops_by_hand(files, 24))
    assert not list(tmp_path.glob("*.partial"))


def test_reference_statistics_equal_the_batch_files_and_fid_with_itself_is_zero(tmp_path, pixelnet,
                                                                                   capsys):
    root = ffhq_like(str(tmp_path / "ffhq"))
    ref, batch = tmp_path / "ref.npz", tmp_path / "batch.npz"
    fid.main([root, "--resolution", "16", "--save-stats", str(ref), "--save-batch", str(batch),
              "--num-workers", "0", "--batch-size", "2"])
    fid.main([str(batch), "--save-stats", str(tmp_path / "again.npz")])
    with np.load(ref) as a, np.load(tmp_path / "again.npz") as b:
        assert sorted(a.files) == ["mu", "mu_s", "sigma", "sigma_s"]
        assert a["mu"].shape == (6,) and a["sigma_s"].shape == (12, 12)
        for key in a.files:  # streamed float64 sums (Moments) against np.cov of all features
            np.testing.assert_allclose(a[key], b[key], rtol=1e-10, atol=1e-15)
    capsys.readouterr()
    fid.main([str(ref), str(batch)])
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    # Zero up to sqrtm's error on a singular covariance (4 images in 12 dims): measured 4e-9.
    assert abs(float(out["FID"])) < 1e-7 and abs(float(out["sFID"])) < 1e-7
    assert out[str(ref)] == "statistics from the file"
    assert out[str(batch)] == "statistics of its 4 images with this network"
    one_sentence_error([root, "--resolution", "16", "--save-stats", str(ref)], str(ref),
                       "already exists")


def test_reference_resumes_after_an_interruption(tmp_path, pixelnet, monkeypatch):
    root = imagenet_like(str(tmp_path / "train"))
    whole = dict(stats_path=str(tmp_path / "whole.npz"), batch_path=str(tmp_path / "w-batch.npz"))
    fid.build_reference(root, 12, batch_size=1, **whole)
    calls, update = [], fid.Moments.update

    def interrupted(self, feats):
        calls.append(1)
        if len(calls) == 5:  # the third image: two committed (checkpoint_every=2), then killed
            raise KeyboardInterrupt
        update(self, feats)
    monkeypatch.setattr(fid.Moments, "update", interrupted)
    parts = dict(stats_path=str(tmp_path / "ref.npz"), batch_path=str(tmp_path / "batch.npz"))
    with pytest.raises(KeyboardInterrupt):
        fid.build_reference(root, 12, batch_size=1, checkpoint_every=2, **parts)
    monkeypatch.undo()
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: pixelnet)
    assert (tmp_path / "ref.npz.partial" / "state.npz").exists()
    assert not (tmp_path / "ref.npz").exists()
    with pytest.raises(fid.FIDError, match="was started by another command"):
        fid.build_reference(root, 16, batch_size=1, **parts)
    assert fid.build_reference(root, 12, batch_size=1, checkpoint_every=2, **parts) == 4
    assert not (tmp_path / "ref.npz.partial").exists()
    np.testing.assert_array_equal(read_batch(parts["batch_path"]), read_batch(whole["batch_path"]))
    with np.load(parts["stats_path"]) as a, np.load(whole["stats_path"]) as b:
        for key in b.files:
            np.testing.assert_array_equal(a[key], b[key])  # bit for bit


def test_captions_to_prompt_files_coco_and_laion(tmp_path, pixelnet):
    images = coco_like(str(tmp_path / "val2014"), str(tmp_path / "captions_val2014.json"))
    fid.main([images, "--resolution", "16", "--captions", str(tmp_path / "captions_val2014.json"),
              "--save-stats", str(tmp_path / "coco.npz"), "--save-batch",
              str(tmp_path / "coco-b.npz"), "--save-prompts", str(tmp_path / "coco.txt"),
              "--num-workers", "0"])
    # COCO_val2014_000000000074.jpg has no caption: it is in neither the set nor the prompts.
    assert Path(tmp_path / "coco.txt").read_text() == \
        "photo 42 number 0\nphoto 73 number 0\nphoto 133 number 0\n"
    kept = [os.path.join(images, f"COCO_val2014_{i:012d}.jpg") for i in (42, 73, 133)]
    np.testing.assert_array_equal(read_batch(tmp_path / "coco-b.npz"), crops_by_hand(kept, 16))
    assert sample.read_prompts(tmp_path / "coco.txt") == ["photo 42 number 0", "photo 73 number 0",
                                                          "photo 133 number 0"]
    shards = laion_like(str(tmp_path / "laion" / "shards"))
    fid.main([shards, "--resolution", "32", "--captions", "txt", "--max-images", "3",
              "--save-batch", str(tmp_path / "laion.npz"), "--save-prompts",
              str(tmp_path / "laion.txt"), "--num-workers", "0"])
    assert Path(tmp_path / "laion.txt").read_text().splitlines() == [
        "a caption of 000000000", "a caption of 000000001", "a caption of 000100000"]
    assert read_batch(tmp_path / "laion.npz").shape == (3, 32, 32, 3)


def test_adm_reference_batch_statistics_are_recomputed_by_default(tmp_path, pixelnet, capsys):
    """ADM's reference batches hold images and statistics of another network (its TensorFlow
    Inception): by default both sets are measured with one network, and the output says so."""
    images = uint8_images(6, 16, seed=5)
    other = fid.statistics(np.random.default_rng(0).normal(size=(20, 6)))
    other_s = fid.statistics(np.random.default_rng(1).normal(size=(20, 12)))
    ref = tmp_path / "VIRTUAL_ref.npz"
    np.savez(ref, arr_0=images, mu=other[0], sigma=other[1], mu_s=other_s[0], sigma_s=other_s[1])
    np.savez(tmp_path / "samples.npz", arr_0=images)
    fid.main([str(ref), str(tmp_path / "samples.npz"), "--pr"])
    out = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert out[str(ref)].startswith("statistics of its 6 images with this network; the file's own "
                                    "statistics are not used")
    assert abs(float(out["FID"])) < 1e-7 and abs(float(out["sFID"])) < 1e-7
    assert (float(out["precision"]), float(out["recall"])) == (1.0, 1.0)
    fid.main([str(ref), str(tmp_path / "samples.npz"), "--npz-stats", "file"])
    out = capsys.readouterr().out
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mine = fid.statistics(PixelNet().features(x)[0].numpy())
    assert f"{ref}: statistics from the file (its images not used for them: --npz-stats" in out
    assert "the FID mixes the two" in out
    assert f"FID: {fid.frechet_distance(*other, *mine)}" in out


# ------------------------------------------------------------------- the documentation's commands

EVALUATION = "docs/evaluation.md"
DOCUMENTS = ("README.md", EVALUATION, "docs/study.md", "docs/speed-and-memory.md", "docs/code.md")


def documented_commands():
    """(file, command) for every line of the bash blocks of the README and docs/, continuation
    lines joined."""
    out = []
    for name in DOCUMENTS:
        in_bash, command = False, ""
        for line in (ROOT / name).read_text().splitlines():
            if line.startswith("```"):
                in_bash = not in_bash and line.strip() == "```bash"
            elif not in_bash:
                continue
            elif line.endswith("\\"):
                command += line[:-1]
            else:
                out.append((name, command + line))
                command = ""
    return out


def normalized(command):
    """A fid.py command with its comment dropped and any sample set called samples/X.npz."""
    argv = shlex.split(command, comments=True)
    return " ".join("samples/X.npz" if a.startswith("samples/") else a for a in argv)


def test_documented_evaluation_commands_run_as_written(tmp_path, pixelnet, monkeypatch, capsys):
    """Every command of docs/evaluation.md, run on tiny stand-ins of the real layouts
    (HOME is a temporary folder holding ~/data/ffhq/images1024x1024/00000/...,
    ~/data/imagenet/train/n01440764/..., ~/coco/val2014 with its captions JSON and
    ~/laion/shards/*.tar); sample.py's commands are stood in for by random sample sets at their
    --out, curl's by an ADM batch in miniature. Every other fid.py command of the README and docs/
    is one of these, up to the name of its sample set."""
    home, work = tmp_path / "home", tmp_path / "work"
    ffhq_like(str(home / "data/ffhq/images1024x1024"))
    imagenet_like(str(home / "data/imagenet/train"))
    coco_like(str(home / "coco/val2014"), str(home / "coco/annotations/captions_val2014.json"))
    laion_like(str(home / "laion/shards"))
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    rng = np.random.default_rng(0)
    other = fid.statistics(rng.normal(size=(20, 6)))  # statistics of "another network"
    np.savez("fid_stats_mscoco256_val.npz", mu=other[0], sigma=other[1])  # U-ViT's: mu, sigma
    outputs = {}
    for section, command in documented_commands():
        argv = shlex.split(command, comments=True)
        if section != EVALUATION or not argv:
            continue
        if argv[:2] == ["python", "fid.py"]:
            fid.main([os.path.expanduser(a) for a in argv[2:]])
            outputs[normalized(command)] = capsys.readouterr().out
        elif argv[0] == "curl":  # ADM's batch: images and another network's statistics
            np.savez(argv[-1].rsplit("/", 1)[1], arr_0=uint8_images(8, 32, seed=7), mu=other[0],
                     sigma=other[1], mu_s=np.zeros(12), sigma_s=np.eye(12))
        elif argv[:2] == ["python", "sample.py"]:
            if "--prompt-file" in argv:
                assert len(sample.read_prompts(argv[argv.index("--prompt-file") + 1])) >= 3
            out = Path(argv[argv.index("--out") + 1])
            out.parent.mkdir(parents=True, exist_ok=True)
            np.savez(f"{out}.npz", arr_0=uint8_images(10, 24, seed=8))  # sample.py writes DIR.npz
        elif argv[:2] != ["python", "evaluator.py"]:  # ADM's own TensorFlow evaluator is not run
            pytest.fail(f"docs/evaluation.md has a command this test cannot stand in for: "
                        f"{command}")
    assert len(outputs) == 11
    compared = {c: out for c, out in outputs.items() if "--resolution" not in c}
    for c, out in compared.items():
        assert float(out.split("FID: ")[1].split()[0]) >= -1e-7, (c, out)
        assert "sFID: " in out
    ffhq, batch = crops_by_hand(sorted(home.glob("data/ffhq/images1024x1024/*/*.png")), 256), None
    with np.load("data/ffhq256-ref-batch.npz") as f:
        batch = f["arr_0"]
    np.testing.assert_array_equal(batch, ffhq)
    assert "IS: " in outputs["python fid.py data/ffhq256-ref-batch.npz samples/X.npz --is --pr"]
    adm = outputs["python fid.py VIRTUAL_imagenet256_labeled.npz samples/X.npz --pr"]
    assert ("VIRTUAL_imagenet256_labeled.npz: statistics of its 8 images with this network; the "
            "file's own statistics are not used") in adm
    assert "precision: " in adm
    uvit = outputs["python fid.py fid_stats_mscoco256_val.npz samples/X.npz"]
    assert "sFID: not computed (fid_stats_mscoco256_val.npz has no mu_s, sigma_s)" in uvit
    assert Path("data/coco-val2014-prompts.txt").read_text().count("\n") == 3  # the captioned ones
    assert len(Path("data/laion512-prompts.txt").read_text().splitlines()) == 4
    for name in ("ffhq256-ref", "imagenet256-train-ref", "coco256-val-ref", "laion512-ref"):
        with np.load(f"data/{name}.npz") as f:
            assert sorted(f.files) == ["mu", "mu_s", "sigma", "sigma_s"]
    elsewhere = [normalized(c) for s, c in documented_commands()
                 if s != EVALUATION and c.startswith("python fid.py")]
    assert len(elsewhere) >= 8 and set(elsewhere) <= set(outputs), set(elsewhere) - set(outputs)


# ------------------------------------------------- nothing lost, nothing mixed (issue 24: fid.py)

def fid_exit(argv, capsys, status=1):
    """fid.main(argv) must end with `status` and one sentence (error_line); returns it."""
    with pytest.raises(SystemExit) as e:
        fid.main(argv)
    err = capsys.readouterr().err + (str(e.value.code) if not isinstance(e.value.code, int) else "")
    assert (e.value.code if isinstance(e.value.code, int) else 1) == status, err
    return error_line(err)


def test_save_stats_never_overwrites_its_input_or_any_file(tmp_path, pixelnet, unchanged, capsys):
    """Item 1: `fid.py batch.npz --save-stats batch.npz` replaced the images by mu/sigma, exit 0."""
    np.savez(tmp_path / "batch.npz", arr_0=uint8_images(4, 8, 0))
    (tmp_path / "other.npz").write_bytes(b"the user's file")
    kept = unchanged(tmp_path)
    line = fid_exit([str(tmp_path / "batch.npz"), "--save-stats", str(tmp_path / "batch.npz")], capsys)
    assert "batch.npz: the file already exists (it is the input itself)" in line
    line = fid_exit([str(tmp_path / "batch.npz"), "--save-stats", str(tmp_path / "other.npz")], capsys)
    assert "other.npz: the file already exists" in line
    kept()
    assert sorted(os.listdir(tmp_path)) == ["batch.npz", "other.npz"]


def interrupt_after(monkeypatch, calls):
    """Moments.update raises KeyboardInterrupt (Ctrl-C) at its `calls`-th call."""
    seen, update = [], fid.Moments.update

    def interrupted(self, feats):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt
        update(self, feats)
    monkeypatch.setattr(fid.Moments, "update", interrupted)


def test_a_resumed_build_refuses_another_network_under_the_same_path(tmp_path, pixelnet, monkeypatch,
                                                                    unchanged, capsys):
    """Item 4: the Inception file replaced after a kill gave statistics from two networks."""
    root = imagenet_like(str(tmp_path / "train"))
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"network one")  # load_inception is the PixelNet stand-in: only the bytes count
    argv = [root, "--resolution", "12", "--save-stats", str(tmp_path / "ref.npz"), "--inception",
            str(weights), "--num-workers", "0", "--batch-size", "1"]
    interrupt_after(monkeypatch, 3)
    with pytest.raises(SystemExit, match="interrupted; rerun the same command"):
        fid.main(argv)
    monkeypatch.undo()
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: pixelnet)
    weights.write_bytes(b"network two")
    kept = unchanged(tmp_path)
    line = fid_exit(argv, capsys)
    assert "ref.npz.partial was started by another command, on other files or with another network" in line
    kept()
    weights.write_bytes(b"network one")  # the network it was started with: it finishes
    fid.main(argv)
    assert (tmp_path / "ref.npz").exists() and not (tmp_path / "ref.npz.partial").exists()


def test_a_resumed_build_refuses_images_rewritten_under_the_same_names(tmp_path, pixelnet, monkeypatch,
                                                                       unchanged, capsys):
    """Item 5: images rewritten after a kill were mixed, old pixels before the kill point, new after."""
    root = imagenet_like(str(tmp_path / "train"))
    parts = dict(stats_path=str(tmp_path / "ref.npz"), batch_path=str(tmp_path / "batch.npz"))
    interrupt_after(monkeypatch, 3)  # two images committed (checkpoint_every=1), then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        fid.build_reference(root, 12, batch_size=1, checkpoint_every=1, **parts)
    monkeypatch.undo()
    monkeypatch.setattr(fid, "load_inception", lambda *args, **kwargs: pixelnet)
    first = sorted(Path(root).rglob("*.JPEG"))[0]  # read before the kill
    save_image(str(first), (50, 40), seed=99, fmt="JPEG")
    kept = unchanged(tmp_path)
    line = fid_exit([root, "--resolution", "12", "--save-stats", parts["stats_path"], "--save-batch",
                     parts["batch_path"], "--num-workers", "0", "--batch-size", "1"], capsys)
    assert "the source's files changed since" in line and "ref.npz.partial" in line
    kept()


def test_a_build_in_progress_is_held_by_one_process(tmp_path, pixelnet, unchanged, capsys):
    """Two builds of the same set at once: the second is refused while the first holds the folder."""
    root = imagenet_like(str(tmp_path / "train"))
    partial = tmp_path / "ref.npz.partial"
    partial.mkdir()
    holder = subprocess.Popen(["flock", "--no-fork", str(partial / ".lock"), "sleep", "30"])
    try:
        for _ in range(100):  # until flock holds it
            if subprocess.run(["flock", "-n", str(partial / ".lock"), "true"]).returncode:
                break
        kept = unchanged(tmp_path)
        line = fid_exit([root, "--resolution", "12", "--save-stats", str(tmp_path / "ref.npz"),
                         "--num-workers", "0"], capsys)
        assert "ref.npz.partial is in use by another process" in line
        kept()
    finally:
        holder.kill()
        holder.wait()


FULL_DISK = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))  # ulimit -f 1 kB
import fid
for argv in json.loads(sys.argv[1]):  # one interpreter for several commands: torch imports once
    try:
        fid.main(argv)
    except SystemExit as e:
        print(e.code, file=sys.stderr)
        print(f"exit {1 if isinstance(e.code, str) else e.code}", file=sys.stderr)
"""


def test_a_full_disk_is_one_sentence(tmp_path, unchanged):
    """Items 8 and 14: the batch's memory map on a full disk died of SIGBUS (or a traceback); compare
    --save-stats left a 2 MB OUT.npz.PID.tmp and a traceback."""
    root = imagenet_like(str(tmp_path / "train"))
    np.savez(tmp_path / "in.npz", mu=np.zeros(64), sigma=np.eye(64))  # 32 kB of sigma, over 1 kB
    commands = [[root, "--resolution", "32", "--save-batch", str(tmp_path / "b.npz"), "--num-workers", "0"],
                [str(tmp_path / "in.npz"), "--save-stats", str(tmp_path / "out.npz")]]
    kept = unchanged(tmp_path)
    run = subprocess.run([sys.executable, "-c", FULL_DISK, json.dumps(commands)], cwd=ROOT, capture_output=True,
                         text=True)
    parts = run.stderr.split("exit ")
    assert [p.split("\n")[0] for p in parts[1:]] == ["1", "1"], run.stderr
    assert "b.npz.partial/batch.npy: File too large" in error_line(parts[0])
    assert "out.npz: could not be written (File too large)" in error_line(parts[1])
    kept()
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_a_symlink_loop_is_refused_not_followed(tmp_path, pixelnet, unchanged, capsys):
    """Item 9: os.walk(followlinks=True) went round a loop: 2 real images became 82."""
    src = tmp_path / "src"
    save_image(str(src / "a" / "0.png"), (16, 16), 0)
    save_image(str(src / "a" / "1.png"), (16, 16), 1)
    os.symlink("..", src / "a" / "loop")
    kept = unchanged(tmp_path)
    line = fid_exit([str(src), "--resolution", "8", "--save-batch", str(tmp_path / "b.npz"),
                     "--num-workers", "0"], capsys)
    assert "loop: a link to the folder" in line and "already read" in line
    kept()
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_statistics_that_are_not_finite_floats_are_refused(tmp_path, capsys):
    """Items 11, 13, 14: NaN mu and inf sigma printed `FID: nan`; one NaN in sigma hung sqrtm past
    500 s; integer statistics were taken as they were; strings ended in a traceback."""
    np.savez(tmp_path / "good.npz", mu=np.zeros(4), sigma=np.eye(4))
    nan_sigma = np.eye(4)
    nan_sigma[1, 2] = np.nan
    cases = {"nan-mu": (np.full(4, np.nan), np.eye(4), "'mu' holds 4 values that are not finite"),
             "inf-sigma": (np.zeros(4), np.full((4, 4), np.inf), "'sigma' holds 16 values that are not finite"),
             "nan-sigma": (np.zeros(4), nan_sigma, "'sigma' holds 1 values that are not finite"),
             "int": (np.zeros(4, np.int64), np.eye(4, dtype=np.int64), "'mu' is int64, not floating-point"),
             "str": (np.array(["a"] * 4), np.full((4, 4), "b"), "'mu' is <U1, not floating-point")}
    for name, (mu, sigma, want) in cases.items():
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=sigma)
        assert want in fid_exit([str(tmp_path / "good.npz"), str(tmp_path / f"{name}.npz")], capsys)
    with pytest.raises(fid.FIDError, match="sigma2 holds values that are not finite"):
        fid.frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), nan_sigma)  # at once, not sqrtm's 500 s


def test_sixteen_bit_images_are_one_image_in_both_modes(tmp_path, pixelnet, capsys):
    """Item 12: compare mode clipped 16-bit PNGs to white, the builder scaled them: a folder scored
    FID 204 against its own reference batch."""
    folder = tmp_path / "s16"
    folder.mkdir()
    for i in range(3):
        a = (np.random.default_rng(i).integers(0, 65536, (8, 8))).astype(np.uint16)
        Image.fromarray(a).save(folder / f"{i}.png")  # a 16-bit grayscale PNG (mode I;16)
    fid.main([str(folder), "--resolution", "8", "--save-batch", str(tmp_path / "ref.npz"),
              "--num-workers", "0"])
    compared = np.concatenate(list(fid.open_set(str(folder))["images"][1]))
    built = read_batch(tmp_path / "ref.npz")
    assert built.max() > 0 and built.min() < 255
    # The builder's crop at the image's own size is the identity, so the two modes read equal pixels.
    np.testing.assert_array_equal(compared, built)


def test_sets_of_different_sizes_are_compared_with_a_note(tmp_path, pixelnet, capsys):
    """Item 13: REF and SAMPLES of different image sizes were compared without a note."""
    np.savez(tmp_path / "a.npz", arr_0=uint8_images(4, 16, 0))
    np.savez(tmp_path / "b.npz", arr_0=uint8_images(4, 8, 1))
    fid.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
    assert "note: " + str(tmp_path / "a.npz") + " holds 16x16 images and " in capsys.readouterr().out


def test_bad_sources_and_flags_are_one_sentence(tmp_path, pixelnet, unchanged, capsys, monkeypatch):
    """Items 14 and 15: a truncated tar, a null or numeric COCO caption, a dangling image_id, a
    decompression bomb, --batch-size 0 were tracebacks; --num-workers 0 in compare mode too; a
    build that found no usable image left OUT.npz.partial, refusing the fixed rerun."""
    imagenet_like(str(tmp_path / "train"))
    with tarfile.open(tmp_path / "whole.tar", "w") as t:
        t.add(tmp_path / "train", "train")
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2 + 100])
    images = coco_like(str(tmp_path / "val2014"), str(tmp_path / "coco.json"))
    coco = json.loads((tmp_path / "coco.json").read_text())
    for name, change in (("null", dict(caption=None)), ("number", dict(caption=7)),
                         ("dangling", dict(image_id=5))):
        bad = dict(coco, annotations=[dict(coco["annotations"][1], id=3, **change)])
        (tmp_path / f"{name}.json").write_text(json.dumps(bad))
    np.savez(tmp_path / "a.npz", arr_0=uint8_images(3, 8, 0))
    out = str(tmp_path / "o.npz")
    kept = unchanged(tmp_path)
    build = ["--resolution", "8", "--save-stats", out, "--num-workers", "0"]
    assert "cut.tar: not a readable tar file, truncated or damaged" in fid_exit(
        [str(tmp_path / "cut.tar"), *build], capsys)
    for name, want in (("null", "annotation 3 has the caption None, not a string"),
                       ("number", "annotation 3 has the caption 7, not a string"),
                       ("dangling", "annotation 3 is of image_id 5, which is not among its images")):
        line = fid_exit([images, *build, "--captions", str(tmp_path / f"{name}.json"), "--save-prompts",
                         str(tmp_path / "p.txt")], capsys)
        assert want in line, line
    for flag in (["--batch-size", "0"], ["--num-workers", "-1"]):
        assert "--batch-size must be at least 1" in fid_exit([str(tmp_path / "a.npz"), *build, *flag], capsys, 2)
        assert "--batch-size must be at least 1" in fid_exit([str(tmp_path / "a.npz"), "--save-stats", out, *flag],
                                                             capsys, 2)
    # No caption matches: one sentence, and no OUT.npz.partial to block the rerun with a fixed file.
    none = dict(coco, annotations=[])
    (tmp_path / "none.json").write_text(json.dumps(none))
    line = fid_exit([images, *build, "--captions", str(tmp_path / "none.json"), "--save-prompts",
                     str(tmp_path / "p.txt")], capsys)
    assert "only 0 of its 4 image files could be used" in line and "nothing was written" in line
    assert not (tmp_path / "o.npz.partial").exists()
    # A decompression bomb in compare mode (over twice PIL's limit): one sentence.
    bomb = tmp_path / "bomb"
    save_image(str(bomb / "0.png"), (64, 64), 0)
    save_image(str(bomb / "1.png"), (64, 64), 1)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)
    line = fid_exit([str(bomb), "--save-stats", out, "--num-workers", "0"], capsys)
    assert "0.png is not a readable image" in line and "decompression bomb" in line
    # Over the limit but under twice it: read, without PIL's warning printed into the progress bar.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 - 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fid.main([str(bomb), str(bomb), "--num-workers", "0"])
    assert [w for w in caught if w.category is Image.DecompressionBombWarning] == []
    kept()
    # --num-workers 0 in compare mode reads in one thread.
    fid.main([str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), "--num-workers", "0"])
    assert "FID: " in capsys.readouterr().out
