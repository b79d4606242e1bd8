"""
Weight files on disk: read them without running code, write them so a crash never leaves half a
file, and download the official ones once into a cache folder.

Every loader in the project (DiT, VAE, UNet, CLIP; fid.py reads its Inception itself) reads through
read_state_dict() and fills its model through load_strict(); everything that matters is written
through atomic_save().
"""
import fcntl
import hashlib
import io
import json
import mmap
import os
import pickle
import tempfile
import urllib.request
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message is one sentence naming the file and what is
    wrong with it."""


def cache_dir():
    """The one folder official weights are downloaded to: $DMP_CACHE, else ~/.cache/dmp."""
    return Path(os.environ.get("DMP_CACHE", "~/.cache/dmp")).expanduser()


def cached(url, filename=None):
    """Where download() keeps `url` in the cache (whether or not it is there yet)."""
    return cache_dir() / (filename or url.rsplit("/", 1)[-1].split("?")[0])


def download(url, filename=None, sha256=None):
    """
    Download `url` into the cache once (progress bar, atomic rename) and return the local path.
    `sha256`: the expected start of the file's SHA-256 hex digest (torch.hub's convention puts one
    in official file names): a download that does not match never enters the cache, and a cached
    file is checked before it is returned.
    """
    from tqdm import tqdm
    path = cached(url, filename)
    if path.exists():
        if sha256:
            check_sha256(path, sha256, f"{path} (delete it to download it again)")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(url) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            desc = f"downloading {path.name}"
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        if sha256:
            check_sha256(tmp, sha256, f"the file downloaded from {url} (not kept)")
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"could not download {url} to {path} ({e}); download it by hand "
                              f"and pass the local path") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def file_sha256(path):
    """The SHA-256 hex digest of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def folder_sha256(path):
    """
    The SHA-256 of what a model folder's weights are (a diffusers folder has no one file to hash):
    its weight files (WEIGHT_SUFFIXES, at any depth) in the sorted order of their paths relative to
    the folder, each path then its bytes, so a renamed, added, removed or changed file changes it.
    None for a folder that holds no weight file.
    """
    path = Path(path)
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in WEIGHT_SUFFIXES)
    if not files:
        return None
    h = hashlib.sha256()
    for file in files:
        h.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def check_sha256(path, prefix, name=None):
    """Refuse, in one sentence naming the file (or `name`), a file whose SHA-256 does not begin
    with `prefix`."""
    digest = file_sha256(path)
    if not digest.startswith(prefix.lower()):
        raise CheckpointError(f"{name or path}: its SHA-256 begins {digest[:len(prefix)]}, not "
                              f"{prefix} as the official file's name says, so it is damaged or "
                              f"not the official file")


def read_state_dict(path):
    """
    Read a .pt/.pth/.ckpt/.bin (torch.load with weights_only=True: a file that would run code is
    refused, and the code never runs) or a .safetensors file. Returns whatever dict the file holds,
    on the CPU.
    """
    entries, mapped = read_weights(path)
    if mapped is not None:
        mapped.close()
    return entries


def read_weights(path):
    """
    (entries, bytes) of a weight file opened once (read_state_dict's checks): `bytes` is the file
    mapped into memory, from which torch.load read the entries and from which its sha256 can be
    taken without opening it again (hashlib.sha256(bytes); load.py's one read per file); close it
    when done. A .safetensors file is mapped by safetensors itself: its bytes are None.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a checkpoint file: give the weights file in "
                              f"it (a diffusers folder's vae/diffusion_pytorch_model.safetensors, "
                              f"a train.py run's checkpoints/NNNNNNN.pt)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path)), None
        except Exception as e:
            reason = _reason(e)
            raise CheckpointError(f"{path}: not a readable safetensors file ({reason})") from None
    with open(path, "rb") as f:  # mapped copy-on-write: torch.load reads it as a file
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if os.fstat(f.fileno()).st_size \
            else io.BytesIO(b"")
    try:
        return _torch_load(path, mapped), mapped
    except BaseException:
        mapped.close()
        raise


def _torch_load(path, mapped):
    """read_weights of a torch file, its bytes `mapped`: the dict it holds, or one sentence why not."""
    head = mapped[:8] if isinstance(mapped, mmap.mmap) else b""
    # torch.save writes a zip archive (PK) or, in its legacy format, a pickle, which starts with the
    # PROTO opcode 0x80; anything else (a text or JSON file, an image) is not a checkpoint, and
    # unpickling it would fail with whatever error its bytes happen to trigger.
    if head[:2] != b"PK" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a "
                              f"pickle; it starts with {head!r})")
    try:
        obj = torch.load(mapped, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_reason(e)})") from None
        raise CheckpointError(f"{path}: refused to load, the file holds Python objects other "
                              f"than tensors and loading it could run code "
                              f"({_reason(e)})") from None
    except Exception as e:  # a damaged file fails in many ways (RuntimeError, EOFError, KeyError)
        reason = _reason(e)
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({reason})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def write_json(path, obj, indent=1):
    """
    A JSON file written under a temporary name, then renamed: a reader, or a rerun after kill -9,
    sees the old file or the new one, never half of either; a failed write (disk full) leaves no
    temporary file and raises the OSError.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=indent))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def hold(folder, what="it"):
    """
    Hold `folder` (a run folder, an unfinished build) for this process: an exclusive flock on
    folder/.lock, which the OS releases when the process ends however it ends (kill -9 too), so a
    stale lock never blocks a rerun. Returns the open file descriptor (close it to let go); a folder
    another process holds raises CheckpointError.
    """
    fd = os.open(Path(folder) / ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise CheckpointError(f"{folder} is in use by another process ({what}); wait for it to "
                              f"end, or stop it") from None
    return fd


def atomic_save(obj, path):
    """
    torch.save to a temporary file in the same folder, fsync, then rename: readers see the old file
    or the new one. The file gets the mode the umask gives new files (mkstemp's would be 0600,
    unreadable to a shared cluster folder's other users). A failed write (disk full) removes the
    temporary file, leaves the old one and raises CheckpointError.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        # torch's zip writer reports a failed write (OSError) as a RuntimeError raised after it
        cause = e if isinstance(e, OSError) else e.__context__
        if not isinstance(cause, OSError):
            raise
        raise CheckpointError(f"{path}: could not be written ({cause.strerror or _reason(cause)}); "
                              f"the previous file, if any, is unchanged") from None


def umask():
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def strip_prefix(state_dict, prefix):
    """The entries of `state_dict` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def diffusers_file(path, subfolder, names):
    """
    The weight file of one part of a diffusers model folder (unet/, text_encoder/): the first of
    `names` found in path/subfolder, or in `path` itself when it is that subfolder. A folder with
    none of them is refused in one sentence.
    """
    path = Path(path)
    folder = path / subfolder if (path / subfolder).is_dir() else path
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{path}: a folder without {subfolder}/{names[0]} (nor "
                          f"{', '.join(names[1:])}), so not a diffusers Stable Diffusion model")


def model_weights(entries):
    """
    The model's state dict in what a file holds: a bare state dict, a checkpoint of train.py
    ({'ema', 'model', ...}: the EMA weights are preferred) or an ldm .ckpt ({'state_dict'}), with
    the prefixes DDP ('module.') and torch.compile ('_orig_mod.') put before every key removed,
    and without a DMP patch's 'block_input.' entries (dmp.apply_patch adds those to a loaded
    model).
    """
    for key in ("ema", "model", "state_dict"):
        if isinstance(entries.get(key), dict):
            entries = entries[key]
            break
    weights = {}
    for key, value in entries.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        if not key.startswith("block_input."):
            weights[key] = value
    return weights


def load_strict(model, state_dict, path, what, fits="", dtype=torch.float32):
    """
    Fill `model` (built on the meta device, so nothing is initialised only to be overwritten) with
    `state_dict`, converted to `dtype`, as load_state_dict(strict=True, assign=True) would, after
    checking that the keys and shapes are exactly the model's. A file that does not fit raises one
    CheckpointError sentence: `path` does not fit `what`, then the first three missing, unexpected
    and mis-shaped keys with their counts, then `fits` (e.g. which config its shapes fit).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    problems = [f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
                for label, keys in (("missing", missing), ("unexpected", unexpected),
                                    ("wrong shape", wrong)) if keys]
    if problems:
        raise CheckpointError(f"{path} does not fit {what}: {'; '.join(problems)}{fits}")
    # Floating tensors in dtype; integer buffers (BatchNorm's num_batches_tracked) keep their own.
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model


def _reason(e, limit=160):
    """
    The informative sentence of an exception's message, to quote in parentheses: its first, or the
    line naming the blocked global in torch's weights-only refusal; shortened at a word boundary,
    never mid-word.
    """
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    line = next((x for x in lines if "GLOBAL" in x or "Unsupported" in x), lines[0])
    line = line.split(". ")[0].rstrip(".")
    if len(line) <= limit:
        return line
    return line[:limit].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
