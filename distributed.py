"""
Several processes, the result of one: torchrun's process group, and the seeds that make every
random draw a function of the run's own numbers (seed, step, image), never of the process that
draws it or of the batch it falls in.

train.py splits each step's global batch over the processes, sample.py the images of an FID set;
both seed from seed_of, so a run on 8 GPUs draws what a run on one draws (and computes it, to the
kernels' float rounding).
"""
import os

import numpy as np
import torch
import torch.distributed as dist


def seed_of(*numbers, bits=63):
    """
    A well-mixed seed of `bits` bits from a tuple of non-negative integers: the top `bits` of the
    first 64-bit word of numpy's SeedSequence. train.py seeds its data and every step with 63 bits,
    sample.py each image's generator with all 64; both layouts are kept so that every draw is the
    one it always was (a resumed run, or an FID set continued, matches what came before).
    """
    word = np.random.SeedSequence(list(numbers)).generate_state(1, np.uint64)[0]
    return int(word >> np.uint64(64 - bits))


def setup():
    """
    (rank, world, backend): torchrun's process group when torchrun started this process (RANK is
    in the environment), NCCL with each process on the GPU of its LOCAL_RANK where there is CUDA,
    gloo on CPUs; else (0, 1, None), one process and no group.
    """
    if "RANK" not in os.environ:
        return 0, 1, None
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dist.get_backend()


def local_device(requested=None):
    """
    This process's device: `requested` (a --device), by default CUDA where there is one, else the
    CPU. CUDA without an index is the GPU setup() gave this process (LOCAL_RANK under torchrun).
    """
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def teardown():
    """Leave torchrun's process group, if this process joined one (even a group of one)."""
    if dist.is_initialized():
        dist.destroy_process_group()
