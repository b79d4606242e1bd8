"""
The training step, held-out evaluation, the digits FD and the grids and sample sets, traced on a
simulated cuda:0 (tests/cuda_sim.py) under CUDA's autocast rules: any CPU/CUDA mix or dtype
mismatch fails, trained parameters that no gradient reaches are listed, and the host's waits per
training and sampling step are counted.
"""
import argparse
import copy

import pytest
import torch

import digits_fid
import dmp
import sampling
import train
import training
from cuda_sim import simulated_cuda
from diffusion import create_diffusion
from model_dit import DiT
from model_unet import SD_TINY, UNetModel
from test_dmp import CASE_IDS, METHOD_CASES

CUDA = torch.device("cuda")


def step_args(**overrides):
    """What training.train_step reads (train.py's defaults)."""
    return argparse.Namespace(**{**dict(grad_accum=1, importance_coef=1.0, load_coef=1.0, ema=0.99,
                                        lr=1e-4, weight_decay=0.0),
                                 **overrides})


def small_dit(**kwargs):
    """A one-block DiT: the simulation's cost is per operation, not per number."""
    torch.manual_seed(0)
    config = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                  num_classes=10, class_dropout_prob=0.1)
    return DiT(**{**config, **kwargs})


def batch_on_cuda(n=4, text_dim=None):
    x, t = torch.randn(n, 4, 8, 8, device=CUDA), torch.randint(0, 1000, (n,), device=CUDA)
    y = torch.randn(n, text_dim, device=CUDA) if text_dim else torch.randint(0, 10, (n,), device=CUDA)
    return x, y, t, torch.randn(n, 4, 8, 8, device=CUDA)


def traced_steps(model, groups, precision, args, batch_of, steps=1, condition=training.class_labels):
    """
    `steps` training steps as train.py runs them on the simulated GPU: the host's waits in each, and
    the trained parameters no gradient reached.
    """
    with simulated_cuda() as sim:
        model.to(CUDA).train()
        groups = [dict(g, params=sim.moved(g["params"])) for g in groups]
        opt = training.optimizer(groups, args)
        ema = copy.deepcopy(model).requires_grad_(False)
        autocast, scaler = training.mixed_precision(precision, CUDA)
        diffusion = create_diffusion("", "linear", learn_sigma=getattr(model, "learn_sigma", False))
        losses, syncs = train.LossMeter(0, CUDA), []
        for _ in range(steps):
            batch = batch_of()
            sim.counts.clear()
            losses.add(training.train_step(model, model, diffusion, opt, batch, args, autocast, scaler,
                                           condition=condition, ema=training.ema_pairs(ema, model)))
            syncs.append(sim.counts["sync"])
        names = {id(p): n for n, p in model.named_parameters()}
        trained = [p for g in groups for p in g["params"]]
        assert all(id(p) in names and p.device.type == "cuda" for p in trained)  # what opt steps
        missed = [names[id(p)] for p in trained if p.grad is None]
    return syncs, missed


# Hard selection's load: torch.distributions.Normal checks cdf's argument (one wait per forward).
HARD_SYNCS = 1


@pytest.mark.parametrize("method, options", METHOD_CASES, ids=CASE_IDS)
def test_train_step_of_every_method_on_the_simulated_gpu(method, options):
    model = small_dit()
    groups = dmp.patch(model, method, **options)
    syncs, missed = traced_steps(model, groups, "bf16", step_args(), batch_on_cuda)
    expected = HARD_SYNCS if options.get("selection") == "hard" else 0
    assert syncs == [expected]
    assert missed == []


@pytest.mark.parametrize("precision, selection, accum, checkpointing", [
    ("fp16", "hard", 1, False), ("bf16", "hard", 2, True), ("fp16", "soft", 2, False)])
def test_train_step_precisions_accumulation_checkpointing(precision, selection, accum, checkpointing):
    model = small_dit().set_checkpointing(checkpointing)
    groups = dmp.patch(model, "dmp", selection=selection, noisy_gate=True)
    syncs, missed = traced_steps(model, groups, precision, step_args(grad_accum=accum), batch_on_cuda,
                                 steps=2)
    # fp16: GradScaler.step reads whether a gradient overflowed (one wait per step)
    expected = (precision == "fp16") + accum * HARD_SYNCS * (selection == "hard")
    assert syncs == [expected] * 2 and missed == []


def test_train_step_of_the_text_dit_and_the_unet():
    model = small_dit(text_dim=16, num_classes=1, class_dropout_prob=0.0)
    groups = dmp.patch(model, "dmp", gate_cond="t+c")
    syncs, missed = traced_steps(model, groups, "bf16", step_args(), lambda: batch_on_cuda(text_dim=16))
    assert syncs == [0] and missed == []

    torch.manual_seed(0)
    unet = UNetModel(**SD_TINY)
    groups = dmp.patch(unet, "dmp", grid=4, gate_cond="t+c", noisy_gate=True)

    def unet_batch():
        x, _, t, noise = batch_on_cuda(2)
        return x, dict(context=torch.randn(2, 5, SD_TINY["context_dim"], device=CUDA)), t, noise
    syncs, missed = traced_steps(unet, groups, "bf16", step_args(), unet_batch, steps=1)
    assert syncs == [0] and missed == []


def sampling_syncs(run):
    """The host's waits per sampling step: run(steps)'s count at 3 steps less at 2."""
    counts = []
    for steps in (2, 3):
        with simulated_cuda() as sim:
            run(steps)
            counts.append(sim.counts["sync"])
    return counts[1] - counts[0]


def test_grids_and_sampling_on_the_simulated_gpu(tmp_path):
    model = small_dit(in_channels=3)

    def grid(steps):  # train.py's grid writer (sampling.write_grid), as grid_writer sets it
        sampling.write_grid(model.to(CUDA), tmp_path / "grid.png", vae="none", num=4, steps=steps,
                            sampler="ddim", device=CUDA)
    assert sampling_syncs(grid) == 0

    def dit_batch(steps):  # sample.py's FID set (sampling.dit_batch), guided, bf16
        diffusion = sampling.make_diffusion("ddpm", steps, "linear")
        sampling.dit_batch([0, 1], model.to(CUDA), diffusion, cfg_scale=4.0, bf16=True)
    assert sampling_syncs(dit_batch) == 0


def test_digits_generation_and_heldout_evaluation_on_the_simulated_gpu():
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                num_classes=1, class_dropout_prob=0.0)

    def generate(steps):  # --eval-fd's samples
        x = digits_fid.generate(model.to(CUDA), 4, steps)
        assert x.device.type == "cpu" and x.shape == (4, 1, 8, 8)
    assert sampling_syncs(generate) == 0
