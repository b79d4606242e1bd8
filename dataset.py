"""
The data: source images and the prepared folders train.py reads.

    source images   a folder, a zip, a .tar or a folder of .tar shards (webdataset, as img2dataset
                    writes them), listed (list_source), read and centre-cropped as ADM/DiT do
                    (ImageFiles), with their captions (read_captions)
    prepared data   what prepare_data.py stores of each image (encode: the pixels, or the VAE
                    posterior of the image and its mirror) and what train.py draws from it
                    (PreparedData: a fresh latent every step, as DiT's train.py)

prepare_data.py writes prepared folders from sources, fid.py reads sources for its reference sets,
train.py, study.py and bench.py read prepared folders. The layout of a prepared folder is in
prepare_data.py's docstring.
"""
import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from model_vae import SCALE_FACTOR

FORMAT = "dmp-prepared-data"
VERSION = 1


class DataError(ValueError):
    """Input or output that cannot be used; the message is one sentence naming the path and the
    problem."""


#################################################################################
#                   Images: RGB conversion and the ADM centre crop              #
#################################################################################

def to_rgb(img):
    """
    Any PIL image as 8-bit RGB. Differences from DiT's plain img.convert('RGB'), each for a reason:
    16-bit grayscale (I;16*, I) is scaled to 8 bits (PIL's convert clips everything above 255 to
    white), and transparency (RGBA, LA, PA, P or RGB with a transparent colour) is composited on
    white instead of dropped (dropping it shows whatever colour the transparent pixels happen to
    hold). CMYK, L, P and the rest go through PIL's convert, ICC profiles ignored as in DiT. EXIF
    orientation is not applied, as in DiT/ADM.
    """
    img = to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


def to_8bit(img):
    """16-bit grayscale (I;16*, I: assumed 16-bit) scaled to 8 bits, round(v 255 / 65535), where
    PIL's convert clips everything above 255 to white; any other image as it is. fid.py's two modes
    (comparing sets, building a reference) both convert through it, so a 16-bit PNG is one image."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8))
    return img


def center_crop_arr(pil_image, image_size):
    """ADM's centre crop, as in DiT's train.py: BOX-halve while large, BICUBIC to size, crop.
    Returns uint8 HWC."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    size = tuple(round(x * scale) for x in pil_image.size)
    pil_image = pil_image.resize(size, resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size]


def to_model_input(x):
    """uint8 [B, C, H, W] -> float32 in [-1, 1], exactly as DiT's ToTensor() then Normalize(0.5,
    0.5)."""
    return (x.float() / 255 - 0.5) / 0.5


AUGMENT_DRAWS = 4  # uniform numbers per image: angle, scale, horizontal and vertical shift
AUGMENT = dict(rotate=10.0, scale=(0.85, 1.0), shift=0.5)  # --augment's ranges


def augment(x, u, rotate=AUGMENT["rotate"], scale=AUGMENT["scale"], shift=AUGMENT["shift"]):
    """
    A random affine transformation of each image of a pixel batch x [B, C, H, W] in [-1, 1]:
    rotated by up to `rotate` degrees, shrunk by a factor in `scale`, moved by up to `shift`
    pixels each way; bilinear, with the background (-1) coming in from outside the frame. The
    digits touch the top and bottom rows, so the transformation shrinks and never enlarges: no
    stroke leaves the frame. u [B, AUGMENT_DRAWS]: uniform [0, 1) draws, the caller's (a training
    step's fresh ones, the held-out images' fixed ones); u = (0.5, 1, 0.5, 0.5) is the identity.
    """
    B, _, H, W = x.shape
    u = u.to(x.device, torch.float32)
    angle = torch.deg2rad((2 * u[:, 0] - 1) * rotate)
    size = scale[0] + (scale[1] - scale[0]) * u[:, 1]
    # affine_grid maps each output pixel to where it reads the input (coordinates in [-1, 1]): the
    # inverse of the transformation, so rotated by -angle and scaled by 1 / size
    cos, sin = torch.cos(angle) / size, torch.sin(angle) / size
    dx, dy = (2 * u[:, 2] - 1) * shift * 2 / W, (2 * u[:, 3] - 1) * shift * 2 / H
    theta = torch.stack([torch.stack([cos, sin, dx], 1), torch.stack([-sin, cos, dy], 1)], 1)
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return torch.nn.functional.grid_sample(x.float() + 1, grid, mode="bilinear",
                                           padding_mode="zeros", align_corners=False) - 1


#################################################################################
#                      Sources: a folder or a zip, and labels                   #
#################################################################################

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def tar_names(path):
    try:
        with tarfile.open(path) as t:
            return [m.name for m in t.getmembers() if m.isfile()]
    except (tarfile.TarError, EOFError, OSError) as e:  # a truncated or damaged archive
        raise DataError(f"{path}: not a readable tar file, truncated or damaged ({e})") from None


def walk_files(src):
    """
    Every file under the folder `src`, relative, following links to folders (a dataset assembled
    from links) but refusing a link back to a folder already listed: os.walk(followlinks=True)
    would go round a loop until the path grew too long, listing each image again on every lap.
    """
    seen, files = set(), []
    for d, _, names in os.walk(src, followlinks=True):
        real = os.path.realpath(d)
        if real in seen:
            raise DataError(f"{d}: a link to the folder {real}, which is already read (a loop or "
                            f"a second path to the same images); remove the link")
        seen.add(real)
        files += [os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/") for f in names]
    return files


def list_source(src, labels):
    """Sorted relative paths of every file in `src` (hidden files and __MACOSX left out), their
    labels, class names."""
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as z:
            files = [n for n in z.namelist() if not n.endswith("/")]
    elif src.is_file() and tarfile.is_tarfile(src):
        files = tar_names(src)
    elif src.is_dir():
        files = walk_files(src)
        files = [m for f in files
                 for m in ([f"{f}/{n}" for n in tar_names(src / f)] if f.endswith(".tar") else [f])]
    else:
        raise DataError(f"{src}: not a folder, a zip or a tar file of images")
    files = sorted(f for f in files
                   if not any(p.startswith(".") or p == "__MACOSX" for p in f.split("/")))
    if not files:
        raise DataError(f"{src}: holds no files")
    if labels == "none":
        return files, np.zeros(len(files), dtype=np.int64), []
    # A zip whose entries all lie in one top folder with subfolders (a zipped train/): classes are
    # one level down.
    depth = int(zipfile.is_zipfile(src) and len({f.split("/")[0] for f in files}) == 1
                and any(f.count("/") >= 2 for f in files))
    folder = [f.split("/")[depth] if f.count("/") > depth else None for f in files]
    class_names = sorted({c for c in folder if c is not None})
    if not class_names:
        raise DataError(f"{src}: --labels folders needs one folder per class, and it has no "
                        f"folders")
    index = {name: i for i, name in enumerate(class_names)}
    y = [index[c] if c is not None else -1 for c in folder]  # -1: a file outside every class folder
    return files, np.array(y, dtype=np.int64), class_names


class ImageFiles(torch.utils.data.Dataset):
    """Files `start:` of the source, each as (row, centre-cropped uint8 HWC image or None, why
    not)."""
    def __init__(self, src, files, labels, resolution, start, grayscale=False, captions=None):
        self.src, self.files, self.labels = src, files, labels
        self.resolution, self.start = resolution, start
        self.grayscale, self.captions = grayscale, captions
        # What the source is, found once (list_source's order: a zip, else a tar; or a folder)
        self.kind = "folder"
        if not src.is_dir():
            self.kind = "zip" if zipfile.is_zipfile(src) else "tar"
        self.zip, self.tars = None, {}  # opened lazily, once per DataLoader worker

    def __len__(self):
        return len(self.files) - self.start

    def tar(self, path):
        if path not in self.tars:
            self.tars[path] = tarfile.open(path)
        return self.tars[path]

    def read(self, name):
        """The bytes of file `name` of the source (a shard's file: shard.tar/member)."""
        if self.kind == "folder":
            shard, tar, member = name.partition(".tar/")
            if tar:
                return self.tar(self.src / (shard + ".tar")).extractfile(member).read()
            return (self.src / name).read_bytes()
        if self.kind == "tar":
            return self.tar(self.src).extractfile(name).read()
        if self.zip is None:
            self.zip = zipfile.ZipFile(self.src)
        return self.zip.read(name)

    def close(self):
        """Close the archives opened so far (before DataLoader workers fork: they must open their
        own, as a shared file offset would mix their reads)."""
        for t in self.tars.values():
            t.close()
        if self.zip is not None:
            self.zip.close()
        self.zip, self.tars = None, {}

    def content(self, row):
        """(the bytes of file `row`, their sha256), or (None, "") for a row that is never read."""
        if (self.labels is not None and self.labels[row] < 0) or \
                (self.captions is not None and not self.captions[row]):
            return None, ""
        data = self.read(self.files[row])
        return data, hashlib.sha256(data).hexdigest()

    def __getitem__(self, i):
        """(row, its centre-cropped uint8 HWC image or None, why not, the sha256 of its bytes)."""
        row = self.start + i
        try:
            data, digest = self.content(row)
        except Exception as e:  # a member of a damaged archive, a file gone: skipped, said why
            return row, None, f"unreadable ({type(e).__name__}: {e})"[:200], ""
        if data is None:
            why = "no caption" if self.captions is not None and not self.captions[row] else \
                "not inside a class folder"
            return row, None, why, ""
        return (row, *self.decode(data), digest)

    def decode(self, data):
        """(pixels, "") or (None, why not)."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.load()  # decodes the whole file: truncated data fails here
                img = to_rgb(img)
                if self.grayscale:
                    img = img.convert("L")  # ITU-R 601 luma
                pixels = center_crop_arr(img, self.resolution)
                return pixels.reshape(self.resolution, self.resolution, -1), ""
        except UnidentifiedImageError:
            return None, "not an image file PIL can read"
        except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, ...)
            reason = f"{type(e).__name__}: {str(e).strip()}".splitlines() or [""]
            return None, reason[0][:200]


def chain(running, digests):
    """
    The running hash of a source's files in row order: sha256(running + digest) for each file's
    digest in turn ("" to start). What a resumable job records with its progress, so a rerun after
    a kill can tell that the files it already consumed still hold the same bytes (not only the same
    names).
    """
    for digest in digests:
        running = hashlib.sha256((running + digest).encode()).hexdigest()
    return running


def check_consumed(reader, done, recorded, partial):
    """
    Resuming: rehash the first `done` files of `reader` (an ImageFiles) and compare their chain
    with the one `recorded` when they were consumed. The cost is reading those files once more
    (sha256 runs at ~1 GB/s, far faster than decoding them). Raises DataError naming the first
    change.
    """
    try:
        same = chain("", (reader.content(r)[1] for r in range(done))) == recorded
    finally:
        reader.close()
    if same:
        return
    raise DataError(f"the source's files changed since {partial} was started (the {done} files "
                    f"already read no longer hold the same bytes): delete {partial} to start again "
                    f"from the files as they are now")


def read_captions(src, files, captions):
    """
    The images among `files` and each one's list of captions: 'txt', the text file of the same name
    beside it (a folder, zip or webdataset shard); or a COCO captions JSON
    (captions_train2014.json), matched by file name.
    """
    images = [f for f in files if f.lower().endswith(IMAGE_EXTENSIONS)]
    if captions == "txt":
        texts = {f for f in files if f.endswith(".txt")}
        reader = ImageFiles(src, files, None, 0, 0)
        found = []
        for f in tqdm(images, desc="reading captions", unit="img", leave=False):
            name = os.path.splitext(f)[0] + ".txt"
            text = ""
            if name in texts:
                text = reader.read(name).decode("utf-8", errors="replace").strip()
            found.append([text] if text else [])
        return images, found
    try:
        coco = json.loads(Path(captions).expanduser().read_text())
        names = {im["id"]: im["file_name"] for im in coco["images"]}
        by_name = {}
        for a in coco["annotations"]:
            if a["image_id"] not in names:
                raise DataError(f"{captions}: annotation {a.get('id')} is of image_id "
                                f"{a['image_id']!r}, which is not among its images")
            if not isinstance(a["caption"], str):
                raise DataError(f"{captions}: annotation {a.get('id')} has the caption "
                                f"{a['caption']!r}, not a string")
            by_name.setdefault(names[a["image_id"]], []).append(a["caption"].strip())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{captions}: not a COCO captions file (a JSON with images and "
                        f"annotations; {type(e).__name__}), nor 'txt'") from None
    return images, [by_name.get(f.rsplit("/", 1)[-1], []) for f in images]


#################################################################################
#          Prepared data: what prepare_data.py stores, what train.py reads       #
#################################################################################

@torch.no_grad()
def encode(model, pixels, device):
    """uint8 [B, C, H, W] -> what is stored: the pixels themselves, or [B, 2, 2, z, h, w] float16
    posteriors."""
    if model is None:
        return pixels.numpy()
    x = to_model_input(pixels.to(device))
    mean, std = model.encode(torch.cat([x, x.flip(3)]))  # image and mirror in one batch
    moments = torch.stack([mean, std], dim=1)  # [2B, 2, z, h, w]
    return torch.stack(moments.chunk(2), dim=1).half().cpu().numpy()  # [B, mirror, moment, z, h, w]



class PreparedData:
    """
    A prepared folder, memory-mapped. batch(indices, flip, generator) -> (x, y): x float32 [B,
    *shape], for latents a fresh sample (mean + std * randn) * scale_factor of the image or its
    mirror, for pixels the image in [-1, 1]; y int64 [B]. Indices run over the usable images
    (skipped rows left out), 0 .. len - 1.
    """
    def __init__(self, path):
        path = Path(path).expanduser()
        try:
            m = json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError):
            raise DataError(f"{path}: no readable manifest.json; run prepare_data.py first (an "
                            f"unfinished run leaves {path.name}.partial, resumed by rerunning "
                            f"it)") from None
        if m.get("format") != FORMAT or m.get("version", 0) > VERSION:
            raise DataError(f"{path}: not prepared data this code reads (format {m.get('format')}, "
                            f"version {m.get('version')})")
        self.path, self.manifest, self.kind, self.vae = path, m, m["kind"], m["vae"]
        self.scale_factor, self.num_classes = m["scale_factor"], m["num_classes"]
        self.class_names, self.shape = m["class_names"], tuple(m["shape"])
        self.data = np.load(path / m["array"], mmap_mode="r")
        self.rows = np.setdiff1d(np.arange(m["stored_shape"][0]), [s["row"] for s in m["skipped"]])
        if not len(self.rows):
            raise DataError(f"{path}: holds no usable image (every file was skipped; manifest.json "
                            f"says why)")
        self.labels = np.load(path / "labels.npy")[self.rows]
        # Text-to-image data: each usable image's list of captions (train.py draws one per step).
        self.captions = None
        if m.get("captions"):
            every = json.loads((path / m["captions"]).read_text())
            self.captions = [every[r] for r in self.rows]

    def __len__(self):
        return len(self.rows)

    def fingerprint(self, rows=1024):
        """
        A sha256 of what the folder holds, which a training run records and a resumed one checks
        (the same path may hold other data by then): manifest.json (the source, settings, counts,
        skipped files), labels, captions, and the bytes of `rows` rows spread evenly over the array
        (all of them for a smaller set). Cheap for any size: ImageNet's latents are 32 KiB a row,
        so 32 MiB are read, not its 42 GB.
        """
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256()
            for name in ("manifest.json", "labels.npy", self.manifest.get("captions")):
                if name:
                    h.update(name.encode() + b"\0" + (self.path / name).read_bytes())
            total = len(self.data)
            for r in np.unique(np.linspace(0, total - 1, min(rows, total)).round().astype(np.int64)):
                h.update(np.ascontiguousarray(self.data[r]).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def batch(self, indices, flip, generator=None, device="cpu", noise=None):
        """
        `flip`: one bool per index (or one for all): take the mirror. The latents' noise is `noise`
        when given, else drawn from `generator` on its own device (a CUDA generator avoids the CPU
        work); float16 -> float32 and the sum happen on `device`. (gather, then to_device.)
        """
        return self.to_device(self.gather(indices, flip), device, generator, noise)

    def gather(self, indices, flip, pin=False):
        """
        The host's half of batch(): CPU tensors of the stored rows of `indices` (their mirrors where
        `flip`), their labels and (pixels) the flips; pin: in page-locked memory, which a GPU
        copies from while the host goes on (CUDA only: a CPU-only torch has no pinned memory).
        """
        indices = np.asarray(indices, dtype=np.int64)
        rows, y = self.rows[indices], torch.from_numpy(self.labels[indices])
        flip = np.broadcast_to(np.asarray(flip, dtype=bool), rows.shape)
        if self.kind == "pixels":
            host = torch.from_numpy(self.data[rows]), y, torch.from_numpy(flip.copy())
        else:
            host = torch.from_numpy(self.data[rows, flip.astype(np.int64)]), y, None  # [B, 2, z, h, w]
        if pin:
            host = tuple(t if t is None else t.pin_memory() for t in host)
        return host

    def to_device(self, host, device, generator=None, noise=None):
        """
        The device's half of batch(): gather's tensors copied without waiting (non_blocking: from
        pinned memory the copy is queued; on the CPU nothing is copied), then (x, y) as batch().
        """
        x, y, mirrored = (t if t is None else t.to(device, non_blocking=True) for t in host)
        if self.kind == "pixels":
            x = torch.where(mirrored[:, None, None, None], x.flip(3), x)
            return to_model_input(x), y
        mean, std = x.float().unbind(1)
        if noise is None:
            noise_device = generator.device if generator is not None else device
            noise = torch.randn(mean.shape, generator=generator, device=noise_device)
        return (mean + std * noise.to(device)) * self.scale_factor, y


def synthetic_latents(folder, rows, shape, num_classes):
    """A prepared folder of random float16 posteriors, read by PreparedData as real ones (bench.py's
    training rows: speed does not depend on the values)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = (rows, 2, 2, *shape)
    array = np.lib.format.open_memmap(folder / "latents.npy", mode="w+", dtype=np.float16,
                                      shape=stored)
    rng = np.random.default_rng(0)
    for i in range(0, rows, 256):
        block = rng.standard_normal((min(256, rows - i), 2, 2, *shape), dtype=np.float32)
        block[:, :, 1] = np.abs(block[:, :, 1]) * 0.1  # a positive std
        array[i: i + len(block)] = block
    array.flush()
    del array
    np.save(folder / "labels.npy", rng.integers(0, num_classes, rows))
    manifest = dict(format=FORMAT, version=VERSION, kind="latents",
                    vae="ema", scale_factor=SCALE_FACTOR, count=rows, shape=list(shape),
                    array="latents.npy", stored_shape=list(stored), dtype="float16",
                    num_classes=num_classes, class_names=[], skipped=[], captions=None)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder

