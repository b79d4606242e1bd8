"""
The FID Inception and what is measured with it: pytorch-fid's port of the TensorFlow Inception-v3
graph of 2015-12-05 (mseitzer/pytorch-fid, src/pytorch_fid/inception.py, `use_fid_inception=True`)
in plain PyTorch, its weights (downloaded once, checked by the SHA-256 in their name), the pool3
and spatial features of uint8 images, and the measures on features: the Frechet distance (FID,
sFID), KID, the Inception Score and improved precision/recall.

fid.py (the command line: image sets, statistics files, reference sets) and bench.py use the
network; digits_fid.py measures its classifier's features with the same Frechet distance and KID.
"""
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from scipy.special import log_softmax, logsumexp
from tqdm import tqdm

from checkpoints import CheckpointError, check_sha256, download, load_strict, read_state_dict

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256 = "6726825d"  # torch.hub's convention: the name ends in the start of its SHA-256

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
#                                   Features                                    #
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
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():  # sqrtm of a NaN matrix can run for minutes, to give NaN
            raise FIDError(f"{name} holds values that are not finite (NaN or inf): no distance.")
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
