"""
Sample quality on the bundled digits, with nothing to download: the Fréchet distance and the KID
(inception.py's frechet_distance and kernel_distance) of the features of a small classifier
trained on the training digits only, the MNIST-FID convention (FID's Inception never saw 8x8
digits, and its weights cannot always be fetched).

    python digits_fid.py --train      # the classifier, assets/digits_classifier.pt (deterministic)
    python digits_fid.py CKPT         # FD and KID of a digits model's samples, with intervals

Every number is measured at a matched count: 297 images (the held-out set's size, training.split)
against a reference, the 1,500 training digits or the 297 held-out ones. A model's 1,485 samples are
5 sets of 297, and each metric is the mean over the 5; the floor, what real digits score, is the
held-out set against the training set, and 5 sets of 297 training digits against the held-out set.
The intervals come from a bootstrap that resamples the samples and both references with the same
draws for every model (sample k of any two models starts from the same noise), so that the
difference between two models has an interval of its own, far narrower than either's.

Where this lives: the feature net belongs to the bundled digits and their held-out split, not to
fid.py (the Inception FID of real datasets, pytorch-fid's network); train.py (the demo prints the
metric) and study.py (its tables) both need it, and scripts never import each other: so a module of
its own that both import.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import training
from checkpoints import CheckpointError, atomic_save, read_state_dict
from dataset import PreparedData
from diffusion import create_diffusion, dit_sample
from inception import frechet_distance, polynomial_kernel

ROOT = Path(__file__).resolve().parent
CLASSIFIER = ROOT / "assets" / "digits_classifier.pt"
DATA = ROOT / "assets" / "digits"
HOLDOUT = 297  # the digits kept out of training (training.split; train.py's digits presets)
CHUNKS = 5  # sample sets of the held-out size per model: 5 x 297 = 1,485 samples


#################################################################################
#                    The feature net: a small digits classifier                 #
#################################################################################

class DigitsNet(nn.Module):
    """
    Two 3x3 convolutions and a max-pool, then a 64-wide layer whose output (before its ReLU) is the
    feature vector, and the 10-way classifier on top. Input: (N, 1, 8, 8) in [-1, 1], the diffusion
    models' pixel range.
    """
    def __init__(self, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * 4 * 4, width)
        self.fc2 = nn.Linear(width, 10)

    def features(self, x):
        x = F.max_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 2)
        return self.fc1(x.flatten(1))

    def forward(self, x):
        return self.fc2(F.relu(self.features(x)))


def train_classifier(images, labels, epochs=40, batch_size=50, lr=1e-3, seed=0):
    """
    DigitsNet trained on images (N, 1, 8, 8) in [-1, 1] and their labels with Adam, every image
    shifted by up to one pixel each epoch (the gap filled with background), every draw from `seed`:
    on one thread, the same net every time.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitsNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=gen)
        shift = torch.randint(0, 3, (len(images), 2), generator=gen).tolist()
        shifted = torch.stack([padded[i, :, a:a + 8, b:b + 8] for i, (a, b) in enumerate(shift)])
        for start in range(0, len(images), batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(net(shifted[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return net.eval()


@torch.no_grad()
def accuracy(net, images, labels):
    return (net(images).argmax(1) == labels).double().mean().item()


def load_classifier(path=CLASSIFIER):
    """The committed feature net (weights only: loading runs no code)."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path} does not exist: run `python digits_fid.py --train`")
    entries = read_state_dict(path)
    net = DigitsNet()
    try:
        net.load_state_dict(entries["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a digits_fid.py classifier "
                              f"({type(e).__name__})") from None
    return net.eval()


@torch.no_grad()
def features(net, images, batch_size=1000):
    """Features (N, 64), float64, of images (N, 1, 8, 8) in [-1, 1] (clamped there, as pixels)."""
    images = torch.as_tensor(images, dtype=torch.float32).clamp(-1, 1)
    batches = [net.features(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat(batches).double().numpy()


@torch.no_grad()
def generate(model, n, steps=250, seed=0):
    """
    n samples (n, C, H, W) of an unconditional DiT by DDPM on `steps` respaced steps (the digits
    preset's cosine schedule) from noise fixed by seed: sample k of any two models starts from the
    same noise.
    """
    size, channels = model.config["input_size"], model.in_channels
    device = model.pos_embed.device
    # The starting noise from a CPU generator, then moved: the same on every device.
    z = torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)  # the noise of every step (drawn on the model's device)
    was_training = model.training
    model.eval()
    diffusion = create_diffusion(str(steps), "cosine")
    x = dit_sample(model, diffusion, z.to(device), torch.zeros(n, dtype=torch.long, device=device))
    model.train(was_training)
    return x.cpu()


#################################################################################
#                FD and KID at matched counts, bootstrap intervals              #
#################################################################################

def weighted_fd(x, w, ref_mu, ref_sigma):
    """FD of features x taken w times each (integer weights: a resample) against a reference."""
    mu = np.average(x, axis=0, weights=w)
    sigma = np.cov(x, rowvar=False, fweights=w)
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


def weighted_kid(kxx, kyy, kxy, wx, wy):
    """
    inception.kernel_distance's unbiased estimate for resampled sets, from the kernel matrices of
    the originals: the rows of x taken wx times each, of y wy times, and the pairs of two copies of
    one image left out, as the estimator leaves out an image paired with itself (counting them would
    add sum_i wx_i (wx_i - 1) k(x_i, x_i), a bias).
    """
    def within(k, w):
        return (w @ k @ w - (w * w) @ np.diag(k)) / (w.sum() ** 2 - (w * w).sum())
    return float(within(kxx, wx) + within(kyy, wy) - 2 * (wx @ kxy @ wy) / (wx.sum() * wy.sum()))


def multinomial(rng, n, size=None):
    """Bootstrap counts: how often each of n images is drawn in n draws with replacement."""
    return rng.multinomial(n, np.full(n, 1 / n), size=size).astype(np.float64)


class SampleQuality:
    """
    The references and the bootstrap's draws, made once: FD and KID of sample sets of the held-out
    size against the training digits (all of them) and the held-out digits, with `replicates`
    bootstrap resamplings drawn from `seed`, the same for every model measured with these settings.
    """
    def __init__(self, net, train_images, heldout_images, replicates=200, seed=0, chunks=CHUNKS):
        self.net, self.chunks = net, chunks
        train = features(net, train_images)
        # Every feature standardised by the training digits' mean and spread: the raw features span
        # hundreds, where KID's cubic kernel (x.y/d + 1)^3 would be ruled by the largest few.
        self.mean, self.std = train.mean(0), train.std(0)
        self.refs = dict(train=self.standardise(train),
                         heldout=self.standardise(features(net, heldout_images)))
        self.n = len(self.refs["heldout"])
        rng = np.random.default_rng(seed)
        # The floor's training sets: fixed random subsets (the stored order follows the classes).
        pick = rng.permutation(len(self.refs["train"]))[: chunks * self.n]
        self.train_sets = self.refs["train"][pick].reshape(chunks, self.n, -1)
        self.draws = [dict(sets=multinomial(rng, self.n, chunks),
                           **{name: multinomial(rng, len(f)) for name, f in self.refs.items()})
                      for _ in range(replicates)]
        self.kernels = {name: polynomial_kernel(f, f) for name, f in self.refs.items()}

    def standardise(self, f):
        return (f - self.mean) / self.std

    def measure(self, sets, refs=("train", "heldout"), resampled="sets"):
        """
        sets: (k, n, d) feature sets of the held-out size. For each reference: fd_<ref>, kid_<ref>
        (the means over the k sets) and their bootstrap replicates, <metric>_boot, the sets
        resampled by the draws' `resampled` counts.
        """
        out = {}
        for name in refs:
            ref, k_ref = self.refs[name], self.kernels[name]
            kxx = [polynomial_kernel(s, s) for s in sets]
            kxy = [polynomial_kernel(s, ref) for s in sets]
            every = dict(sets=np.ones((len(sets), len(sets[0]))), ref=np.ones(len(ref)))
            draws = [every] + [dict(sets=np.atleast_2d(d[resampled]), ref=d[name])
                               for d in self.draws]
            fd, kid = [], []
            for d in draws:  # the first: every image once, the estimate itself
                mu = np.average(ref, axis=0, weights=d["ref"])
                sigma = np.cov(ref, rowvar=False, fweights=d["ref"])
                fd.append(np.mean([weighted_fd(s, w, mu, sigma) for s, w in zip(sets, d["sets"])]))
                kid.append(np.mean([weighted_kid(a, k_ref, b, w, d["ref"])
                                    for a, b, w in zip(kxx, kxy, d["sets"])]))
            out[f"fd_{name}"], out[f"kid_{name}"] = float(fd[0]), float(kid[0])
            out[f"fd_{name}_boot"] = [float(v) for v in fd[1:]]
            out[f"kid_{name}_boot"] = [float(v) for v in kid[1:]]
        return out

    def of_samples(self, images):
        """measure() of generated images (chunks x n, 1, 8, 8), cut into `chunks` sets in order."""
        f = self.standardise(features(self.net, images))
        if len(f) != self.chunks * self.n:
            raise ValueError(f"{len(f)} samples given; the metric takes {self.chunks} x {self.n}")
        return self.measure(f.reshape(self.chunks, self.n, -1))

    def floor(self):
        """Real digits measured alike: the held-out set vs training, training sets vs held-out."""
        held = self.measure(self.refs["heldout"][None], refs=("train",), resampled="heldout")
        return dict(held, **self.measure(self.train_sets, refs=("heldout",)))


def half_width(replicates):
    """
    The half-width of the 95% interval from bootstrap replicates: 1.96 of their standard deviations.
    (Not their percentiles: a resample holds about 63% distinct images, which biases FD upwards, so
    the replicates' spread is right but their centre is not the estimate's.)
    """
    return 1.96 * float(np.std(replicates, ddof=1))


#################################################################################
#                                       CLI                                     #
#################################################################################

def digits_split():
    """The bundled digits as model inputs: ((images, labels) for training, (...) held out)."""
    data = PreparedData(str(DATA))
    train_rows, heldout_rows = training.split(data, HOLDOUT)
    return [data.batch(rows, False) for rows in (train_rows, heldout_rows)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", nargs="?", help="a digits DiT checkpoint or patch (load.load_model)")
    p.add_argument("--train", action="store_true", help="train the classifier, write --classifier")
    p.add_argument("--classifier", default=str(CLASSIFIER))
    p.add_argument("--steps", type=int, default=250, help="DDPM steps for the samples")
    p.add_argument("--replicates", type=int, default=200, help="bootstrap resamplings")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the classifier is the same net on any machine with this torch
    (train_x, train_y), (held_x, held_y) = digits_split()
    if args.train:
        if Path(args.classifier).exists():
            sys.exit(f"error: {args.classifier} exists; delete it first to train it again")
        net = train_classifier(train_x, train_y)
        acc = accuracy(net, held_x, held_y)
        atomic_save(dict(model=net.state_dict(), heldout_accuracy=acc,
                         train_accuracy=accuracy(net, train_x, train_y),
                         command="python digits_fid.py --train", torch=str(torch.__version__)),
                    args.classifier)
        print(f"{args.classifier}: held-out accuracy {acc:.4f} ({len(held_y)} digits never seen)")
        return
    if not args.ckpt:
        p.error("give a checkpoint, or --train")
    import load
    model = load.load_model(args.ckpt)
    bad = sum(int((~torch.isfinite(t)).sum()) for t in model.state_dict().values()
              if t.is_floating_point())
    if bad:  # its samples would be NaN, and their covariance has no square root (LinAlgError)
        sys.exit(f"error: {args.ckpt}: {bad} of its weights are not finite (NaN or inf); it is a "
                 f"diverged or damaged checkpoint")
    quality = SampleQuality(load_classifier(args.classifier), train_x, held_x, args.replicates)
    samples = generate(model, CHUNKS * quality.n, args.steps)
    for name, r in (("samples", quality.of_samples(samples)), ("held-out digits", quality.floor())):
        print(f"{name}: " + ", ".join(f"{k} {v:.4f} ± {half_width(r[k + '_boot']):.4f}"
                                      for k, v in r.items() if not k.endswith("_boot")))


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:
        sys.exit(f"error: {e}")
