"""
Weight files on disk: read them without running code, write them so a crash never leaves half a file,
and download the official ones once into a cache folder.

Every loader in the project (DiT, VAE, UNet, CLIP; fid.py reads its Inception itself) reads through
read_state_dict(), and everything that matters is written through atomic_save().
"""
import hashlib
import os
import pickle
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A weight file that cannot be used; the message is one sentence naming the file and the problem."""


def cache_dir():
    """The one folder official weights are downloaded to: $DMP_CACHE, else ~/.cache/dmp."""
    return Path(os.environ.get("DMP_CACHE", "~/.cache/dmp")).expanduser()


def download(url, filename=None, sha256=None):
    """
    Download `url` into the cache once (progress bar, atomic rename) and return the local path.
    `sha256`: the expected start of the file's SHA-256 hex digest (torch.hub's convention puts one
    in official file names): a download that does not match never enters the cache, and a cached
    file is checked before it is returned.
    """
    from tqdm import tqdm
    path = cache_dir() / (filename or url.rsplit("/", 1)[-1].split("?")[0])
    if path.exists():
        if sha256:
            check_sha256(path, sha256, f"{path} (delete it to download it again)")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(url) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {path.name}") as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        if sha256:
            check_sha256(tmp, sha256, f"the file downloaded from {url} (not kept)")
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"could not download {url} to {path} ({e}); download it by hand and pass the local path") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_sha256(path, prefix, name=None):
    """Refuse, in one sentence naming the file (or `name`), a file whose SHA-256 does not begin
    with `prefix`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    digest = digest.hexdigest()
    if not digest.startswith(prefix.lower()):
        raise CheckpointError(f"{name or path}: its SHA-256 begins {digest[:len(prefix)]}, not "
                              f"{prefix} as the official file's name says, so it is damaged or "
                              f"not the official file")


def read_state_dict(path):
    """
    Read a .pt/.pth/.ckpt/.bin (torch.load with weights_only=True: a file that would run code is refused, and
    the code never runs) or a .safetensors file. Returns whatever dict the file holds, on the CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise CheckpointError(f"{path}: not a PyTorch checkpoint ({_first_line(e)[:120]})") from None
        raise CheckpointError(f"{path}: refused to load, the file holds Python objects other than tensors "
                              f"and loading it could run code ({_first_line(e)[:120]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or not a PyTorch checkpoint ({_first_line(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, fsync, then rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strip_prefix(state_dict, prefix):
    """The entries of `state_dict` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
