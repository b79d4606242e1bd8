"""
Inception FID, sFID, Inception Score and improved precision/recall (plain PyTorch + scipy), and the
reference sets they are measured against.

The network (inception.py, with the measures) is the FID variant of Inception-v3 that pytorch-fid
ports from the TensorFlow graph of 2015-12-05 (mseitzer/pytorch-fid, src/pytorch_fid/inception.py,
`use_fid_inception=True`), with the same preprocessing and the same weights file, so the FID equals
pytorch-fid's. The paper's FFHQ and ImageNet tables come from ADM's TensorFlow evaluator
(guided-diffusion evaluations/evaluator.py), which runs that graph itself; "Where this port differs
from ADM's evaluator" in inception.py lists every difference.

    python fid.py REF SAMPLES                 # FID, sFID; folders, zips, .npz of images or stats
    python fid.py REF SAMPLES --is --pr       # + Inception Score and precision/recall (Table 8)
    python fid.py samples/ --save-stats s.npz # statistics once, for later comparisons
    python fid.py ~/data/ffhq/images1024x1024 --resolution 256 --save-stats ffhq256.npz
        # a reference set: every image of a dataset (nested folders, a zip, a tar), centre-cropped
        # as the training images were
"""
import argparse
import errno
import functools
import hashlib
import io
import json
import os
import shutil
import sys
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from dataset import IMAGE_EXTENSIONS as DATASET_EXTENSIONS
from checkpoints import CheckpointError, cached, file_sha256, hold
from dataset import (DataError, ImageFiles, chain, check_consumed, list_source, read_captions,
                     to_8bit)
from inception import (FID_WEIGHTS_NAME, FID_WEIGHTS_URL, FIDError, compute_features,
                       frechet_distance, inception_features, inception_score, load_inception, precision_recall)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


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
                return where, np.asarray(to_8bit(im).convert("RGB"))  # 16-bit: as the builder
        except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError: an OSError
            raise FIDError(f"{where} is not a readable image ({e}).") from None

    def batches():
        first = None
        with ThreadPoolExecutor(max(1, workers)) as pool:  # --num-workers 0: one thread
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
    try:
        with Image.open(io.BytesIO(zf.read(names[0])) if zf else os.path.join(path, names[0])) as im:
            size = im.size
    except (OSError, Image.DecompressionBombError):
        size = None  # the batches say what is wrong with it
    return len(names), batches(), size


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
    return shape[0], batches(), (shape[2], shape[1])


def _spatial_statistics(path, f):
    """(mu_s, sigma_s), the sFID statistics of ADM's reference batches and fid.py's, or None."""
    if not {"mu_s", "sigma_s"} <= set(f.files):
        return None
    mu, sigma = f["mu_s"], f["sigma_s"]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise FIDError(f"{path}: 'mu_s' {mu.shape} and 'sigma_s' {sigma.shape} are not a d vector "
                       f"and a d x d matrix.")
    check_statistics(path, mu, sigma, ("mu_s", "sigma_s"))
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
            return {"stats": None, "spatial": None, "images": images[:2], "size": images[2]}
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
        images = _npz_batches(path, batch_size) if "arr_0" in files else None
        return {"stats": stats, "spatial": spatial, "images": images[:2] if images else None,
                "size": images[2] if images else None}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise FIDError(f"{path} is not a readable .npz file ({type(e).__name__}: {e}).") from None


#################################################################################
#                           Features and statistics                             #
#################################################################################

def statistics(feats, name="the set"):
    """mu and sigma of features (pytorch-fid's calculate_activation_statistics, in float64
    throughout)."""
    if len(feats) < 2:
        raise FIDError(f"{name} has {len(feats)} image(s); statistics need at least 2.")
    feats = feats.astype(np.float64)
    if not np.isfinite(feats).all():  # a network with NaN weights, images of NaN
        raise FIDError(f"{name}: its features are not finite (NaN or inf), so are not statistics; "
                       f"is the Inception file damaged?")
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
    check_statistics(path, mu, sigma)
    return mu, sigma


def check_statistics(name, mu, sigma, what=("mu", "sigma")):
    """Refuse statistics that are not floating point (integers: rounded or not statistics at all;
    strings) or not finite (NaN: the FID would be nan, and scipy's sqrtm can hang on it)."""
    for key, a in zip(what, (mu, sigma)):
        if not np.issubdtype(a.dtype, np.floating):
            raise FIDError(f"{name}: '{key}' is {a.dtype}, not floating-point statistics.")
        if not np.isfinite(a).all():
            raise FIDError(f"{name}: '{key}' holds {np.count_nonzero(~np.isfinite(a))} values that "
                           f"are not finite (NaN or inf); statistics of images are finite.")


def save_statistics(path, mu, sigma, spatial=None):
    """
    Write mu and sigma as pytorch-fid does (np.savez; pytorch-fid reads only these two), and with
    `spatial` the sFID statistics as ADM's reference batches name them (mu_s, sigma_s), to a temp
    file renamed into place.
    """
    extra = {} if spatial is None else {"mu_s": spatial[0], "sigma_s": spatial[1]}
    _write_atomic(path, functools.partial(np.savez, mu=mu, sigma=sigma, **extra))


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
# A reference set is read from the dataset itself by the code prepare_data.py reads it with
# (dataset.py): its listing (a folder read recursively, as FFHQ's images1024x1024/00000/... and
# ImageNet's class folders; a zip; a tar; a folder of img2dataset .tar shards), its decoding and RGB
# conversion, and ADM's centre crop (center_crop_arr: halve with BOX while the short side is >= 2x
# the target, BICUBIC to the target, crop the centre), so the reference images are the images the
# models were trained on. The DMP authors' FFHQ reference batch is made the same way
# (sangminwoo/DMP, evaluation/generate_reference_batch.py, which converts with plain convert("RGB"):
# the two differ only for transparent or 16-bit images). Files are taken in sorted order, so a set
# is reproducible; the work is resumable from OUT.partial/ (rerun the same command), which holds the
# running sums and the images so far.

def text_sha256(texts):
    """The sha256 of a set's captions (None without), what a resumed build must find again."""
    return None if texts is None else hashlib.sha256(json.dumps(texts).encode()).hexdigest()


def inception_sha256(path=None):
    """The sha256 of the network's file (--inception, else the downloaded one), or its name where
    there is no file to read."""
    path = path or cached(FID_WEIGHTS_URL)
    return file_sha256(path) if os.path.isfile(path) else FID_WEIGHTS_NAME


def reserve(path):
    """
    Reserve the disk space of a file written through a memory map, so that a full disk fails here,
    as an OSError with a message, and not later as a SIGBUS while rows are written (a filesystem
    that cannot reserve space: as before).
    """
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    raise


def partial_folder(stats_path=None, batch_path=None):
    """Where an unfinished reference set keeps its state: next to its first output."""
    return Path(str(stats_path or batch_path) + ".partial")


def _write_atomic(path, write, new=True):
    """
    Call write(file) on a temp file in path's folder, then move it to path: with `new` (an output)
    only where nothing is (a hard link, which fails if path exists, even one made a moment ago by
    another process), else replacing what is there (the state of a build). The temp file never
    stays.
    """
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        try:
            with open(tmp, "wb") as f:
                write(f)
        except OSError as e:  # a full disk: numpy's and zipfile's errors name no file
            e.filename = e.filename or str(path)
            raise
        if not new:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FIDError(f"{path} already exists (it appeared while this ran); it is left as "
                               f"it is, use another name.") from None
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
    model = load_inception(inception, device) if stats_path else None  # fails before any write
    # What the set is made of, by content: the network's bytes (a file replaced under the same path
    # after a kill would mix two networks' features) and the captions; the images themselves are
    # hashed as they are read (dataset.chain), and the listing is files.txt.
    settings = dict(source=str(src.resolve()), resolution=resolution, max_images=max_images,
                    captions_sha256=text_sha256(texts), stats=bool(stats_path),
                    batch=bool(batch_path), prompts=bool(prompts_path),
                    inception_sha256=inception_sha256(inception) if stats_path else None)
    partial = partial_folder(stats_path, batch_path)
    partial.mkdir(parents=True, exist_ok=True)
    held = hold(partial, "fid.py building this reference set")  # until this call returns
    try:
        return _build(src, files, texts, outputs, stats_path, batch_path, prompts_path, model,
                      device, batch_size, workers, checkpoint_every, capacity, settings, partial)
    finally:
        os.close(held)


def _build(src, files, texts, outputs, stats_path, batch_path, prompts_path, model, device,
           batch_size, workers, checkpoint_every, capacity, settings, partial):
    """build_reference's work, in `partial` (held): resume or start it, read, write the outputs."""
    resolution = settings["resolution"]
    listing = "".join(f + "\n" for f in files)
    labels = np.zeros(len(files), np.int64)
    dataset = ImageFiles(src, files, labels, resolution, start=0, captions=texts)
    pool, spatial, done, count, skipped, running = Moments(), Moments(), 0, 0, [], ""
    if (partial / "settings.json").exists():  # resume: the sums and the batch hold rows < done
        if json.loads((partial / "settings.json").read_text()) != settings or \
                (partial / "files.txt").read_text() != listing:
            raise FIDError(f"{partial} was started by another command, on other files or with "
                           f"another network (by content); rerun that command or delete "
                           f"{partial}.")
        if (partial / "state.npz").exists():
            with np.load(partial / "state.npz") as f:
                done, count, running = int(f["done"]), int(f["count"]), str(f["source_sha256"])
                skipped = json.loads(str(f["skipped"]))
                pool.load(f, "pool_"), spatial.load(f, "spatial_")
        check_consumed(dataset, done, running, partial)
        print(f"resuming {partial}: {done} of {len(files)} files read (their bytes unchanged), "
              f"{count} images kept")
        images = np.load(partial / "batch.npy", mmap_mode="r+") if batch_path else None
    else:
        (partial / "files.txt").write_text(listing)
        shape = (capacity, resolution, resolution, 3)
        try:
            images = np.lib.format.open_memmap(partial / "batch.npy", mode="w+", dtype=np.uint8,
                                               shape=shape) if batch_path else None
            if images is not None:
                reserve(partial / "batch.npy")
        except OSError as e:  # a full disk: numpy's error names no file
            e.filename = e.filename or str(partial / "batch.npy")
            raise
        # Written last: the commit point of the initialisation.
        (partial / "settings.json").write_text(json.dumps(settings))

    def commit():
        if images is not None:
            images.flush()  # before the state that counts these rows as done
        state = dict(done=np.int64(done), count=np.int64(count), source_sha256=np.array(running),
                     skipped=np.array(json.dumps(skipped)), **pool.state("pool_"),
                     **spatial.state("spatial_"))
        _write_atomic(partial / "state.npz", lambda f: np.savez(f, **state), new=False)

    dataset.start = done
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         collate_fn=list)
    last_commit = done
    desc = f"reference {src.name} at {resolution}"
    with tqdm(total=capacity, initial=count, unit="img", desc=desc) as bar:
        for batch in loader if count < capacity else []:
            kept = [(row, img) for row, img, _, _ in batch if img is not None][:capacity - count]
            end = kept[-1][0] + 1 if count + len(kept) == capacity else batch[-1][0] + 1
            skipped += [dict(row=r, file=files[r], reason=why)
                        for r, img, why, _ in batch if img is None and r < end]
            running = chain(running, [digest for r, _, _, digest in batch if r < end])
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
        images = None
        shutil.rmtree(partial)  # every file was read: a rerun would end the same way
        raise FIDError(f"{src}: only {count} of its {len(files)} image files could be used"
                       + (f" ({why})" if why else "")
                       + (", and statistics need at least 2" if stats_path else "")
                       + "; nothing was written.")
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
    if args.batch_size < 1 or args.num_workers < 0:
        p.error(f"--batch-size must be at least 1 and --num-workers at least 0, not "
                f"{args.batch_size} and {args.num_workers}")
    torch.backends.cudnn.allow_tf32 = False  # full float32 convolutions (Ampere's default is TF32)
    # An image over PIL's pixel limit is read (one twice over it is refused, DecompressionBombError)
    # without a warning printed into the middle of the progress bar.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
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
    except (FIDError, CheckpointError, DataError) as e:
        sys.exit(f"fid.py: error: {str(e).rstrip('.')}.")
    except OSError as e:  # a full disk while --save-stats is written: no temporary file is left
        sys.exit(f"fid.py: error: {e.filename or args.save_stats}: could not be written "
                 f"({e.strerror or e}); nothing else was changed.")


def compare(args):
    """fid.py REF SAMPLES (or one set with --save-stats / --is): print the statistics' sources and
    the metrics."""
    out = args.save_stats
    if out is not None and os.path.lexists(out):  # never over anything, an input least of all
        raise FIDError(f"--save-stats {out}: the file already exists (" + (
            "it is the input itself" if os.path.abspath(out) == os.path.abspath(args.paths[0])
            else "statistics are written only where nothing is") + "); give a new name.")
    sets = [open_set(path, args.batch_size, args.num_workers) for path in args.paths]
    sizes = [s["size"] for s in sets]
    if len(sets) == 2 and None not in sizes and sizes[0] != sizes[1]:
        print(f"note: {args.paths[0]} holds {sizes[0][0]}x{sizes[0][1]} images and "
              f"{args.paths[1]} {sizes[1][0]}x{sizes[1][1]}: the Inception resizes both to 299x299, "
              f"so the FID measures the difference in resolution too")
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
    except (FIDError, CheckpointError, DataError) as e:
        sys.exit(f"fid.py: error: {str(e).rstrip('.')}.")
    except OSError as e:  # a full disk: the state committed so far is kept
        sys.exit(f"fid.py: error: {e.filename or 'writing the set'}: {e.strerror or e}; rerun the "
                 f"same command to resume from {partial_folder(args.save_stats, args.save_batch)}.")
    except KeyboardInterrupt:
        sys.exit(f"fid.py: interrupted; rerun the same command to resume from "
                 f"{partial_folder(args.save_stats, args.save_batch)}")


if __name__ == "__main__":
    main()
