"""
The suite's CUDA simulation: what a first GPU run meets, on a CPU-only machine.

Inside simulated_cuda(), tensors made on or moved to cuda:0 are fake (torch's FakeTensorMode: shapes,
dtypes, devices, no data), so
  - torch.autocast('cuda') applies CUDA's dtype rules (a softmax of bf16 logits is fp32 there, bf16 on
    CPU), and every operation checks dtypes and devices as the CUDA kernels would: an operation that
    mixes a CPU tensor (other than a 0-dim one) with a CUDA one raises, as on a GPU;
  - a generator draws on its own device only (torch.Generator('cuda') is simulated);
  - backward runs by walking the autograd graph (backward() below: the engine itself refuses to start
    without a real accelerator), and the trained parameters it reaches get fake gradients;
  - the host's waits are counted (SimulatedCUDA.counts['sync']): a value read from a CUDA tensor
    (.item(), bool(), .tolist()) or a copy from it to the CPU, which comes back as zeros, so that
    images can still be written.
A CPU-only torch refuses CUDA indexing and copies without a device guard: fake_cuda_guard.cpp registers
a no-op one; it is built once with the C++ compiler into the project's cache folder (~/.cache/dmp or
$DMP_CACHE; about 3 s), and a missing compiler is an error that says so.
"""
import collections
import contextlib
import ctypes
import hashlib
import os
import shutil
import subprocess
import weakref
from pathlib import Path
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes

aten = torch.ops.aten
GUARD_SOURCE = Path(__file__).with_name("fake_cuda_guard.cpp")
CUDA = torch.device("cuda", 0)


def guard_library():
    """The built guard (fake_cuda_guard.cpp for this torch), built first if it is not there."""
    source = GUARD_SOURCE.read_bytes()
    key = hashlib.sha256(source + torch.__version__.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("DMP_CACHE", Path.home() / ".cache" / "dmp"))
    path = cache / "fake_cuda_guard" / f"{key}.so"
    if not path.exists():
        compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
        if compiler is None:
            raise RuntimeError("the CUDA simulation needs a C++ compiler (c++ or g++, or $CXX) to build "
                               f"{GUARD_SOURCE.name}; install one (apt-get install g++)")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch_dir = Path(torch.__file__).parent
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        built = subprocess.run([compiler, "-shared", "-fPIC", "-std=c++17", "-O1",
                                f"-I{torch_dir / 'include'}", str(GUARD_SOURCE),
                                f"-L{torch_dir / 'lib'}", "-lc10", "-o", str(tmp)],
                               capture_output=True, text=True)
        if built.returncode:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{compiler} could not build {GUARD_SOURCE.name} for the CUDA "
                               f"simulation:\n{built.stderr}")
        os.replace(tmp, path)
    return path


_LOADED = []


def load_guard():
    """Register the no-op CUDA device guard in this process (once)."""
    if not _LOADED:
        _LOADED.append(ctypes.CDLL(str(guard_library())))


class SimGenerator(torch.Generator):
    """torch.Generator(device): a CPU generator that remembers the device it was asked for."""
    def __new__(cls, device="cpu"):
        gen = super().__new__(cls, "cpu")
        gen.sim_device = torch.device(device)
        return gen

    def __init__(self, device="cpu"):
        pass


def _device_of(value):
    return torch.device(value) if value is not None else torch.device("cpu")


def _on_cpu_then_moved(factory):
    """torch.tensor / torch.as_tensor to cuda: made on the CPU, then copied (a CPU-only torch
    would copy to cuda underneath the dispatcher, out of the simulation's sight)."""
    def make(*args, **kwargs):
        device = kwargs.pop("device", None)
        if device is not None and torch.device(device).type != "cuda":
            return factory(*args, device=device, **kwargs)
        with _disable_current_modes():  # made for real, then faked: FakeTensorMode keeps a
            made = factory(*args, **kwargs)  # scalar it makes as a constant, which it would then
        made = _SIM[-1].from_tensor(made)  # copy to cuda for real, beneath the simulation
        return made if device is None else made.to(device)
    return make


def _drawn_where_generated(draw):
    """torch.randn and the like: a generator draws on its own device only, as on a GPU."""
    def checked(*args, **kwargs):
        gen, device = kwargs.get("generator"), _device_of(kwargs.get("device"))
        where = getattr(gen, "sim_device", getattr(gen, "device", device))
        if where.type != device.type:
            raise RuntimeError(f"torch.{draw.__name__}: a {where.type} generator cannot draw on {device}")
        return draw(*args, **kwargs)
    return checked


class SimulatedCUDA(FakeTensorMode):
    """
    FakeTensorMode that counts what makes the host wait for a CUDA device: a value read from a
    cuda tensor (.item(), bool(), .tolist(): 'sync') and a copy from it to the CPU ('sync', given
    back as zeros so that images can still be written); host-to-device copies are counted apart
    ('h2d'), and those that make the host wait, from pageable memory or not non_blocking, also as
    'h2d_blocking'. Pinned memory is a copy marked pinned (a CPU-only torch has none).
    """
    def __init__(self):
        super().__init__(allow_non_fake_inputs=True)
        self.counts, self.moved_to, self.pinned = collections.Counter(), {}, {}

    def is_pinned(self, tensor):
        ref = self.pinned.get(id(tensor))
        return ref is not None and ref() is tensor

    def moved(self, params):
        """The parameters `params` as to_cuda moved them."""
        return [self.moved_to.get(id(p), p) for p in params]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            on_cuda = args[0].device.type == "cuda"
            self.counts["sync"] += on_cuda
            # The value read (a fake tensor has none): True for a check (finite, in range); 0 for a
            # number on the GPU (GradScaler's count of overflows), 1 on the CPU (an optimizer's step
            # count, which Adam's bias correction divides by 1 - beta^step)
            return True if args[0].dtype == torch.bool else int(not on_cuda)
        if func is aten._pin_memory.default:
            out = super().__torch_dispatch__(aten.clone.default, types, (args[0],), {})
            self.pinned[id(out)] = weakref.ref(out)  # id -> tensor (a WeakSet would compare tensors)
            return out
        if func is aten.is_pinned.default:
            return self.is_pinned(args[0])
        if func is aten._to_copy.default:
            src, dst = args[0].device.type, _device_of(kwargs.get("device", args[0].device)).type
            if src == "cuda" and dst == "cpu":
                self.counts["sync"] += 1
                with _disable_current_modes():
                    return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            if src == "cpu" and dst == "cuda":
                self.counts["h2d"] += 1
                waits = not (kwargs.get("non_blocking") and self.is_pinned(args[0]))
                self.counts["h2d_blocking"] += waits
        return super().__torch_dispatch__(func, types, args, kwargs)


def _module_to(original):
    """Module.to: to cuda by to_cuda (torch's own swaps tensors, which fake ones refuse)."""
    def to(module, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and torch.device(device).type == "cuda":
            to_cuda(module)
            return module if dtype is None else original(module, dtype=dtype)
        return original(module, *args, **kwargs)
    return to


@contextlib.contextmanager
def simulated_cuda():
    """
    A simulated cuda:0 for the code run inside: tensors made or moved there are fake (shapes,
    dtypes and devices, no data), torch.autocast('cuda') applies CUDA's dtype rules, an operation
    that mixes CPU and CUDA tensors raises, as on a GPU, and backward runs by backward() below.
    Yields the SimulatedCUDA mode, whose counts say how often the host waited.
    """
    load_guard()
    sim = SimulatedCUDA()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch("torch.cuda.is_available", return_value=True))
        stack.enter_context(mock.patch("torch.cuda.is_bf16_supported", return_value=True))
        stack.enter_context(mock.patch("torch.cuda.current_device", return_value=0))
        stack.enter_context(mock.patch("torch.cuda.set_device"))
        stack.enter_context(mock.patch("torch.cuda.synchronize", side_effect=_counted(sim)))
        stack.enter_context(mock.patch("torch.Generator", SimGenerator))
        stack.enter_context(mock.patch.object(torch.Tensor, "backward", backward))
        stack.enter_context(mock.patch.object(torch.nn.Module, "to", _module_to(torch.nn.Module.to)))
        for name in ("tensor", "as_tensor"):
            stack.enter_context(mock.patch.object(torch, name, _on_cpu_then_moved(getattr(torch, name))))
        for name in ("randn", "rand", "randint", "randperm"):
            stack.enter_context(mock.patch.object(torch, name, _drawn_where_generated(getattr(torch, name))))
        stack.enter_context(sim)
        _SIM.append(sim)
        try:
            yield sim
        finally:
            _SIM.pop()


_SIM = []


def _counted(sim):
    """torch.cuda.synchronize: a wait, counted."""
    def synchronize(device=None):
        sim.counts["sync"] += 1
    return synchronize


def to_cuda(module):
    """Every parameter and buffer of `module` moved to the simulated device, in place."""
    sim = _SIM[-1]
    for m in module.modules():
        for k, p in m._parameters.items():
            if p is not None and p.device.type != "cuda":
                if not isinstance(p, FakeTensor):
                    with _disable_current_modes():  # p itself never meets the mode (its memo
                        copy = p.detach().clone()  # would hold a weak reference, blocking the swap)
                fake = p if isinstance(p, FakeTensor) else sim.from_tensor(copy)
                new = torch.nn.Parameter(fake.to(CUDA), requires_grad=p.requires_grad)
                # A new Parameter (a fake one cannot be swapped in): lists of the old one, as
                # patch()'s parameter groups, are mapped by moved().
                m._parameters[k] = sim.moved_to[id(p)] = new
        for k, b in m._buffers.items():
            if b is not None and b.device.type != "cuda":
                m._buffers[k] = (b if isinstance(b, FakeTensor) else sim.from_tensor(b)).to(CUDA)
    return module

def backward(tensor, gradient=None, *unused_args, **unused_kwargs):
    """
    Tensor.backward on the simulated device: the autograd engine refuses to run without a real
    accelerator, so this walks the graph itself, calling each node's backward function in
    dependency order (so backward's own dtype and device rules run), and accumulates into .grad.
    """
    root = tensor.grad_fn
    if gradient is None:
        gradient = torch.ones_like(tensor)
    deps, stack, seen = collections.Counter(), [root], {root}
    while stack:
        for nxt, _ in stack.pop().next_functions:
            if nxt is not None:
                deps[nxt] += 1
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
    buffers, ready = {root: [gradient]}, [root]
    # One graph task for the whole walk, as the engine's: checkpointing recomputes a block once per
    # task (outside one it would recompute at every saved tensor it unpacks).
    task = mock.patch.object(torch._C, "_current_graph_task_id", return_value=id(root))
    with task:
        _walk(buffers, ready, deps)


def _walk(buffers, ready, deps):
    """backward's loop: each node called once all the gradients it receives are summed."""
    while ready:
        node = ready.pop()
        grads = buffers.pop(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            var = node.variable
            if grads[0] is not None:
                var.grad = grads[0] if var.grad is None else var.grad + grads[0]
            continue
        outs = node(*grads)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for (nxt, index), g in zip(node.next_functions, outs, strict=True):
            if nxt is None:
                continue
            buf = buffers.setdefault(nxt, [None] * len(nxt._input_metadata))
            if g is not None:
                g = _as_input(g, nxt._input_metadata[index], node)
                buf[index] = g if buf[index] is None else buf[index] + g
            deps[nxt] -= 1
            if deps[nxt] == 0:
                ready.append(nxt)


def _as_input(grad, meta, node):
    """The engine's validate_outputs: a gradient summed to its input's shape and cast to its dtype;
    one on another device is an error (a 0-dim CPU tensor aside, as on CUDA)."""
    if grad.device != meta.device and not (grad.device.type == "cpu" and grad.dim() == 0):
        raise RuntimeError(f"{node.name()}: a gradient on {grad.device} for an input on {meta.device}")
    if tuple(grad.shape) != tuple(meta.shape):
        grad = grad.sum_to_size(meta.shape)
    return grad.to(meta.dtype) if grad.dtype != meta.dtype else grad
