"""
A folder or zip of images to training data: each image centre-cropped as ADM/DiT do, encoded once by
the VAE, its posterior stored so train.py draws a fresh latent every step (as DiT's train.py does)
without the VAE.

    # FFHQ, unconditional; ImageNet, 1000 classes; the digits in pixel space
    python prepare_data.py ~/data/ffhq/images1024x1024 data/ffhq256
    python prepare_data.py ~/data/imagenet/train data/imagenet256 --labels folders
    python prepare_data.py digits.zip data/digits32 --resolution 32 --vae none
    # img2dataset .tar shards (or a folder of image + .txt pairs); COCO's captions
    python prepare_data.py ~/laion/shards data/laion512 --resolution 512 \
        --vae v1-5-pruned-emaonly.safetensors --captions txt
    python prepare_data.py ~/coco/train2014 data/coco256 \
        --captions ~/coco/annotations/captions_train2014.json

The output folder OUT (built in OUT.partial/, renamed when complete; rerun the same command to
resume):
    latents.npy   float16 [rows, 2, 2, z, h, w]: axis 1 the image / its horizontal mirror, axis 2
                  mean / std of the VAE posterior, unscaled (--vae none: images.npy uint8
                  [rows, 3, H, W] instead, [rows, 1, H, W] with --grayscale)
    labels.npy    int64 [rows]: 0 for every image, or with --labels folders the index of its top
                  folder among the sorted folder names (= torchvision ImageFolder, the order DiT's
                  labels use)
    files.txt     row i is this file (relative path)
    manifest.json everything else: shapes, vae, scale factor, classes, skipped files and why,
                  format version
    captions.json with --captions: row i's captions, a JSON list of strings (COCO has five;
                  train.py draws one per step). Only image files are rows then; an image without a
                  caption is skipped.
Rows of skipped files stay zero and PreparedData leaves them out. A source is a folder, a zip, a
.tar, or a folder of .tar shards (webdataset, as img2dataset writes them: 000000001.jpg beside
000000001.txt); a file inside shard 00000.tar is listed as 00000.tar/000000001.jpg.
"""
import argparse
import errno
import functools
import io
import json
import os
import shutil
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from checkpoints import CheckpointError
from model_vae import SCALE_FACTOR, load_vae

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
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grayscale ("I" assumed so)
        a = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        img = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8))  # round(v 255 / 65535)
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img.convert("RGBA"))
    return img.convert("RGB")


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


#################################################################################
#                      Sources: a folder or a zip, and labels                   #
#################################################################################

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def tar_names(path):
    with tarfile.open(path) as t:
        return [m.name for m in t.getmembers() if m.isfile()]


def list_source(src, labels):
    """Sorted relative paths of every file in `src` (hidden files and __MACOSX left out), their
    labels, class names."""
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as z:
            files = [n for n in z.namelist() if not n.endswith("/")]
    elif src.is_file() and tarfile.is_tarfile(src):
        files = tar_names(src)
    elif src.is_dir():
        files = [os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/")
                 for d, _, names in os.walk(src, followlinks=True) for f in names]
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
        self.zip, self.tars = None, {}  # opened lazily, once per DataLoader worker

    def __len__(self):
        return len(self.files) - self.start

    def tar(self, path):
        if path not in self.tars:
            self.tars[path] = tarfile.open(path)
        return self.tars[path]

    def read(self, name):
        if self.src.is_dir():
            shard, tar, member = name.partition(".tar/")
            if tar:
                return self.tar(self.src / (shard + ".tar")).extractfile(member).read()
            return (self.src / name).read_bytes()
        if tarfile.is_tarfile(self.src) and not zipfile.is_zipfile(self.src):
            return self.tar(self.src).extractfile(name).read()
        self.zip = self.zip or zipfile.ZipFile(self.src)
        return self.zip.read(name)

    def __getitem__(self, i):
        row = self.start + i
        if self.labels[row] < 0:
            return row, None, "not inside a class folder"
        if self.captions is not None and not self.captions[row]:
            return row, None, "no caption"
        try:
            with Image.open(io.BytesIO(self.read(self.files[row]))) as img:
                img.load()  # decodes the whole file: truncated data fails here
                img = to_rgb(img)
                if self.grayscale:
                    img = img.convert("L")  # ITU-R 601 luma
                pixels = center_crop_arr(img, self.resolution)
                return row, pixels.reshape(self.resolution, self.resolution, -1), ""
        except UnidentifiedImageError:
            return row, None, "not an image file PIL can read"
        except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, ...)
            reason = f"{type(e).__name__}: {str(e).strip()}".splitlines() or [""]
            return row, None, reason[0][:200]


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
            by_name.setdefault(names[a["image_id"]], []).append(a["caption"].strip())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{captions}: not a COCO captions file (a JSON with images and "
                        f"annotations; {type(e).__name__}), nor 'txt'") from None
    return images, [by_name.get(f.rsplit("/", 1)[-1], []) for f in images]


#################################################################################
#                   Preparing: batched, resumable, atomic at the end            #
#################################################################################

def _write_json(path, obj):
    """Atomically: a reader (or a rerun after kill -9) sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def prepare(src, out, resolution=256, vae="ema", labels="none", batch_size=32, device=None,
            workers=0, grayscale=False, captions=None):
    """
    Encode every image of `src` into the folder `out` (see the module docstring). Returns the
    manifest. In a process group (torchrun: main joins it) the images are split over the
    processes, which write one output, the same bytes as one process writes.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    src, out = Path(src).expanduser(), Path(out).expanduser()
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        raise DataError(f"{out} already exists; delete it to prepare it again")
    if labels not in ("none", "folders"):
        raise DataError(f"--labels must be none or folders, not {labels}")
    if not src.exists():
        raise DataError(f"{src}: no such folder or zip file")
    files, y, class_names = list_source(src, labels)
    texts = None
    if captions:
        if labels != "none":
            raise DataError("--captions and --labels folders do not go together: a caption is the "
                            "condition")
        files, texts = read_captions(src, files, captions)
        y = np.zeros(len(files), dtype=np.int64)
        if not files:
            raise DataError(f"{src}: holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    if device is None:  # under torchrun, the GPU of this process
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    model = load_vae(vae, device)
    if grayscale and model is not None:
        raise DataError("--grayscale stores one-channel pixels: it needs --vae none")
    if model is None:
        channels = 1 if grayscale else 3
        shape = stored = (channels, resolution, resolution)
        name = "images.npy"
    else:
        f = 2 ** (len(model.config["ch_mult"]) - 1)
        if resolution % f:
            raise DataError(f"--resolution {resolution} is not a multiple of the VAE's "
                            f"downsampling factor {f}")
        name, shape = "latents.npy", (model.config["z_channels"], resolution // f, resolution // f)
        stored = (2, 2, *shape)
    settings = dict(source=str(src.resolve()), resolution=resolution, vae=str(vae), labels=labels,
                    rows=len(files), grayscale=grayscale,
                    caption_source=str(captions) if captions else None)
    listing = "".join(f + "\n" for f in files)

    progress_path = partial / "progress.json"
    error = None
    if rank == 0:  # the one process that starts or checks OUT.partial; the others wait for it
        try:
            array = (name, np.uint8 if model is None else np.float16, (len(files), *stored))
            start_partial(partial, settings, listing, y, texts, array)
        except (DataError, OSError) as e:
            error = e
    error = shared(error, world)
    if error is not None:
        raise error
    progress = json.loads(progress_path.read_text())  # the arrays hold every row before "done"
    data = np.load(partial / name, mmap_mode="r+")

    # Batches of batch_size files from the first not done; under torchrun process r encodes batches
    # r, r + world, ... (the batches one process encodes, so the bytes are the same). After each
    # round of `world` batches, once every process has flushed its rows, rank 0 records it done.
    dataset = ImageFiles(src, files, y, resolution, start=progress["done"], grayscale=grayscale,
                         captions=texts)
    first, n = progress["done"], len(dataset)
    batches = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    watchdog = functools.partial(exit_with_parent, os.getpid())
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches[rank::world],
                                              num_workers=workers, collate_fn=list,
                                              worker_init_fn=watchdog))
    bar = tqdm(total=len(files), initial=first, unit="img", desc=f"preparing {out.name}",
               disable=rank != 0)
    with bar:
        for start in range(0, len(batches), world):
            batch = next(loader) if start + rank < len(batches) else []
            ok = [(row, img) for row, img, _ in batch if img is not None]
            if ok:
                rows = [r for r, _ in ok]
                pixels = torch.from_numpy(np.stack([img for _, img in ok]))
                data[rows] = encode(model, pixels.permute(0, 3, 1, 2), device)
                data.flush()
            skipped = [dict(row=r, file=files[r], reason=why)
                       for r, img, why in batch if img is None]
            if world > 1:  # also the barrier: every process has flushed this round's rows
                every = [None] * world
                dist.all_gather_object(every, skipped)
                skipped = sorted((s for part in every for s in part), key=lambda s: s["row"])
            done = first + min(n, (start + world) * batch_size)
            if rank == 0:  # after the flush: a kill never marks unwritten rows done
                progress["skipped"] += skipped
                progress["done"] = done
                _write_json(progress_path, progress)
            bar.update(done - bar.n)
    del data

    error, manifest = None, None
    if rank == 0:
        try:
            skipped = progress["skipped"]
            kind = "pixels" if model is None else "latents"
            manifest = dict(format=FORMAT, version=VERSION, kind=kind,
                            **settings, scale_factor=1.0 if model is None else SCALE_FACTOR,
                            count=len(files) - len(skipped), shape=list(shape), array=name,
                            stored_shape=[len(files), *stored],
                            dtype="uint8" if model is None else "float16",
                            axes="row, channel, height, width" if model is None else
                            "row, mirror (0 image, 1 horizontal flip), moment (0 mean, 1 std), "
                            "channel, height, width",
                            num_classes=max(1, len(class_names)), class_names=class_names,
                            files="files.txt", skipped=skipped,
                            captions="captions.json" if texts is not None else None)
            finish(src, out, partial, manifest, len(files))
        except DataError as e:
            error = e
    error, manifest = shared((error, manifest), world)
    if error is not None:
        raise error
    return manifest


def start_partial(partial, settings, listing, y, texts, array):
    """
    OUT.partial started (its listing, labels, captions, the array (name, dtype, shape) with its
    space reserved), or checked to resume.
    """
    progress_path = partial / "progress.json"
    if progress_path.exists():  # resume: the arrays hold every row before progress["done"]
        progress = json.loads(progress_path.read_text())
        if progress["settings"] != settings or (partial / "files.txt").read_text() != listing:
            raise DataError(f"{partial} was started by another command ({progress['settings']}); "
                            f"rerun that command or delete {partial}")
        return
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "files.txt").write_text(listing)
    np.save(partial / "labels.npy", y)
    if texts is not None:
        _write_json(partial / "captions.json", texts)
    name, dtype, shape = array
    np.lib.format.open_memmap(partial / name, mode="w+", dtype=dtype, shape=shape).flush()
    # Reserve the disk space now: a full disk fails here, with a message, not later as a SIGBUS
    # while rows are written into the memory map (a filesystem that cannot reserve: as before).
    if hasattr(os, "posix_fallocate"):
        with open(partial / name, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    raise
    progress = dict(settings=settings, done=0, skipped=[])
    _write_json(progress_path, progress)  # written last: the commit point of the initialisation


def finish(src, out, partial, manifest, rows):
    """The manifest written, OUT.partial renamed to OUT (nothing usable: an error, nothing kept)."""
    skipped = manifest["skipped"]
    if len(skipped) == rows:  # nothing to train on: no dataset, nor a scratch folder of zeros
        shutil.rmtree(partial)
        first = skipped[0]
        raise DataError(f"{src}: none of its {rows} files is a usable image (first: "
                        f"{first['file']}, {first['reason']}); nothing was written")
    _write_json(partial / "manifest.json", manifest)
    os.replace(partial, out)  # the finished folder appears at once
    (out / "progress.json").unlink()
    print(f"{out}: {manifest['count']} of {rows} files prepared as {manifest['kind']} "
          f"{manifest['shape']}"
          + (f"; {len(skipped)} skipped (listed in manifest.json):" if skipped else ""))
    for s in skipped[:20]:
        print(f"  skipped {s['file']}: {s['reason']}")
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20} more")


def join_processes():
    """
    Under torchrun with several processes, join their group (NCCL where there are GPUs, one for
    each process; gloo on CPU) and return True; else False.
    """
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def shared(value, world):
    """Rank 0's `value` on every process (a pickle through the process group)."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box)
    return box[0]


def exit_with_parent(parent, worker_id):
    """
    DataLoader's worker_init_fn (with prepare_data's pid bound): the worker ends as soon as its
    parent is gone, even by kill -9, instead of living on for a minute or more.
    """
    def watch():
        """Polls for the parent: once it is gone, getppid() names another process."""
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


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


#################################################################################
#                        Reading: what train.py calls                           #
#################################################################################

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
        self.manifest, self.kind, self.vae = m, m["kind"], m["vae"]
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

    def batch(self, indices, flip, generator=None, device="cpu", noise=None):
        """
        `flip`: one bool per index (or one for all): take the mirror. The latents' noise is `noise`
        when given, else drawn from `generator` on its own device (a CUDA generator avoids the CPU
        work); float16 -> float32 and the sum happen on `device`.
        """
        indices = np.asarray(indices, dtype=np.int64)
        rows, y = self.rows[indices], torch.from_numpy(self.labels[indices]).to(device)
        flip = np.broadcast_to(np.asarray(flip, dtype=bool), rows.shape)
        if self.kind == "pixels":
            x = torch.from_numpy(self.data[rows]).to(device)
            mirrored = torch.from_numpy(flip.copy()).to(device)[:, None, None, None]
            x = torch.where(mirrored, x.flip(3), x)
            return to_model_input(x), y
        moments = self.data[rows, flip.astype(np.int64)]  # [B, 2, z, h, w]
        moments = torch.from_numpy(moments).to(device).float()
        mean, std = moments.unbind(1)
        if noise is None:
            noise_device = generator.device if generator is not None else device
            noise = torch.randn(mean.shape, generator=generator, device=noise_device)
        return (mean + std * noise.to(device)) * self.scale_factor, y


#################################################################################
#                                     CLI                                       #
#################################################################################

def main(argv=None):
    p = argparse.ArgumentParser(
        description="Images (a folder or a zip) to VAE latents for train.py.")
    p.add_argument("src", help="folder (nested subfolders are fine) or zip of images")
    p.add_argument("out", help="output folder; built in OUT.partial and renamed when complete")
    p.add_argument("--resolution", type=int, default=256,
                   help="side of the ADM centre crop (DiT: 256 or 512)")
    p.add_argument("--vae", default="ema",
                   help="ema | mse (DiT's) | none (pixels) | a VAE or SD checkpoint file")
    p.add_argument("--labels", default="none", choices=["none", "folders"],
                   help="none: every image label 0 (FFHQ); folders: one class per top folder, "
                        "sorted (ImageNet)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per VAE batch (each encoded with its mirror)")
    p.add_argument("--grayscale", action="store_true",
                   help="with --vae none: one-channel pixels (e.g. digits)")
    p.add_argument("--captions", help="txt: the .txt beside each image (folders, zips, .tar "
                   "shards); or a COCO captions JSON (captions_train2014.json)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="image decoding processes")
    args = p.parse_args(argv)
    joined = join_processes()  # torchrun: the images split over its processes
    try:
        prepare(args.src, args.out, args.resolution, args.vae, args.labels, args.batch_size,
                args.device, args.workers, args.grayscale, args.captions)
    except (DataError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # a write that failed (disk full): the rows written so far are kept
        sys.exit(f"error: {e.filename or args.out + '.partial'}: {e.strerror or e}; rerun the same "
                 f"command to resume from {args.out}.partial")
    except KeyboardInterrupt:
        sys.exit(f"interrupted: rerun the same command to resume from {args.out}.partial")
    finally:
        if joined:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
