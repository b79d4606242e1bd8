"""
Several processes, the result of one: torchrun's process group, and the seeds that make every
random draw a function of the run's own numbers (seed, step, image), never of the process that
draws it or of the batch it falls in.

train.py splits each step's global batch over the processes, sample.py the images of an FID set;
both seed from seed_of, so a run on 8 GPUs draws what a run on one draws (and computes it, to the
kernels' float rounding).
"""
import datetime
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
    host_group()  # made now, while every process is here
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


# Waiting for a rank that evaluates: a week, not NCCL's 10 minutes (its watchdog kills the job).
PATIENCE = datetime.timedelta(days=7)
_host_group = []


def host_group():
    """
    A gloo group of every process, made at the first call (every process must make that call at
    the same point, like any collective), whose collectives run on the host and wait up to
    PATIENCE: the processes that finish their share of an evaluation first wait here, not inside
    an NCCL collective whose watchdog ends the job after 10 minutes.
    """
    if not _host_group:
        _host_group.append(dist.new_group(backend="gloo", timeout=PATIENCE))
    return _host_group[0]


def host_sum(values, world):
    """The float64 sum over the processes of each process's `values` (a list of floats), through
    host_group; the values themselves with one process."""
    if world == 1:
        return list(values)
    total = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(total, group=host_group())
    return total.tolist()


def teardown():
    """Leave torchrun's process group, if this process joined one (even a group of one)."""
    _host_group.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
