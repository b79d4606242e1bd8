"""diffusion.py against DiT's create_diffusion on the tiny golden DiT, for both schedules."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import rel_err
from diffusion import create_diffusion, dit_sample, get_named_beta_schedule, space_timesteps
from model_dit import DiT


GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="module")
def setup():
    f = safe_open(str(GOLDEN / "dit_tiny.safetensors"), "pt")
    model = DiT(**json.loads(f.metadata()["config"])).eval()
    model.load_state_dict({k[6:]: f.get_tensor(k) for k in f.keys() if k.startswith("state.")})
    g = safe_open(str(GOLDEN / "diffusion_dit.safetensors"), "pt")
    return model, {k: g.get_tensor(k) for k in g.keys()}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_betas_and_training_losses(setup, schedule):
    model, G = setup
    diffusion = create_diffusion("", schedule)
    assert rel_err(torch.from_numpy(diffusion.betas), G[f"{schedule}.betas"]) <= 1e-12
    with torch.no_grad():
        terms = diffusion.training_losses(model, G["x0"], G["t"], dict(y=G["y"]), noise=G["noise"])
    for k in ("loss", "mse", "vb"):  # t = 0 (decoder NLL), 400 and 999 (KL terms)
        assert rel_err(terms[k], G[f"{schedule}.train.{k}"]) <= 1e-5, k


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_respaced_p_mean_variance(setup, schedule):
    model, G = setup
    diffusion = create_diffusion("250", schedule)
    assert diffusion.timestep_map == G[f"{schedule}.respaced250.timestep_map"].tolist()
    x_t = create_diffusion("", schedule).q_sample(G["x0"], torch.full((3,), 999), G["noise"])
    assert rel_err(x_t, G[f"{schedule}.respaced250.x_t"]) <= 1e-6
    for step in (249, 120, 0):
        with torch.no_grad():
            out = diffusion.p_mean_variance(model, x_t, torch.full((3,), step), clip_denoised=False,
                                            model_kwargs=dict(y=G["y"]))
        for k in ("mean", "variance", "log_variance", "pred_xstart"):
            assert rel_err(out[k], G[f"{schedule}.respaced250.step{step}.{k}"]) <= 1e-5, (step, k)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim10_sample(setup, schedule):
    model, G = setup
    diffusion = create_diffusion("ddim10", schedule)
    assert diffusion.timestep_map == G[f"{schedule}.ddim10.timestep_map"].tolist()
    out = diffusion.ddim_sample_loop(model, G["noise"].shape, G["noise"], clip_denoised=False,
                                     model_kwargs=dict(y=G["y"]), eta=0.0)
    assert rel_err(out, G[f"{schedule}.ddim10.eta0.sample"]) <= 1e-5


def test_space_timesteps_forms():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert sorted(space_timesteps(100, "10,5"))[:3] == [0, 5, 11] and len(space_timesteps(100, "10,5")) == 15
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim600")  # strides 1 and 2 give 1000 and 500 steps


def test_guided_sampling_is_seeded_and_uses_the_null_class(setup):
    model, G = setup
    z, y = G["noise"][:2], torch.tensor([3, 7])
    diffusion = create_diffusion("ddim10", "linear")
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(dit_sample(model, diffusion, z, y, cfg_scale=4.0))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == z.shape
    # With the null class as the label, guidance is the identity (cond == uncond): DDIM (eta 0) and
    # DDPM with per-image noise give the unguided samples.
    null = torch.full((2,), 10)

    def per_image(x):
        return torch.stack([torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(i))
                            for i in range(len(x))])
    for eta, noise_fn in ((0.0, None), (None, per_image)):
        guided = dit_sample(model, diffusion, z, null, cfg_scale=4.0, eta=eta, noise_fn=noise_fn)
        plain = dit_sample(model, diffusion, z, null, cfg_scale=1.0, eta=eta, noise_fn=noise_fn)
        assert rel_err(guided, plain) <= 1e-5


def test_bits_per_dim_equals_the_sum_of_its_terms(setup):
    """calc_bpd_loop: total = prior + sum of the per-timestep terms, each term equal to training_losses' vb."""
    model, G = setup
    diffusion = create_diffusion("10", "cosine")  # 10 steps keeps the test fast; the bound is exact for them
    x0 = G["x0"].clamp(-1, 1)
    torch.manual_seed(0)
    out = diffusion.calc_bpd_loop(model, x0, clip_denoised=False, model_kwargs=dict(y=G["y"]))
    assert out["vb"].shape == (3, 10) and out["mse"].shape == (3, 10)
    assert torch.allclose(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"])
    # Re-draw the noise calc_bpd_loop used at t = 3 (timesteps run 9 .. 0) and recompute that term.
    torch.manual_seed(0)
    noises = [torch.randn_like(x0) for _ in range(10)][::-1]
    terms = diffusion.training_losses(model, x0, torch.full((3,), 3), dict(y=G["y"]), noise=noises[3])
    assert rel_err(out["vb"][:, 3], terms["vb"]) <= 1e-5
    assert (out["prior_bpd"] >= 0).all() and np.isfinite(out["total_bpd"].numpy()).all()
    # Timesteps stacked into one forward (4, 4 and 2 of the 10): the same noise in the same order,
    # so the same terms up to a float32 sum's rounding over a larger batch
    torch.manual_seed(0)
    chunked = diffusion.calc_bpd_loop(model, x0, clip_denoised=False, model_kwargs=dict(y=G["y"]),
                                      chunk=4)
    for key in ("vb", "mse", "xstart_mse", "total_bpd"):
        assert rel_err(chunked[key], out[key]) <= 1e-5, key


def test_sd_schedulers_equal_diffusers_pndm_and_ddim():
    """diffusers' PNDMScheduler (skip_prk_steps) and DDIMScheduler, 10 steps, eps from the tiny golden UNet."""
    from diffusion import sd_sample, sd_timesteps
    from model_unet import SD_TINY, UNetModel
    with safe_open(GOLDEN / "sd_schedulers.safetensors", "pt") as f:
        g = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(f.metadata()["scheduler_config"])
    assert config["beta_schedule"] == "scaled_linear" and config["skip_prk_steps"] and not config["set_alpha_to_one"]
    alphas_cumprod = np.cumprod(1 - get_named_beta_schedule("scaled_linear"))
    assert np.abs(alphas_cumprod / g["alphas_cumprod"].double().numpy() - 1).max() < 1e-5  # measured 1.5e-7
    with safe_open(GOLDEN / "unet_tiny.safetensors", "pt") as f:
        unet = UNetModel(**SD_TINY).eval()
        prefix = "ldm.model.diffusion_model."
        unet.load_state_dict({k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith("ldm.")})
        context = f.get_tensor("context")

    def eps_fn(x, t):
        return unet(x, torch.full((len(x),), t, dtype=torch.long), context)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny UNet runs several times faster on one thread than on two contended ones
    for sampler in ("pndm", "ddim"):
        assert sd_timesteps(10, sampler) == g[f"{sampler}.timesteps"].tolist()
        out = sd_sample(eps_fn, g["init"], 10, sampler)
        ref = g[f"{sampler}.final"]
        assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-5, sampler  # measured 5.3e-7 for both
    torch.set_num_threads(threads)


def test_create_diffusion_keeps_dits_arguments_and_refuses_what_would_do_nothing(setup):
    """
    DiT's create_diffusion arguments: use_kl trains on the bound alone (times the steps), sigma_small
    fixes the variance at beta_tilde_t, predict_xstart makes the output x_0, rescale_learned_sigmas
    weights the vb term by steps / 1000; an argument that would be ignored is refused.
    """
    model, G = setup
    x0, t, noise, kwargs = G["x0"], torch.tensor([0, 200, 499]), G["noise"], dict(y=G["y"])
    with torch.no_grad():
        losses = {}
        for name, options in (("hybrid", {}), ("kl", dict(use_kl=True)),
                              ("rescaled", dict(rescale_learned_sigmas=True))):
            diffusion = create_diffusion("", diffusion_steps=500, **options)
            losses[name] = diffusion.training_losses(model, x0, t, kwargs, noise)
    hybrid, kl, rescaled = losses["hybrid"], losses["kl"], losses["rescaled"]
    assert rel_err(kl["loss"], hybrid["vb"] * 500) <= 1e-6 and set(kl) == {"loss"}
    assert rel_err(rescaled["vb"], hybrid["vb"] / 2) <= 1e-6
    assert rel_err(rescaled["loss"], hybrid["mse"] + hybrid["vb"] / 2) <= 1e-6

    out = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))

    def fixed(x, t):  # a model whose output is known: `out` for any input
        return out
    steps = torch.tensor([0, 1, 500])
    for sigma_small in (False, True):
        d = create_diffusion("", sigma_small=sigma_small, learn_sigma=False)
        p = d.p_mean_variance(fixed, x0, steps, clip_denoised=False)
        post = torch.from_numpy(d.posterior_variance)[steps].float()
        large = torch.from_numpy(np.append(d.posterior_variance[1], d.betas[1:]))[steps].float()
        expected = post if sigma_small else large  # FIXED_SMALL: 0 at t = 0, its log clipped
        assert torch.equal(p["variance"][:, 0, 0, 0], expected)
        assert torch.allclose(p["log_variance"][:, 0, 0, 0], expected.clamp(min=post[1]).log())
    xstart = create_diffusion("", predict_xstart=True, learn_sigma=False)
    p = xstart.p_mean_variance(fixed, x0, steps, clip_denoised=False)
    assert torch.equal(p["pred_xstart"], out)  # the output is x_0 itself
    losses = xstart.training_losses(fixed, x0, steps, noise=noise)
    assert rel_err(losses["mse"], ((out - x0) ** 2).mean(dim=(1, 2, 3))) <= 1e-6  # target x_0

    with pytest.raises(ValueError, match="sigma_small .* needs learn_sigma=False"):
        create_diffusion("", sigma_small=True)
    for bad in (dict(learn_sigma=False), dict(use_kl=True)):
        with pytest.raises(ValueError, match="rescale_learned_sigmas"):
            create_diffusion("", rescale_learned_sigmas=True, **bad)
