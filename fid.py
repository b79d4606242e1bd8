"""
Inception FID, sFID, Inception Score and improved precision/recall (plain PyTorch + scipy), and the
reference sets they are measured against.

The network is the FID variant of Inception-v3 that pytorch-fid ports from the TensorFlow graph of
2015-12-05 (mseitzer/pytorch-fid, src/pytorch_fid/inception.py, `use_fid_inception=True`), with the
same preprocessing and the same weights file, so the FID equals pytorch-fid's. The paper's FFHQ and
ImageNet tables come from ADM's TensorFlow evaluator (guided-diffusion evaluations/evaluator.py),
which runs that graph itself; "Where this port differs from ADM's evaluator" below lists every
difference.

    python fid.py REF SAMPLES                 # FID, sFID; folders, zips, .npz of images or stats
    python fid.py REF SAMPLES --is --pr       # + Inception Score and precision/recall (Table 8)
    python fid.py samples/ --save-stats s.npz # statistics once, for later comparisons
    python fid.py ~/data/ffhq/images1024x1024 --resolution 256 --save-stats ffhq256.npz
        # a reference set: every image of a dataset (nested folders, a zip, a tar), centre-cropped
        # as the training images were
"""
import argparse
import io
import json
import os
import shutil
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from scipy.special import log_softmax, logsumexp
from tqdm import tqdm

from checkpoints import CheckpointError, check_sha256, download, load_strict, read_state_dict
from prepare_data import IMAGE_EXTENSIONS as DATASET_EXTENSIONS
from prepare_data import DataError, ImageFiles, list_source, read_captions

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256 = "6726825d"  # torch.hub's convention: the name ends in the start of its SHA-256
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class FIDError(Exception):
    """Bad input: the message is one sentence naming the file and what is wrong."""


#################################################################################
#                     The FID Inception-v3 (pytorch-fid port)                   #
#################################################################################
# Module and parameter names are torchvision's Inception3, the keys of
# pt_inception-2015-12-05-6726825d.pth. The FID blocks differ from torchvision's where the
# TensorFlow graph does: their average pools leave the zero padding out of the mean
# (count_include_pad=False), and the last block (Mixed_7c) max-pools instead.
#
# Where this port differs from ADM's evaluator (guided-diffusion evaluations/evaluator.py, which
# runs the TensorFlow graph classify_image_graph_def.pb itself; the paper's FFHQ and ImageNet
# numbers come from it):
# - Resize: the graph's own ResizeBilinear (a 2015 graph: align_corners and half_pixel_centers both
#   False) samples output pixel i at input position i * in / out; pytorch-fid's
#   F.interpolate(align_corners=False) samples at (i + 0.5) * in / out - 0.5. For 256 -> 299 the two
#   grids are 0.07 input pixels apart.
# - Scaling: the graph's Sub and Mul nodes map [0, 255] to (x - 128) / 128, [-1, 0.992]; pytorch-fid
#   maps it to x / 127.5 - 1, [-1, 1] (NVIDIA's TorchScript export of the same graph, used by
#   StyleGAN2-ADA's metrics, does the graph's resize and (x - 128) / 128).
# - Arithmetic: TensorFlow's kernels (TF32 by default on Ampere GPUs from TF 2.4) against full
#   float32 here (fid.py turns TF32 off); ADM takes mu of float32 features in float32, here in
#   float64.
# - Precision/recall: ADM computes the pairwise distances in float16 and falls back to float32 only
#   for a 10,000 x 10,000 block where one overflows; here they are float32 throughout (see
#   precision_recall).
# - Inception Score: ADM splits into consecutive 5,000-image parts (10 parts for 50K images, 6 for
#   30K); here 10 equal parts, the improved-GAN reference code's (the same split for 50K only).
# The weights are the graph's (pytorch-fid converted them), so only these differences remain. Their
# effect on an FID cannot be measured without the graph, which this project does not ship; for
# numbers comparable with the paper's FFHQ and ImageNet tables, run ADM's evaluator on the .npz
# batches that sample.py and `fid.py --save-batch` write.

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
    """Mixed_7b (avg pool, pytorch-fid's FIDInceptionE_1) and Mixed_7c (max pool,
    FIDInceptionE_2)."""
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
        if self.max_pool:
            pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pool = _avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Images in [0, 1] of any size -> 2048-d pool3 features; `logits` gives the 1008 classes for
    the IS."""
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
        # the TensorFlow graph's 1008 outputs (ImageNet classes and unused ones)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        return self.features(x)[0]

    def features(self, x):
        """
        (pool3 N x 2048, spatial N x 2023) of images in [0, 1]: the two feature sets of ADM's
        evaluator, its "pool_3:0" (FID, IS, precision/recall) and the first 7 channels of
        "mixed_6/conv:0" (sFID), flattened in TensorFlow's NHWC order as the evaluator's reshape
        does.
        """
        # pytorch-fid's preprocessing: bilinear resize to 299 (align_corners=False), [0, 1] -> [-1,
        # 1].
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, "Mixed_" + name)(x)
            if name == "6d":
                # The graph's blocks are mixed, mixed_1, ..., mixed_10 = Mixed_5b ... Mixed_7c,
                # so mixed_6 is Mixed_6d, and its "conv" is branch1x1 after its ReLU (the op
                # named like the layer is the ReLU, which mixed_6/join concatenates first):
                # channels 0-191 of Mixed_6d's output. 17 x 17 x 7 = 2023.
                spatial = x[:, :7].permute(0, 2, 3, 1).flatten(1)
        return F.adaptive_avg_pool2d(x, 1).flatten(1), spatial  # pool3: the 8 x 8 average pool

    def logits(self, pool3):
        # Without the bias, as the Inception Score's reference code takes them (improved-GAN's
        # inception_score/model.py: matmul of pool3 with softmax/logits/MatMul's weight; so do ADM's
        # evaluator and torch-fidelity's default `logits_unbiased`). pytorch-fid has no IS.
        return pool3 @ self.fc.weight.T


#################################################################################
#                                   Weights                                     #
#################################################################################

def load_inception(path=None, device="cpu"):
    """
    The FID Inception with pytorch-fid's weights: from path, else from the cache (downloaded once).
    A file under the official name has its SHA-256 checked against the prefix in that name; one
    under another name is taken as given (the keys and shapes are checked either way).
    """
    try:
        if path is None:
            official = os.path.basename(FID_WEIGHTS_URL) == FID_WEIGHTS_NAME
            path = str(download(FID_WEIGHTS_URL, sha256=FID_WEIGHTS_SHA256 if official else None))
        elif os.path.basename(path) == FID_WEIGHTS_NAME and os.path.isfile(path):
            check_sha256(path, FID_WEIGHTS_SHA256)
    except CheckpointError as e:
        raise FIDError(f"{e}.") from None
    if not os.path.isfile(path):
        raise FIDError(f"{path} does not exist (expected pt_inception-2015-12-05-6726825d.pth).")
    try:  # checkpoints' one strict loader: keys and shapes exactly the network's, or one sentence
        model = load_strict(FIDInceptionV3(), read_state_dict(path), path,
                            "the FID Inception (pytorch-fid's weights)")
    except CheckpointError as e:
        raise FIDError(f"{e}.") from None
    return model.eval().requires_grad_(False).to(device)


#################################################################################
#                               Reading image sets                              #
#################################################################################
# A set is a folder (its own files only, as pytorch-fid), a .zip (every image in it) or an .npz
# whose arr_0 is uint8 N x H x W x 3 (ADM's sample and reference batches). Images are converted to
# RGB and must all have the size of the first: a mismatch is refused, not resized, because the
# resize would change the FID.

def _file_batches(path, batch_size, workers):
    """(count, batch iterator) for a folder or zip of image files, decoded by a thread pool one
    batch ahead."""
    zf = zipfile.ZipFile(path) if os.path.isfile(path) else None
    names = sorted(n for n in (zf.namelist() if zf else os.listdir(path))
                   if n.lower().endswith(IMAGE_EXTENSIONS)
                   and (zf or os.path.isfile(os.path.join(path, n))))
    if not names:
        nested = not zf and any(e.is_dir() for e in os.scandir(path))
        raise FIDError(f"{path} contains no images ({', '.join(IMAGE_EXTENSIONS)})" + (
            " at its top level: a dataset in subfolders (FFHQ's images1024x1024, ImageNet's "
            "train) is a reference set, read with --resolution N" if nested else "") + ".")

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
                        raise FIDError(f"{where} is {im.shape[1]}x{im.shape[0]} but {first[0]} is "
                                       f"{first[1][1]}x{first[1][0]}: all images of a set must "
                                       f"have the same size.")
                yield np.stack([im for _, im in loaded])
    return len(names), batches()


def _open_arr_0(path):
    """arr_0.npy inside the .npz as a stream positioned at the data, with its shape, order and
    dtype."""
    f = zipfile.ZipFile(path).open("arr_0.npy")
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        header = np.lib.format.read_array_header_1_0
    else:
        header = np.lib.format.read_array_header_2_0
    return (f, *header(f))


def _npz_batches(path, batch_size):
    """(count, batch iterator) for arr_0 of an .npz, streamed from the zip so 50K images need not
    fit in memory."""
    f, shape, fortran, dtype = _open_arr_0(path)
    f.close()
    if dtype.hasobject:
        raise FIDError(f"{path}: arr_0 holds Python objects, not one uint8 array (images of "
                       f"different sizes?); all images of a set must have the same size.")
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
        raise FIDError(f"{path}: arr_0 is {dtype} of shape {shape}, not uint8 N x H x W x 3 "
                       f"(ADM's layout).")
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


def _spatial_statistics(path, f):
    """(mu_s, sigma_s), the sFID statistics of ADM's reference batches and fid.py's, or None."""
    if not {"mu_s", "sigma_s"} <= set(f.files):
        return None
    mu, sigma = f["mu_s"], f["sigma_s"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise FIDError(f"{path}: 'mu_s' {mu.shape} and 'sigma_s' {sigma.shape} are not a d vector "
                       f"and a d x d matrix.")
    return mu, sigma


def open_set(path, batch_size=50, workers=8):
    """
    An input: {'stats': (mu, sigma) or None, 'spatial': (mu_s, sigma_s) or None,
    'images': (count, uint8 NHWC batch iterator) or None}.
    """
    if not os.path.exists(path):
        raise FIDError(f"{path} does not exist.")
    if os.path.isdir(path) or path.lower().endswith(".zip"):
        try:
            images = _file_batches(path, batch_size, workers)
            return {"stats": None, "spatial": None, "images": images}
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
            spatial = _spatial_statistics(path, f) if stats is not None else None
        if stats is None and "arr_0" not in files:
            raise FIDError(f"{path} has neither statistics ('mu', 'sigma') nor images ('arr_0').")
        return {"stats": stats, "spatial": spatial,
                "images": _npz_batches(path, batch_size) if "arr_0" in files else None}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise FIDError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}).") from None


#################################################################################
#                           Features and statistics                             #
#################################################################################

@torch.inference_mode()
def inception_features(model, batch, device="cpu"):
    """(pool3, spatial) float32 features of a uint8 N x H x W x 3 batch, in [0, 1] as ToTensor()."""
    x = torch.from_numpy(np.ascontiguousarray(batch)).to(device).permute(0, 3, 1, 2).float() / 255
    pool, spatial = model.features(x)
    return pool.cpu().numpy(), spatial.cpu().numpy()


def compute_features(model, images, device="cpu", desc="inception", spatial=False):
    """
    pool3 features (N x 2048, float32) of (count, uint8 NHWC batches), as pytorch-fid's
    get_activations; with `spatial`, (pool3, spatial N x 2023) as ADM's compute_activations.
    """
    count, batches = images
    feats, i = None, 0
    with tqdm(total=count, unit="img", desc=desc) as bar:
        for batch in batches:
            got = inception_features(model, batch, device)
            if feats is None:
                feats = [np.empty((count, f.shape[1]), np.float32) for f in got]
            for f, g in zip(feats, got):
                f[i:i + len(batch)] = g
            i += len(batch)
            bar.update(len(batch))
    return tuple(feats) if spatial else feats[0]


def statistics(feats, name="the set"):
    """mu and sigma of features (pytorch-fid's calculate_activation_statistics, in float64
    throughout)."""
    if len(feats) < 2:
        raise FIDError(f"{name} has {len(feats)} image(s); statistics need at least 2.")
    feats = feats.astype(np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def load_statistics(path, f=None):
    """(mu, sigma) from a pytorch-fid stats file or an ADM reference batch."""
    f = np.load(path) if f is None else f
    for key in ("mu", "sigma"):
        if key not in f.files:
            raise FIDError(f"{path} has no '{key}' array: a statistics file needs 'mu' and "
                           f"'sigma'.")
    mu, sigma = f["mu"], f["sigma"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise FIDError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not a d vector and "
                       f"a d x d matrix.")
    return mu, sigma


def save_statistics(path, mu, sigma, spatial=None):
    """
    Write mu and sigma as pytorch-fid does (np.savez; pytorch-fid reads only these two), and with
    `spatial` the sFID statistics as ADM's reference batches name them (mu_s, sigma_s), to a temp
    file renamed into place.
    """
    extra = {} if spatial is None else {"mu_s": spatial[0], "sigma_s": spatial[1]}
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, **extra)
    os.replace(tmp, path)


class Moments:
    """
    Mean and covariance of features that arrive in batches, for sets too large to hold (ImageNet's
    1.28M x 2048 float64 is 21 GB): float64 sums of x - shift and of its outer products, the shift
    being the first batch's mean so the sums do not cancel. Gives np.mean and np.cov(rowvar=False)
    up to rounding.
    """
    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, feats):
        x = np.asarray(feats, np.float64)
        if self.shift is None:
            dim = x.shape[1]
            self.shift, self.s1, self.s2 = x.mean(0), np.zeros(dim), np.zeros((dim, dim))
        x = x - self.shift
        self.n += len(x)
        self.s1 += x.sum(0)
        self.s2 += x.T @ x

    def result(self):
        """(mu, sigma) of everything seen."""
        mean = self.s1 / self.n
        return self.shift + mean, (self.s2 - self.n * np.outer(mean, mean)) / (self.n - 1)

    def state(self, prefix):
        """The sums as arrays for np.savez (resuming)."""
        if self.n == 0:
            return {prefix + "n": np.int64(0)}
        return {prefix + "n": np.int64(self.n), prefix + "shift": self.shift,
                prefix + "s1": self.s1, prefix + "s2": self.s2}

    def load(self, f, prefix):
        """Continue from state(prefix) read back from an .npz."""
        self.n = int(f[prefix + "n"])
        if self.n:
            self.shift, self.s1, self.s2 = f[prefix + "shift"], f[prefix + "s1"], f[prefix + "s2"]
        return self


#################################################################################
#                Reference sets: the dataset as the models saw it               #
#################################################################################
# A reference set is read from the dataset itself with prepare_data.py's own code: its listing (a
# folder read recursively, as FFHQ's images1024x1024/00000/... and ImageNet's class folders; a zip;
# a tar; a folder of img2dataset .tar shards), its decoding and RGB conversion, and ADM's centre
# crop (center_crop_arr: halve with BOX while the short side is >= 2x the target, BICUBIC to the
# target, crop the centre), so the reference images are the images the models were trained on.
# The DMP authors' FFHQ reference batch is made the same way (sangminwoo/DMP,
# evaluation/generate_reference_batch.py, which converts with plain convert("RGB"): the two differ
# only for transparent or 16-bit images). Files are taken in sorted order, so a set is reproducible;
# the work is resumable from OUT.partial/ (rerun the same command), which holds the running sums
# and the images so far.

def partial_folder(stats_path=None, batch_path=None):
    """Where an unfinished reference set keeps its state: next to its first output."""
    return Path(str(stats_path or batch_path) + ".partial")


def _write_atomic(path, write):
    """Call write(file) on a temp file in path's folder, then rename it to path."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_batch(path, images, count):
    """images[:count] as an ADM batch (an .npz of arr_0, uint8 N x H x W x 3), streamed, atomic."""
    header = dict(descr="|u1", fortran_order=False, shape=(count, *images.shape[1:]))

    def write(f):
        with zipfile.ZipFile(f, "w", allowZip64=True) as zf, \
                zf.open("arr_0.npy", "w", force_zip64=True) as a:
            np.lib.format.write_array_header_1_0(a, header)
            for i in range(0, count, 256):
                a.write(np.ascontiguousarray(images[i:min(i + 256, count)]).tobytes())
    _write_atomic(path, write)


def build_reference(src, resolution, stats_path=None, batch_path=None, prompts_path=None,
                    captions=None, max_images=None, inception=None, device="cpu", batch_size=50,
                    workers=0, checkpoint_every=10000):
    """
    Every usable image of the dataset `src` (the first max_images in sorted order), centre-cropped
    to `resolution`, written as statistics (stats_path: mu, sigma as pytorch-fid's; mu_s, sigma_s
    for the sFID), as an ADM batch (batch_path) and/or, with `captions`, as the prompt file of the
    same images (prompts_path). Resumable: the state is committed every `checkpoint_every` files
    read. Returns the number of images in the set.
    """
    outputs = [x for x in (stats_path, batch_path, prompts_path) if x]
    for out in outputs:
        if os.path.exists(out):
            raise FIDError(f"{out} already exists; delete it to build it again.")
    src = Path(src).expanduser()
    if not src.exists():
        raise FIDError(f"{src} does not exist.")
    try:
        files, texts = list_source(src, "none")[0], None
        if captions:  # images only; prompts are lines: whitespace collapsed, blank captions dropped
            files, texts = read_captions(src, files, captions)
            texts = [[" ".join(c.split()) for c in t if c.split()] for t in texts]
        else:
            files = [f for f in files if f.lower().endswith(DATASET_EXTENSIONS)]
    except DataError as e:
        raise FIDError(f"{e}.") from None
    if not files:
        raise FIDError(f"{src} holds no image files ({', '.join(DATASET_EXTENSIONS)}).")
    capacity = min(len(files), max_images or len(files))
    weights = os.path.abspath(inception) if inception else FID_WEIGHTS_NAME
    settings = dict(source=str(src.resolve()), resolution=resolution, max_images=max_images,
                    captions=str(captions) if captions else None, stats=bool(stats_path),
                    batch=bool(batch_path), prompts=bool(prompts_path),
                    inception=weights if stats_path else None)
    listing = "".join(f + "\n" for f in files)

    model = load_inception(inception, device) if stats_path else None  # fails before any write
    partial = partial_folder(stats_path, batch_path)
    pool, spatial, done, count, skipped = Moments(), Moments(), 0, 0, []
    if (partial / "settings.json").exists():  # resume: the sums and the batch hold rows < done
        if json.loads((partial / "settings.json").read_text()) != settings or \
                (partial / "files.txt").read_text() != listing:
            raise FIDError(f"{partial} was started by another command or on other files; rerun "
                           f"that command or delete {partial}.")
        if (partial / "state.npz").exists():
            with np.load(partial / "state.npz") as f:
                done, count = int(f["done"]), int(f["count"])
                skipped = json.loads(str(f["skipped"]))
                pool.load(f, "pool_"), spatial.load(f, "spatial_")
        print(f"resuming {partial}: {done} of {len(files)} files read, {count} images kept")
        images = np.load(partial / "batch.npy", mmap_mode="r+") if batch_path else None
    else:
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "files.txt").write_text(listing)
        shape = (capacity, resolution, resolution, 3)
        images = np.lib.format.open_memmap(partial / "batch.npy", mode="w+", dtype=np.uint8,
                                           shape=shape) if batch_path else None
        # Written last: the commit point of the initialisation.
        (partial / "settings.json").write_text(json.dumps(settings))

    def commit():
        if images is not None:
            images.flush()  # before the state that counts these rows as done
        state = dict(done=np.int64(done), count=np.int64(count),
                     skipped=np.array(json.dumps(skipped)), **pool.state("pool_"),
                     **spatial.state("spatial_"))
        _write_atomic(partial / "state.npz", lambda f: np.savez(f, **state))

    labels = np.zeros(len(files), np.int64)
    dataset = ImageFiles(src, files, labels, resolution, start=done, captions=texts)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=list)
    last_commit = done
    desc = f"reference {src.name} at {resolution}"
    with tqdm(total=capacity, initial=count, unit="img", desc=desc) as bar:
        for batch in loader if count < capacity else []:
            kept = [(row, img) for row, img, _ in batch if img is not None][:capacity - count]
            end = kept[-1][0] + 1 if count + len(kept) == capacity else batch[-1][0] + 1
            skipped += [dict(row=r, file=files[r], reason=why)
                        for r, img, why in batch if img is None and r < end]
            if kept:
                pixels = np.stack([img for _, img in kept])
                if model is not None:
                    feats = inception_features(model, pixels, device)
                    pool.update(feats[0])
                    spatial.update(feats[1])
                if images is not None:
                    images[count:count + len(kept)] = pixels
            count, done = count + len(kept), end
            bar.update(len(kept))
            if count == capacity:
                break
            if done - last_commit >= checkpoint_every:
                commit()
                last_commit = done
    commit()

    if count < (2 if stats_path else 1):
        why = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
        raise FIDError(f"{src}: only {count} of its {len(files)} image files could be used"
                       + (f" ({why})" if why else "")
                       + (", and statistics need at least 2" if stats_path else "") + ".")
    for out in outputs:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if stats_path:
        save_statistics(stats_path, *pool.result(), spatial=spatial.result())
    if batch_path:
        write_batch(batch_path, images, count)
    if prompts_path:
        gone = {s["row"] for s in skipped}
        rows = [r for r in range(done) if r not in gone][:count]
        # One line per image, its first caption: sample.py's image k takes line k.
        lines = "".join(texts[r][0] + "\n" for r in rows)
        _write_atomic(prompts_path, lambda f: f.write(lines.encode()))
    images = None  # closes the memmap before its folder goes
    shutil.rmtree(partial)
    reasons = "".join(f"; {s['file']}: {s['reason']}" for s in skipped[:5])
    print(f"{src}: {count} images at {resolution}x{resolution} ({len(skipped)} files skipped"
          f"{reasons}) -> {', '.join(outputs)}")
    return count


#################################################################################
#                                   Metrics                                     #
#################################################################################

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)): pytorch-fid's
    calculate_frechet_distance."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise FIDError(f"the two statistics have different dimensions ({mu1.shape[0]} and "
                       f"{mu2.shape[0]}).")
    diff = mu1 - mu2
    # The product might be almost singular. (pytorch-fid passes disp=False, deprecated in scipy
    # 1.16.)
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        print(f"fid calculation produces singular product; adding {eps} to diagonal of cov "
              f"estimates", file=sys.stderr)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # Numerical error might give a slight imaginary component.
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            imag = np.max(np.abs(covmean.imag))
            raise FIDError(f"sqrtm(sigma1 sigma2) has an imaginary component of {imag:.3g}: the "
                           f"statistics are degenerate.")
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
    """
    exp(E_x KL(p(y|x) || p(y))) on consecutive splits, mean and std: improved-GAN's (Salimans et
    al. 2016) inception_score/model.py, which ADM's evaluator (5000-image splits = 10 for 50K) and
    torch-fidelity follow.
    """
    if len(logits) < splits:
        raise FIDError(f"the Inception Score with {splits} splits needs at least {splits} images, "
                       f"got {len(logits)}.")
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
    """
    Improved precision and recall (Kynkäänniemi et al. 2019, k=3, as ADM's evaluator): the
    fraction of fake features inside some real feature's k-NN ball, and vice versa. Distances
    are computed batch_size rows at a time, so 50K x 50K never sits in memory. As ADM's
    ManifoldEstimator (nhood_sizes=(3,), clamp_to_percentile=None): squared Euclidean distances,
    the radius of a point the distance to its 3rd neighbour other than itself, a point covered
    if within or on some ball. It differs in the arithmetic only: ADM computes the distances in
    float16 (falling back to float32 for a 10,000 x 10,000 block where one is not finite), so
    its decisions for points near a ball's edge can differ; its batch sizes (10,000 rows and
    columns) decide nothing else, nor does batch_size here.
    """
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
    p = argparse.ArgumentParser(description="FID and sFID (pytorch-fid's Inception), Inception "
                                "Score, precision/recall; reference sets from a dataset.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="REF [SAMPLES]: folder, .zip, .npz "
                   "of images (arr_0, uint8 NHWC) or .npz of statistics (mu, sigma); with "
                   "--resolution, one dataset: a folder (read recursively), a zip, a tar, or a "
                   "folder of .tar shards")
    p.add_argument("--save-stats", metavar="OUT.npz", help="save the statistics of the one input "
                   "(mu, sigma, and mu_s, sigma_s for the sFID)")
    p.add_argument("--is", dest="inception_score", action="store_true",
                   help="Inception Score of SAMPLES (10 splits)")
    p.add_argument("--pr", action="store_true",
                   help="precision and recall of SAMPLES against REF (k=3)")
    p.add_argument("--npz-stats", choices=["images", "file"], default="images",
                   help="for an .npz holding images and statistics (ADM's reference batches): "
                   "recompute the statistics from its images with this network (default), or use "
                   "the file's (ADM made its with its TensorFlow Inception)")
    g = p.add_argument_group("reference sets (one dataset in; statistics, images, prompts out)")
    g.add_argument("--resolution", type=int, help="centre-crop each image to this side as ADM, "
                   "DiT and prepare_data.py do (center_crop_arr), and write the outputs below")
    g.add_argument("--save-batch", metavar="OUT.npz", help="the images as an ADM batch (arr_0, "
                   "uint8 N x H x W x 3), what ADM's evaluator and fid.py read")
    g.add_argument("--max-images", type=int,
                   help="the first N usable images in sorted path order (default: all)")
    g.add_argument("--captions", help="'txt' (the .txt beside each image, as in img2dataset "
                   "shards) or a COCO captions JSON: images without one are left out")
    g.add_argument("--save-prompts", metavar="OUT.txt", help="with --captions: each image's first "
                   "caption, one a line in the set's order (sample.py's --prompt-file)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="image decoding threads (with --resolution: processes)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception", metavar="PATH",
                   help="pt_inception-2015-12-05-6726825d.pth (default: download)")
    args = p.parse_args(argv)
    for flag in ("save_stats", "save_batch"):
        out = getattr(args, flag)
        if out is not None and not out.endswith(".npz"):
            p.error(f"--{flag.replace('_', '-')} {out}: the file must end in .npz")
    torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions (Ampere's default is TF32)
    if args.resolution is not None:
        return build_main(p, args)
    if any(x is not None for x in (args.save_batch, args.max_images, args.captions,
                                   args.save_prompts)):
        p.error("--save-batch, --max-images, --captions and --save-prompts build a reference set: "
                "add --resolution N")
    if len(args.paths) > 2 or (len(args.paths) == 2 and args.save_stats is not None) or \
            (len(args.paths) == 1 and args.save_stats is None and not args.inception_score):
        p.error("give REF SAMPLES for the FID, or one input with --save-stats OUT.npz and/or --is")
    if args.pr and len(args.paths) != 2:
        p.error("--pr needs two inputs, REF and SAMPLES")
    try:
        compare(args)
    except FIDError as e:
        sys.exit(f"fid.py: error: {e}")


def compare(args):
    """fid.py REF SAMPLES (or one set with --save-stats / --is): print the statistics' sources and
    the metrics."""
    sets = [open_set(path, args.batch_size, args.num_workers) for path in args.paths]
    # Images are needed for --pr (both inputs), --is (SAMPLES, the last input) and for statistics
    # not taken from the file: an .npz with images and statistics (an ADM reference batch) is
    # measured again with this network unless --npz-stats file.
    last = len(sets) - 1
    wanted = [args.pr or (args.inception_score and i == last) for i in range(len(sets))]
    for path, s, w in zip(args.paths, sets, wanted):
        if w and s["images"] is None:
            raise FIDError(f"{path} holds statistics only; --is and --pr need images.")
    given = [s["stats"] is not None and (s["images"] is None or args.npz_stats == "file")
             for s in sets]
    need = [s["images"] is not None and (not g or w) for s, g, w in zip(sets, given, wanted)]
    model = load_inception(args.inception, args.device) if any(need) else None
    names = [os.path.basename(os.path.normpath(path)) for path in args.paths]
    feats = [compute_features(model, s["images"], args.device, name, spatial=True) if n else None
             for name, s, n in zip(names, sets, need)]
    stats, spatial = [], []
    if args.save_stats is not None or len(sets) == 2:
        for path, s, g, f in zip(args.paths, sets, given, feats):
            stats.append(s["stats"] if g else statistics(f[0], path))
            spatial.append(s["spatial"] if g else statistics(f[1], path))
            print(describe_statistics(path, s, g))
        if len(sets) == 2 and given[0] != given[1]:
            print("note: one set's statistics come from its file, the other's from this network: "
                  "if the file was made by another network (ADM's TensorFlow Inception), the FID "
                  "mixes the two")
    if args.save_stats is not None:
        save_statistics(args.save_stats, *stats[0], spatial=spatial[0])
        print(f"saved the statistics of {args.paths[0]} to {args.save_stats}")
    if len(stats) == 2:
        print(f"FID: {frechet_distance(*stats[0], *stats[1])}")
        if None in spatial:
            print(f"sFID: not computed ({args.paths[spatial.index(None)]} has no mu_s, sigma_s)")
        else:  # ADM's sFID: the same distance on the mixed_6/conv features
            print(f"sFID: {frechet_distance(*spatial[0], *spatial[1])}")
    if args.inception_score:
        logits = model.logits(torch.from_numpy(feats[-1][0]).to(args.device)).cpu().numpy()
        mean, std = inception_score(logits)
        print(f"IS: {mean} +- {std}")
    if args.pr:
        precision, recall = precision_recall(feats[0][0], feats[1][0], device=args.device)
        print(f"precision: {precision}\nrecall: {recall}")


def describe_statistics(path, s, given):
    """One line saying where a set's statistics came from, so a table says which FID it holds."""
    if given:
        return f"{path}: statistics from the file" + (
            " (its images not used for them: --npz-stats file)" if s["images"] is not None else "")
    return f"{path}: statistics of its {s['images'][0]} images with this network" + (
        "; the file's own statistics are not used, as they may come from another network (ADM's "
        "reference batches: its TensorFlow Inception, over the whole dataset); --npz-stats file "
        "uses them" if s["stats"] is not None else "")


def build_main(p, args):
    """fid.py DATASET --resolution N ...: check the flags, build the set; one sentence on error."""
    if len(args.paths) != 1:
        p.error("--resolution builds a reference set from one dataset: give one PATH")
    if args.save_stats is None and args.save_batch is None:
        p.error("--resolution needs --save-stats OUT.npz and/or --save-batch OUT.npz")
    if args.inception_score or args.pr:
        p.error("--is and --pr compare two sets: build the reference set first, then compare")
    if args.resolution < 1 or (args.max_images is not None and args.max_images < 1):
        p.error("--resolution and --max-images must be positive")
    if (args.captions is None) != (args.save_prompts is None):
        p.error("--captions and --save-prompts go together")
    outputs = [x for x in (args.save_stats, args.save_batch, args.save_prompts) if x]
    if len({os.path.abspath(x) for x in outputs}) != len(outputs):
        p.error("--save-stats, --save-batch and --save-prompts must be different files")
    try:
        build_reference(args.paths[0], args.resolution, args.save_stats, args.save_batch,
                        args.save_prompts, args.captions, args.max_images, args.inception,
                        args.device, args.batch_size, args.num_workers)
    except FIDError as e:
        sys.exit(f"fid.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"fid.py: interrupted; rerun the same command to resume from "
                 f"{partial_folder(args.save_stats, args.save_batch)}")


if __name__ == "__main__":
    main()
