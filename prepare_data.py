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
import hashlib
import json
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import distributed
from checkpoints import CheckpointError, hold, write_json
from dataset import (FORMAT, IMAGE_EXTENSIONS, VERSION, DataError, ImageFiles, chain,
                     check_consumed, encode, list_source, read_captions)
from model_vae import SCALE_FACTOR, load_vae


#################################################################################
#                   Preparing: batched, resumable, atomic at the end            #
#################################################################################


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
    if resolution < 1 or batch_size < 1 or workers < 0:
        raise DataError(f"--resolution and --batch-size must be at least 1 and --workers at least "
                        f"0, not {resolution}, {batch_size} and {workers}; nothing was written")
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
    device = distributed.local_device(device)  # by default, under torchrun, this process's GPU
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
    # The captions by content (a COCO file rewritten under its name gives other rows); the images
    # are hashed as they are read (dataset.chain, progress["source_sha256"]).
    settings = dict(source=str(src.resolve()), resolution=resolution, vae=str(vae), labels=labels,
                    rows=len(files), grayscale=grayscale,
                    caption_source=str(captions) if captions else None,
                    captions_sha256=None if texts is None else
                    hashlib.sha256(json.dumps(texts).encode()).hexdigest())
    listing = "".join(f + "\n" for f in files)

    error, held = None, None
    dataset = ImageFiles(src, files, y, resolution, start=0, grayscale=grayscale, captions=texts)
    if rank == 0:  # the one process that starts or checks OUT.partial; the others wait for it
        try:
            partial.mkdir(parents=True, exist_ok=True)
            held = hold(partial, "prepare_data.py preparing it")  # released when prepare returns
            array = (name, np.uint8 if model is None else np.float16, (len(files), *stored))
            start_partial(partial, settings, listing, y, texts, array, dataset)
        except (DataError, OSError, CheckpointError) as e:
            error = e
    try:
        return encode_all(dataset, model, device, partial, name, batch_size, workers, out, src,
                          settings, shape, stored, class_names, texts, error, rank, world)
    finally:
        if held is not None:
            os.close(held)


def encode_all(dataset, model, device, partial, name, batch_size, workers, out, src, settings,
               shape, stored, class_names, texts, error, rank, world):
    """prepare's work once OUT.partial is started or checked (`error`: rank 0's, if it failed)."""
    files, progress_path = dataset.files, partial / "progress.json"
    error = shared(error, world)
    if error is not None:
        raise error
    progress = json.loads(progress_path.read_text())  # the arrays hold every row before "done"
    data = np.load(partial / name, mmap_mode="r+")

    # Batches of batch_size files from the first not done; under torchrun process r encodes batches
    # r, r + world, ... (the batches one process encodes, so the bytes are the same). After each
    # round of `world` batches, once every process has flushed its rows, rank 0 records it done.
    dataset.start = progress["done"]
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
            ok = [(row, img) for row, img, _, _ in batch if img is not None]
            if ok:
                rows = [r for r, _ in ok]
                pixels = torch.from_numpy(np.stack([img for _, img in ok]))
                data[rows] = encode(model, pixels.permute(0, 3, 1, 2), device)
                data.flush()
            skipped = [dict(row=r, file=files[r], reason=why)
                       for r, img, why, _ in batch if img is None]
            digests = [(r, digest) for r, _, _, digest in batch]
            if world > 1:  # also the barrier: every process has flushed this round's rows
                every = [None] * world
                dist.all_gather_object(every, (skipped, digests))
                skipped = sorted((s for part in every for s in part[0]), key=lambda s: s["row"])
                digests = sorted(d for part in every for d in part[1])
            done = first + min(n, (start + world) * batch_size)
            if rank == 0:  # after the flush: a kill never marks unwritten rows done
                progress["skipped"] += skipped
                progress["source_sha256"] = chain(progress["source_sha256"],
                                                  [d for _, d in digests])
                progress["done"] = done
                write_json(progress_path, progress)
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


def start_partial(partial, settings, listing, y, texts, array, dataset):
    """
    OUT.partial started (its listing, labels, captions, the array (name, dtype, shape) with its
    space reserved), or checked to resume: the same settings, listing and captions, and the files
    already encoded still holding the same bytes (`dataset` rereads them: check_consumed).
    """
    progress_path = partial / "progress.json"
    if progress_path.exists():  # resume: the arrays hold every row before progress["done"]
        progress = json.loads(progress_path.read_text())
        if progress["settings"] != settings or (partial / "files.txt").read_text() != listing:
            raise DataError(f"{partial} was started by another command or on other files "
                            f"({progress['settings']}); rerun that command or delete {partial}")
        check_consumed(dataset, progress["done"], progress["source_sha256"], partial)
        return
    (partial / "files.txt").write_text(listing)
    np.save(partial / "labels.npy", y)
    if texts is not None:
        write_json(partial / "captions.json", texts)
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
    progress = dict(settings=settings, done=0, skipped=[], source_sha256="")
    write_json(progress_path, progress)  # written last: the commit point of the initialisation


def finish(src, out, partial, manifest, rows):
    """The manifest written, OUT.partial renamed to OUT (nothing usable: an error, nothing kept)."""
    skipped = manifest["skipped"]
    if len(skipped) == rows:  # nothing to train on: no dataset, nor a scratch folder of zeros
        shutil.rmtree(partial)
        first = skipped[0]
        raise DataError(f"{src}: none of its {rows} files is a usable image (first: "
                        f"{first['file']}, {first['reason']}); nothing was written")
    write_json(partial / "manifest.json", manifest)
    (partial / ".lock").unlink(missing_ok=True)  # (still held through its descriptor until the end)
    os.replace(partial, out)  # the finished folder appears at once
    (out / "progress.json").unlink()
    print(f"{out}: {manifest['count']} of {rows} files prepared as {manifest['kind']} "
          f"{manifest['shape']}"
          + (f"; {len(skipped)} skipped (listed in manifest.json):" if skipped else ""))
    for s in skipped[:20]:
        print(f"  skipped {s['file']}: {s['reason']}")
    if len(skipped) > 20:
        print(f"  ... and {len(skipped) - 20} more")


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
    # An image over PIL's pixel limit is read (one twice over it is skipped, saying why) without a
    # warning printed into the middle of the progress bar.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    distributed.setup()  # under torchrun, the images are split over its processes
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
        distributed.teardown()


if __name__ == "__main__":
    main()
