"""
The training step, held-out evaluation, the digits FD and the grids and sample sets, traced on a
simulated cuda:0 (tests/cuda_sim.py) under CUDA's autocast rules: any CPU/CUDA mix or dtype
mismatch fails, trained parameters that no gradient reaches are listed, and the host's waits per
training and sampling step are counted.
"""
import argparse

import pytest
import torch

import digits_fid
import heldout
import dmp
import runs
import sampling
import settings
import train
import training
from cuda_sim import simulated_cuda
from diffusion import create_diffusion
from model_dit import DiT, TimestepEmbedder
from model_unet import SD_TINY, UNetModel
from test_dmp import CASE_IDS, METHOD_CASES

CUDA = torch.device("cuda")
# SD's UNet with every kind of block (ResBlock, transformer, down- and upsampler, skips) once or
# twice: 9 blocks instead of sd-tiny's 25
SIM_UNET = dict(SD_TINY, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1])


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
        opt = training.optimizer(groups, args.lr, args.weight_decay)
        ema = training.EMA(model, args.ema)
        autocast, scaler = training.mixed_precision(precision, CUDA)
        diffusion = create_diffusion("", "linear", learn_sigma=getattr(model, "learn_sigma", False))
        losses, syncs = runs.LossMeter(0, CUDA), []
        for _ in range(steps):
            batch = batch_of()
            sim.counts.clear()
            losses.add(training.train_step(model, opt, batch, diffusion, condition=condition,
                                           importance_coef=args.importance_coef, load_coef=args.load_coef,
                                           grad_accum=args.grad_accum, autocast=autocast, scaler=scaler, ema=ema))
            syncs.append(sim.counts["sync"])
        names = {id(p): n for n, p in model.named_parameters()}
        trained = [p for g in groups for p in g["params"]]
        assert all(id(p) in names and p.device.type == "cuda" for p in trained)  # what opt steps
        missed = [names[id(p)] for p in trained if p.grad is None]
    return syncs, missed


# Hard selection's load: its normal cdf validates no argument (torch.distributions' check was one
# wait per forward).
HARD_SYNCS = 0


# test_dmp's cases, less those that differ from another only in a learning rate or LoRA's rank
LR_OR_RANK = {"lr_scale", "gate_lr_scale", "rank", "alpha"}
SIM_CASES = [(c, i) for c, i in zip(METHOD_CASES, CASE_IDS, strict=True)
             if not c[1] or not set(c[1]) <= LR_OR_RANK]


@pytest.mark.parametrize("method, options", [c for c, _ in SIM_CASES], ids=[i for _, i in SIM_CASES])
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
    unet = UNetModel(**SIM_UNET)
    groups = dmp.patch(unet, "dmp", prompt_grid=4, gate_cond="t+c", noisy_gate=True)

    def unet_batch():
        x, _, t, noise = batch_on_cuda(2)
        return x, dict(context=torch.randn(2, 5, SD_TINY["context_dim"], device=CUDA)), t, noise
    # What each block reads under bf16 autocast: DMP's fp32 sum, so a small prompt term is kept
    read = []
    for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks]:
        block.register_forward_pre_hook(lambda block, args: read.append(args[0].dtype))
    syncs, missed = traced_steps(unet, groups, "bf16", step_args(), unet_batch, steps=1)
    assert syncs == [0] and missed == []
    assert read == [torch.float32] * 9


def sampling_syncs(run):
    """
    The host's waits in each sampling step of run(3) (3 steps): those between one evaluation of the
    denoiser (a DiT's timestep embedding, SD's UNet) and the next, a blocking copy to the device (a
    step's noise from pageable memory) counted as one, except in the first step, where the
    schedule's arrays go to the device once (diffusion._extract keeps them there).
    """
    with simulated_cuda() as sim:
        seen = []

        def denoiser_called(module, args):
            if isinstance(module, (TimestepEmbedder, UNetModel)):
                seen.append((sim.counts["sync"], sim.counts["h2d_blocking"]))
        hook = torch.nn.modules.module.register_module_forward_pre_hook(denoiser_called)
        try:
            run(3)
        finally:
            hook.remove()
    assert len(seen) == 3
    (s0, _), (s1, c1), (s2, c2) = seen
    return [s1 - s0, s2 - s1 + c2 - c1]


def test_grids_and_sampling_on_the_simulated_gpu(tmp_path):
    model = small_dit(in_channels=3)

    def grid(steps):  # train.py's grid writer (sampling.write_grid), as grid_writer sets it
        sampling.write_grid(model.to(CUDA), tmp_path / "grid.png", vae="none", num=4, steps=steps,
                            sampler="ddim", device=CUDA)
    assert sampling_syncs(grid) == [0, 0]

    def dit_batch(steps):  # sample.py's FID set (sampling.dit_batch), guided, bf16
        diffusion = sampling.make_diffusion("ddpm", steps, "linear")
        sampling.dit_batch([0, 1], model.to(CUDA), diffusion, cfg_scale=4.0, bf16=True)
    assert sampling_syncs(dit_batch) == [0, 0]


def test_digits_generation_and_heldout_evaluation_on_the_simulated_gpu():
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                num_classes=1, class_dropout_prob=0.0)

    def generate(steps):  # --eval-fd's samples
        x = digits_fid.generate(model.to(CUDA), 4, steps)
        assert x.device.type == "cpu" and x.shape == (4, 1, 8, 8)
    assert sampling_syncs(generate) == [0, 0]


def test_sample_py_grid_and_fid_set_on_the_simulated_gpu(tmp_path):
    """sample.py as a user runs it on a GPU (its default device there), bf16, guided."""
    import sample
    from test_sample import save_run, tiny_dit
    ckpt = save_run(tiny_dit(depth=1), tmp_path / "tiny.pt")

    def fid_set(steps):
        out = tmp_path / f"set{steps}"
        sample.main(["--ckpt", ckpt, "--steps", str(steps), "--num-samples", "2", "--batch-size", "2",
                     "--out", str(out), "--precision", "bf16", "--cfg-scale", "1.5"])
        assert len(list(out.glob("*.png"))) == 2

    def grid(steps):
        sample.main(["--ckpt", ckpt, "--steps", str(steps), "--grid", "2", "--out",
                     str(tmp_path / f"grid{steps}.png"), "--cfg-scale", "1.5"])
    assert sampling_syncs(fid_set) == [0, 0]
    assert sampling_syncs(grid) == [0, 0]


def test_heldout_evaluation_on_the_simulated_gpu():
    """
    train.py's --eval-every numbers (heldout.evaluate) on the demo's digits, and with --augment
    (the held-out digits' fixed draws, a training batch's fresh ones: generators and grid_sample
    on the device).
    """
    args = settings.parse_args(["--dataset", "demo", "--device", "cuda", "--batch-size", "8"])
    data, train_rows, rows = train.training_data(args, 1)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                num_classes=1, class_dropout_prob=0.0)
    for augment in (False, True):
        args.augment = augment
        with simulated_cuda():
            out = heldout.evaluate(model.to(CUDA), create_diffusion("", "cosine"), data, rows[:8], args, CUDA)
            x, *_ = training.get_batch(data, train_rows, 0, args, CUDA)
        assert "heldout_loss" in out and x.device.type == "cuda" and x.shape == (8, 1, 8, 8)

    def bpd(steps):  # --eval-bpd's bound (1000 steps in evaluate; `steps` here)
        x, y = data.batch(rows[:2], False, device=CUDA)
        create_diffusion(str(steps), "cosine").calc_bpd_loop(model.to(CUDA).eval(), x, clip_denoised=False,
                                                            model_kwargs=dict(y=y * 0))
    assert sampling_syncs(bpd) == [0, 0]


def test_text_and_sd_grids_on_the_simulated_gpu(tmp_path):
    """A text DiT's grid and SD's (train.py's and sample.py's), bf16, with the tiny CLIP and VAE."""
    from model_clip import CLIP_TINY, CLIPTextModel
    from model_vae import AutoencoderKL
    torch.manual_seed(0)
    clip = CLIPTextModel(**CLIP_TINY).eval()
    text_dit = small_dit(in_channels=3, text_dim=CLIP_TINY["hidden_size"], num_classes=1,
                         class_dropout_prob=0.0)

    def text_grid(steps):
        sampling.write_grid(text_dit.to(CUDA), tmp_path / "text.png", vae="none", num=2, steps=steps,
                            sampler="ddim", device=CUDA, prompts=["a", "b"],
                            text_encoder=clip.to(CUDA), cfg_scale=2.0)
    assert sampling_syncs(text_grid) == [0, 0]

    unet = UNetModel(**SIM_UNET).eval()
    dmp.patch(unet, "dmp", prompt_grid=4, gate_cond="t+c")
    vae = AutoencoderKL(dict(double_z=True, z_channels=4, resolution=8, in_channels=3, out_ch=3, ch=32,
                             ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[])).eval()

    def sd_grid(steps):
        sampling.write_sd_grid(unet.to(CUDA), clip.to(CUDA), vae.to(CUDA), tmp_path / "sd.png",
                               ["a", "b"], num=2, steps=steps, resolution=8, bf16=True, sampler="ddim")
    assert sampling_syncs(sd_grid) == [0, 0]
