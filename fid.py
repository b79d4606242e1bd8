"""
Inception FID, Inception Score and improved precision/recall, self-contained (plain PyTorch + scipy).

The network is the FID variant of Inception-v3 that pytorch-fid ports from the TensorFlow graph of
2015-12-05 (mseitzer/pytorch-fid, src/pytorch_fid/inception.py, `use_fid_inception=True`), with the same
preprocessing and the same weights file, so the numbers equal pytorch-fid's and, up to the port, those of
the TensorFlow tools (TTUR, ADM's evaluator) that the paper's tables come from.

    python fid.py REF SAMPLES                       # FID; each a folder, a .zip, an .npz of images or of stats
    python fid.py REF SAMPLES --is --pr             # + Inception Score and precision/recall (Table 8)
    python fid.py samples/ --save-stats samples.npz # statistics once, for later comparisons
"""
import argparse
import io
import os
import sys
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from scipy.special import log_softmax, logsumexp
from tqdm import tqdm

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class FIDError(Exception):
    """Bad input: the message is one sentence naming the file and what is wrong."""


#################################################################################
#                     The FID Inception-v3 (pytorch-fid port)                   #
#################################################################################
# Module and parameter names are torchvision's Inception3, the keys of pt_inception-2015-12-05-6726825d.pth.
# The FID blocks differ from torchvision's where the TensorFlow graph does: their average pools leave the
# zero padding out of the mean (count_include_pad=False), and the last block (Mixed_7c) max-pools instead.

class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3, as TensorFlow's), ReLU."""
    def __init__(self, cin, cout, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):  # pytorch-fid's patch: TensorFlow's average pool does not count the padded zeros
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """Mixed_5b-5d: 1x1, 5x5, double 3x3 and pooled branches (pytorch-fid's FIDInceptionA)."""
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction 35 -> 17 (torchvision's InceptionB, unchanged in pytorch-fid)."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """Mixed_6b-6e: factorised 7x7 branches (pytorch-fid's FIDInceptionC)."""
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction 17 -> 8 (torchvision's InceptionD, unchanged in pytorch-fid)."""
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """Mixed_7b (avg pool, pytorch-fid's FIDInceptionE_1) and Mixed_7c (max pool, FIDInceptionE_2)."""
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        # The TensorFlow graph's last block max-pools; pytorch-fid's FIDInceptionE_2 follows it.
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Images in [0, 1] of any size -> 2048-d pool3 features; `logits` gives the 1008 classes for the IS."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, c7=128)
        self.Mixed_6c = FIDInceptionC(768, c7=160)
        self.Mixed_6d = FIDInceptionC(768, c7=160)
        self.Mixed_6e = FIDInceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # the TensorFlow graph's 1008 outputs (ImageNet classes and unused ones)

    def forward(self, x):
        # pytorch-fid's preprocessing: bilinear resize to 299 (align_corners=False), [0, 1] -> [-1, 1].
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # pool3

    def logits(self, pool3):
        # Without the bias, as the Inception Score's reference code takes them (improved-GAN's
        # inception_score/model.py: matmul of pool3 with softmax/logits/MatMul's weight; so do ADM's
        # evaluator and torch-fidelity's default `logits_unbiased`). pytorch-fid has no IS.
        return pool3 @ self.fc.weight.T


#################################################################################
#                                   Weights                                     #
#################################################################################

def download(url, path):
    """Fetch url into path with a progress bar; written to a temp file and renamed, so never half there."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with urllib.request.urlopen(url) as r, open(tmp, "wb") as f, \
                tqdm(total=int(r.headers.get("Content-Length") or 0) or None, unit="B", unit_scale=True,
                     desc=f"downloading {os.path.basename(path)}") as bar:
            while chunk := r.read(1 << 20):
                bar.update(f.write(chunk))
        os.replace(tmp, path)
    except OSError as e:  # urllib's URLError and HTTPError are OSErrors
        raise FIDError(f"could not download {url} ({e}); fetch it yourself and pass --inception PATH.") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_inception(path=None, device="cpu"):
    """The FID Inception with pytorch-fid's weights: from path, else from the cache (downloaded once)."""
    if path is None:
        path = os.path.join(os.environ.get("DMP_CACHE") or os.path.expanduser("~/.cache/dmp"),
                            os.path.basename(FID_WEIGHTS_URL))
        if not os.path.exists(path):
            download(FID_WEIGHTS_URL, path)
    if not os.path.isfile(path):
        raise FIDError(f"{path} does not exist (expected pt_inception-2015-12-05-6726825d.pth).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises a variety of errors for a file that is no checkpoint
        raise FIDError(f"{path} is not a weights file that torch.load(weights_only=True) can read "
                       f"({type(e).__name__}).") from None
    model = FIDInceptionV3()
    keys = model.state_dict().keys()
    if not isinstance(state, dict) or state.keys() != keys:
        got = state.keys() if isinstance(state, dict) else set()
        raise FIDError(f"{path} is not pytorch-fid's Inception weights ({len(keys - got)} keys missing, "
                       f"{len(got - keys)} unexpected).")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FIDError(f"{path} does not fit the FID Inception ({' '.join(str(e).split())[:200]}).") from None
    return model.eval().requires_grad_(False).to(device)


#################################################################################
#                               Reading image sets                              #
#################################################################################
# A set is a folder (its own files only, as pytorch-fid), a .zip (every image in it) or an .npz whose arr_0
# is uint8 N x H x W x 3 (ADM's sample and reference batches). Images are converted to RGB and must all
# have the size of the first: a mismatch is refused, not resized, because the resize would change the FID.

def _file_batches(path, batch_size, workers):
    """(count, batch iterator) for a folder or zip of image files, decoded by a thread pool one batch ahead."""
    zf = zipfile.ZipFile(path) if os.path.isfile(path) else None
    names = sorted(n for n in (zf.namelist() if zf else os.listdir(path))
                   if n.lower().endswith(IMAGE_EXTENSIONS) and (zf or os.path.isfile(os.path.join(path, n))))
    if not names:
        raise FIDError(f"{path} contains no images ({', '.join(IMAGE_EXTENSIONS)}).")

    def load(name):
        where = f"{path}:{name}" if zf else os.path.join(path, name)
        try:
            with Image.open(io.BytesIO(zf.read(name)) if zf else where) as im:
                return where, np.asarray(im.convert("RGB"))
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise FIDError(f"{where} is not a readable image ({e}).") from None

    def batches():
        first = None
        with ThreadPoolExecutor(workers) as pool:
            ahead = pool.map(load, names[:batch_size])
            for i in range(0, len(names), batch_size):
                current, ahead = ahead, pool.map(load, names[i + batch_size:i + 2 * batch_size])
                loaded = list(current)
                first = first or (loaded[0][0], loaded[0][1].shape)
                for where, im in loaded:
                    if im.shape != first[1]:
                        raise FIDError(f"{where} is {im.shape[1]}x{im.shape[0]} but {first[0]} is {first[1][1]}x"
                                       f"{first[1][0]}: all images of a set must have the same size.")
                yield np.stack([im for _, im in loaded])
    return len(names), batches()


def _open_arr_0(path):
    """arr_0.npy inside the .npz as a stream positioned at the data, with its shape, order and dtype."""
    f = zipfile.ZipFile(path).open("arr_0.npy")
    version = np.lib.format.read_magic(f)
    header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return (f, *header(f))


def _npz_batches(path, batch_size):
    """(count, batch iterator) for arr_0 of an .npz, streamed from the zip so 50K images need not fit in memory."""
    f, shape, fortran, dtype = _open_arr_0(path)
    f.close()
    if dtype == object:
        raise FIDError(f"{path}: arr_0 holds Python objects, not one uint8 array (images of different sizes?); "
                       f"all images of a set must have the same size.")
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
        raise FIDError(f"{path}: arr_0 is {dtype} of shape {shape}, not uint8 N x H x W x 3 (ADM's layout).")
    if shape[0] == 0:
        raise FIDError(f"{path}: arr_0 contains no images.")

    def batches():
        with _open_arr_0(path)[0] as f:
            for i in range(0, shape[0], batch_size):
                k = min(batch_size, shape[0] - i)
                data = bytearray(f.read(k * shape[1] * shape[2] * 3))
                if len(data) != k * shape[1] * shape[2] * 3:
                    raise FIDError(f"{path}: arr_0 is truncated after image {i}.")
                yield np.frombuffer(data, np.uint8).reshape(k, *shape[1:])
    return shape[0], batches()


def open_set(path, batch_size=50, workers=8):
    """An input: {'stats': (mu, sigma) or None, 'images': (count, uint8 NHWC batch iterator) or None}."""
    if not os.path.exists(path):
        raise FIDError(f"{path} does not exist.")
    if os.path.isdir(path) or path.lower().endswith(".zip"):
        try:
            return {"stats": None, "images": _file_batches(path, batch_size, workers)}
        except zipfile.BadZipFile as e:
            raise FIDError(f"{path} is not a readable zip file ({e}).") from None
    if not path.lower().endswith(".npz"):
        raise FIDError(f"{path} is neither a folder, a .zip nor an .npz.")
    if not zipfile.is_zipfile(path):
        raise FIDError(f"{path} is not an .npz archive (np.savez writes a zip of .npy arrays).")
    try:
        with np.load(path) as f:
            files = set(f.files)
            stats = load_statistics(path, f) if files & {"mu", "sigma"} else None
        if stats is None and "arr_0" not in files:
            raise FIDError(f"{path} has neither statistics ('mu', 'sigma') nor images ('arr_0').")
        return {"stats": stats, "images": _npz_batches(path, batch_size) if "arr_0" in files else None}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise FIDError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}).") from None


#################################################################################
#                           Features and statistics                             #
#################################################################################

@torch.inference_mode()
def compute_features(model, images, device="cpu", desc="inception"):
    """pool3 features (N x 2048, float32) of (count, uint8 NHWC batches), as pytorch-fid's get_activations."""
    count, batches = images
    feats, i = np.empty((count, 2048), np.float32), 0
    with tqdm(total=count, unit="img", desc=desc) as bar:
        for batch in batches:
            x = torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).float() / 255  # as ToTensor()
            feats[i:i + len(batch)] = model(x).cpu().numpy()
            i += len(batch)
            bar.update(len(batch))
    return feats


def statistics(feats, name="the set"):
    """mu and sigma of features (pytorch-fid's calculate_activation_statistics, in float64 throughout)."""
    if len(feats) < 2:
        raise FIDError(f"{name} has {len(feats)} image(s); statistics need at least 2.")
    feats = feats.astype(np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def load_statistics(path, f=None):
    """(mu, sigma) from a pytorch-fid stats file or an ADM reference batch."""
    f = np.load(path) if f is None else f
    for key in ("mu", "sigma"):
        if key not in f.files:
            raise FIDError(f"{path} has no '{key}' array: a statistics file needs 'mu' and 'sigma'.")
    mu, sigma = f["mu"], f["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise FIDError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not a d vector and a d x d matrix.")
    return mu, sigma


def save_statistics(path, mu, sigma):
    """Write mu and sigma as pytorch-fid does (np.savez), to a temp file renamed into place."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma)
    os.replace(tmp, path)


#################################################################################
#                                   Metrics                                     #
#################################################################################

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)): pytorch-fid's calculate_frechet_distance."""
    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise FIDError(f"the two statistics have different dimensions ({mu1.shape[0]} and {mu2.shape[0]}).")
    diff = mu1 - mu2
    # The product might be almost singular. (pytorch-fid passes disp=False, deprecated in scipy 1.16.)
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        print(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates",
              file=sys.stderr)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # Numerical error might give a slight imaginary component.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise FIDError(f"sqrtm(sigma1 sigma2) has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}: "
                           f"the statistics are degenerate.")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def polynomial_kernel(x, y):
    """KID's kernel between the rows of two feature arrays: (x . y / d + 1)^3, d their width."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return (x @ y.T / x.shape[1] + 1) ** 3


def kernel_distance(feats1, feats2, num_subsets=None, subset_size=1000, seed=0):
    """
    KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the squared maximum mean discrepancy
    between two sets of features under polynomial_kernel, by its unbiased estimator (kernel values
    of an image with itself left out), so that unlike FID its expectation does not depend on the
    number of images:
        sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (n (n-1)) - 2 sum_{i, j}
        k(x_i, y_j) / (m n)
    It can be slightly negative when the sets come from one distribution. With num_subsets, the mean
    of that estimator over random subsets of min(subset_size, m, n) rows of each set, as clean-fid
    and torch-fidelity compute it (100 subsets of 1000); by default the two whole sets.
    """
    x, y = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise FIDError(f"KID needs two feature arrays of the same width, got {x.shape} and "
                       f"{y.shape}.")
    if min(len(x), len(y)) < 2:
        raise FIDError(f"KID needs at least 2 images per set, got {len(x)} and {len(y)}.")
    if num_subsets is None:
        return _mmd2_unbiased(x, y)
    rng, m = np.random.default_rng(seed), min(subset_size, len(x), len(y))
    subsets = [(rng.choice(len(x), m, replace=False), rng.choice(len(y), m, replace=False))
               for _ in range(num_subsets)]
    return float(np.mean([_mmd2_unbiased(x[i], y[j]) for i, j in subsets]))


def _mmd2_unbiased(x, y):
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    m, n = len(x), len(y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within = within_x + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(within - 2 * polynomial_kernel(x, y).mean())


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) on consecutive splits, mean and std: improved-GAN's (Salimans et al. 2016)
    inception_score/model.py, which ADM's evaluator (5000-image splits = 10 for 50K) and torch-fidelity follow."""
    if len(logits) < splits:
        raise FIDError(f"the Inception Score with {splits} splits needs at least {splits} images, got {len(logits)}.")
    logp, n, scores = log_softmax(np.asarray(logits, np.float64), axis=1), len(logits), []
    for i in range(splits):
        part = logp[i * n // splits:(i + 1) * n // splits]
        log_py = logsumexp(part, axis=0) - np.log(len(part))  # log of the split's mean p(y)
        scores.append(np.exp(np.mean(np.sum(np.exp(part) * (part - log_py), axis=1))))
    return float(np.mean(scores)), float(np.std(scores))


def _sq_dists(a, b):
    return (a.square().sum(1, keepdim=True) + b.square().sum(1) - 2 * a @ b.T).clamp_min_(0)


@torch.inference_mode()
def precision_recall(real, fake, k=3, batch_size=1000, device="cpu"):
    """Improved precision and recall (Kynkäänniemi et al. 2019, k=3, as ADM's evaluator): the fraction of fake
    features inside some real feature's k-NN ball, and vice versa. Distances are computed batch_size rows
    at a time, so 50K x 50K never sits in memory."""
    real, fake = (torch.as_tensor(x, dtype=torch.float32, device=device) for x in (real, fake))

    def radii(x):  # squared distance to the k-th nearest neighbour, the point itself being the 0-th
        return torch.cat([_sq_dists(x[i:i + batch_size], x).kthvalue(k + 1, dim=1).values
                          for i in range(0, len(x), batch_size)])

    def covered(x, ref, ref_radii):  # is each row of x within some ref ball
        return torch.cat([(_sq_dists(x[i:i + batch_size], ref) <= ref_radii).any(1)
                          for i in range(0, len(x), batch_size)])

    if min(len(real), len(fake)) <= k:
        raise FIDError(f"precision/recall with k={k} needs more than {k} images per set.")
    precision = covered(fake, real, radii(real)).double().mean().item()
    recall = covered(real, fake, radii(fake)).double().mean().item()
    return precision, recall


#################################################################################
#                                      CLI                                      #
#################################################################################

def main(argv=None):
    p = argparse.ArgumentParser(description="FID (pytorch-fid's Inception), Inception Score, precision/recall.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="REF [SAMPLES]: folder, .zip, .npz of images "
                   "(arr_0, uint8 NHWC) or .npz of statistics (mu, sigma)")
    p.add_argument("--save-stats", metavar="OUT.npz", help="save the statistics of the one input")
    p.add_argument("--is", dest="inception_score", action="store_true", help="Inception Score of SAMPLES (10 splits)")
    p.add_argument("--pr", action="store_true", help="precision and recall of SAMPLES against REF (k=3)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="image decoding threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception", metavar="PATH", help="pt_inception-2015-12-05-6726825d.pth (default: download)")
    args = p.parse_args(argv)
    if len(args.paths) > 2 or (len(args.paths) == 2 and args.save_stats is not None) or \
            (len(args.paths) == 1 and args.save_stats is None and not args.inception_score):
        p.error("give REF SAMPLES for the FID, or one input with --save-stats OUT.npz and/or --is")
    if args.save_stats is not None and not args.save_stats.endswith(".npz"):
        p.error(f"--save-stats {args.save_stats}: the statistics file must end in .npz")
    if args.pr and len(args.paths) != 2:
        p.error("--pr needs two inputs, REF and SAMPLES")
    torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions (torch's default on Ampere+ is TF32)
    try:
        sets = [open_set(path, args.batch_size, args.num_workers) for path in args.paths]
        # Images are needed for --pr (both inputs), --is (SAMPLES, the last input) and for missing statistics.
        wanted = [args.pr or (args.inception_score and i == len(sets) - 1) for i in range(len(sets))]
        for path, s, w in zip(args.paths, sets, wanted):
            if w and s["images"] is None:
                raise FIDError(f"{path} holds statistics only; --is and --pr need images.")
        need = [s["images"] is not None and (s["stats"] is None or w) for s, w in zip(sets, wanted)]
        model = load_inception(args.inception, args.device) if any(need) else None
        feats = [compute_features(model, s["images"], args.device, os.path.basename(os.path.normpath(path)))
                 if n else None for path, s, n in zip(args.paths, sets, need)]
        stats = [s["stats"] or statistics(f, path) for path, s, f in zip(args.paths, sets, feats)
                 if args.save_stats is not None or len(sets) == 2]  # given statistics come first, as in ADM's
        if args.save_stats is not None:
            save_statistics(args.save_stats, *stats[0])
            print(f"saved mu and sigma of {args.paths[0]} to {args.save_stats}")
        if len(stats) == 2:
            print(f"FID: {frechet_distance(*stats[0], *stats[1])}")
        if args.inception_score:
            mean, std = inception_score(model.logits(torch.from_numpy(feats[-1]).to(args.device)).cpu().numpy())
            print(f"IS: {mean} +- {std}")
        if args.pr:
            precision, recall = precision_recall(feats[0], feats[1], device=args.device)
            print(f"precision: {precision}\nrecall: {recall}")
    except FIDError as e:
        sys.exit(f"fid.py: error: {e}")


if __name__ == "__main__":
    main()
