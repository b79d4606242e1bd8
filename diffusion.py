"""
The Gaussian diffusion DiT trains and samples with, equal to facebookresearch/DiT's diffusion/
package (itself OpenAI's improved-diffusion / guided-diffusion code), in one file.

References cited at the functions that implement them:
  DDPM   Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models"
  IDDPM  Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models"
  DDIM   Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models"
  CFG    Ho & Salimans 2022, "Classifier-Free Diffusion Guidance"
  PNDM   Liu, Ren, Lin & Zhao 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"

The model predicts the noise eps and, with learn_sigma, a value v in [-1, 1] per pixel that
interpolates the log-variance between the posterior variance and beta_t (IDDPM Eq. 15). Schedule
arrays are float64 numpy, as in the official code, and each value is cast to float32 when it meets a
tensor.
"""
import functools
import math

import numpy as np
import torch
from tqdm import tqdm


#################################################################################
#                          Beta Schedules and Respacing                         #
#################################################################################

def get_named_beta_schedule(name, num_diffusion_timesteps=1000):
    """'linear' (DDPM, scaled so any step count matches 1000 steps) or 'cosine' (IDDPM Eq. 17, DiT's
    squaredcos_cap_v2)."""
    if name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
    if name in ("cosine", "squaredcos_cap_v2"):
        def alpha_bar(t):  # IDDPM Eq. 17, with t in [0, 1]
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        n = num_diffusion_timesteps  # betas clipped at 0.999 against the singularity at t = T
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return np.array(betas, dtype=np.float64)
    if name == "scaled_linear":  # SD's (ldm's "linear"): linear in sqrt(beta), 0.00085 -> 0.012
        n = num_diffusion_timesteps
        return np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=np.float64) ** 2
    raise ValueError(f"unknown beta schedule {name!r}: use 'linear', 'cosine' or 'scaled_linear'")


def space_timesteps(num_timesteps, section_counts):
    """
    Which of the original steps to keep (IDDPM Sec. 4.4). "250": 250 evenly strided steps;
    "10,15,20": that many steps in each third; "ddim25": the integer stride that gives exactly 25
    steps, as in DDIM.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired_count = int(section_counts[len("ddim"):])
            for i in range(1, num_timesteps):
                if len(range(0, num_timesteps, i)) == desired_count:
                    return set(range(0, num_timesteps, i))
            raise ValueError(f"cannot create exactly {desired_count} steps with an integer stride")
        section_counts = [int(x) for x in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide section of {size} steps into {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        all_steps += [start_idx + round(frac_stride * j) for j in range(section_count)]
        start_idx += size
    return set(all_steps)


def create_diffusion(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False,
                     diffusion_steps=1000):
    """
    DiT's create_diffusion, with its arguments: "" (or None) trains on all diffusion_steps, "250" or
    "ddim25" respaces for sampling. use_kl trains on the variational bound alone (times the number
    of steps, the official RESCALED_KL); sigma_small fixes the variance at the posterior's
    beta_tilde_t instead of beta_t (learn_sigma=False only); predict_xstart makes the model predict
    x_0 instead of the noise; rescale_learned_sigmas weights the vb term by steps / 1000 (the
    official RESCALED_MSE). A combination in which an argument would do nothing is refused.
    """
    if sigma_small and learn_sigma:
        raise ValueError("sigma_small chooses a fixed variance, so it needs learn_sigma=False")
    if rescale_learned_sigmas and (use_kl or not learn_sigma):
        raise ValueError("rescale_learned_sigmas weights the vb term of the hybrid loss, so it "
                         "needs learn_sigma=True and use_kl=False")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    use = space_timesteps(diffusion_steps, timestep_respacing or [diffusion_steps])
    # Respacing keeps alpha_bar at the kept steps and recomputes the betas between them (IDDPM Sec.
    # 4.4).
    alphas_cumprod, last, new_betas, timestep_map = np.cumprod(1.0 - betas), 1.0, [], []
    for i, alpha_cumprod in enumerate(alphas_cumprod):
        if i in use:
            new_betas.append(1 - alpha_cumprod / last)
            last = alpha_cumprod
            timestep_map.append(i)
    if use_kl:
        loss = "rescaled_kl"
    elif rescale_learned_sigmas:
        loss = "rescaled_mse"
    else:
        loss = "mse"
    return GaussianDiffusion(np.array(new_betas), learn_sigma=learn_sigma,
                             timestep_map=timestep_map, predict_xstart=predict_xstart,
                             sigma_small=sigma_small, loss=loss)


#################################################################################
#                               Gaussian Diffusion                              #
#################################################################################

class GaussianDiffusion:
    """
    q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), the model's p(x_{t-1} | x_t), the hybrid
    training loss, DDPM / DDIM sampling and the variational bound in bits per dimension.

    timestep_map: for a respaced diffusion, the original timestep of each of its steps; the model is
    always called with original timesteps (the official _WrappedModel). predict_xstart: the model
    predicts x_0 (the official START_X) instead of the noise (EPSILON). sigma_small: without
    learn_sigma, the fixed variance is beta_tilde_t (FIXED_SMALL) instead of beta_t (FIXED_LARGE).
    loss: 'mse' (the hybrid loss), 'rescaled_mse' (its vb term times steps / 1000) or 'rescaled_kl'
    (the bound alone, times steps).
    """
    def __init__(self, betas, learn_sigma=True, timestep_map=None, predict_xstart=False,
                 sigma_small=False, loss="mse"):
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        assert (betas > 0).all() and (betas <= 1).all()
        assert loss in ("mse", "rescaled_mse", "rescaled_kl")
        self.num_timesteps = len(betas)
        self.learn_sigma, self.predict_xstart, self.loss = learn_sigma, predict_xstart, loss
        if timestep_map is None:
            timestep_map = range(self.num_timesteps)
        self.timestep_map = list(timestep_map)
        self._tensors = {}

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t): DDPM Eqs. 6-7.
        ac, ac_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        self.posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The variance is 0 at t = 0, so its log is clipped to the value at t = 1.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1],
                                                               self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)
        self.log_betas = np.log(betas)
        # Without learn_sigma the variance is fixed (DDPM Sec. 3.2): to beta_t ("fixed large", with
        # beta_tilde_1 at t = 0) or, with sigma_small, to beta_tilde_t ("fixed small").
        if sigma_small:
            self.fixed_variance = self.posterior_variance
            self.fixed_log_variance = self.posterior_log_variance_clipped
        else:
            self.fixed_variance = np.append(self.posterior_variance[1], betas[1:])
            self.fixed_log_variance = np.log(self.fixed_variance)

    def _extract(self, name, t, shape):
        """The schedule array `name` at timesteps t, as float32, broadcastable to `shape` (kept on
        t's device)."""
        key = (name, t.device)
        if key not in self._tensors:
            self._tensors[key] = torch.from_numpy(getattr(self, name)).to(t.device)
        return self._tensors[key][t].float().view(-1, *([1] * (len(shape) - 1)))

    def _model(self, model, x, t, model_kwargs):
        """The model's output at the original timesteps of the steps t (the official
        _WrappedModel)."""
        key = ("timestep_map", t.device)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(self.timestep_map, device=t.device)
        return model(x, self._tensors[key][t], **(model_kwargs or {}))

    # ---- the forward process ---------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I): DDPM Eq. 4."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
        variance = 1.0 - self._extract("alphas_cumprod", t, x_start.shape)
        return mean, variance, self._extract("log_one_minus_alphas_cumprod", t, x_start.shape)

    def q_sample(self, x_start, t, noise=None):
        """Sample x_t ~ q(x_t | x_0) by reparameterisation: DDPM Eq. 4."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (self._extract("sqrt_alphas_cumprod", t, x_start.shape) * x_start
                + self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.shape) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0): DDPM Eqs. 6-7."""
        mean = (self._extract("posterior_mean_coef1", t, x_t.shape) * x_start
                + self._extract("posterior_mean_coef2", t, x_t.shape) * x_t)
        return (mean, self._extract("posterior_variance", t, x_t.shape),
                self._extract("posterior_log_variance_clipped", t, x_t.shape))

    # ---- the reverse process ---------------------------------------------------------------------

    def p_mean_variance(self, model, x, t, clip_denoised=True, model_kwargs=None):
        """
        p(x_{t-1} | x_t): the model's eps gives x_0 (DDPM Eq. 11 rearranged; with predict_xstart the
        model gives x_0 itself), whose posterior mean is the mean; the variance is
        exp(v log beta_t + (1 - v) log beta_tilde_t) with v = (out + 1) / 2 (IDDPM Eq. 15).
        """
        C = x.shape[1]
        model_output = self._model(model, x, t, model_kwargs)
        if self.learn_sigma:
            model_output, model_var_values = torch.split(model_output, C, dim=1)
            min_log = self._extract("posterior_log_variance_clipped", t, x.shape)
            max_log = self._extract("log_betas", t, x.shape)
            frac = (model_var_values + 1) / 2
            model_log_variance = frac * max_log + (1 - frac) * min_log
            model_variance = torch.exp(model_log_variance)
        else:
            zeros = torch.zeros_like(x)
            model_log_variance = self._extract("fixed_log_variance", t, x.shape) + zeros
            model_variance = self._extract("fixed_variance", t, x.shape) + zeros
        if self.predict_xstart:
            pred_xstart = model_output
        else:
            pred_xstart = self._predict_xstart_from_eps(x, t, model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return dict(mean=model_mean, variance=model_variance, log_variance=model_log_variance,
                    pred_xstart=pred_xstart)

    def _predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 from x_t and the noise: DDPM Eq. 4 solved for x_0."""
        return (self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t
                - self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape) * eps)

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """The noise from x_t and x_0: DDPM Eq. 4 solved for eps."""
        return ((self._extract("sqrt_recip_alphas_cumprod", t, x_t.shape) * x_t - pred_xstart)
                / self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.shape))

    # ---- training --------------------------------------------------------------------------------

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """
        The hybrid loss of IDDPM Sec. 3.1, per sample: mse = |eps - eps_theta|^2 (DDPM Eq. 14,
        L_simple), plus, with learn_sigma, vb = the variational bound term L_t for the variance
        only: the predicted mean is detached, so the vb term trains the variance and L_simple trains
        the mean. loss = mse + vb (lambda = 1 with 1000 steps, as the official "rescaled" weighting
        is off in DiT). With predict_xstart the mse is |x_0 - x_theta|^2; loss 'rescaled_kl' is the
        bound alone, L_t times the steps.
        """
        noise = torch.randn_like(x_start) if noise is None else noise
        x_t = self.q_sample(x_start, t, noise=noise)
        if self.loss == "rescaled_kl":
            vb = self._vb_terms_bpd(model, x_start, x_t, t, clip_denoised=False,
                                    model_kwargs=model_kwargs)["output"]
            return dict(loss=vb * self.num_timesteps)
        model_output = self._model(model, x_t, t, model_kwargs)
        terms = {}
        if self.learn_sigma:
            model_output, model_var_values = torch.split(model_output, x_t.shape[1], dim=1)
            frozen_out = torch.cat([model_output.detach(), model_var_values], dim=1)

            def frozen_mean(*args):  # the variance's output, with the mean's taken as given
                return frozen_out
            vb = self._vb_terms_bpd(frozen_mean, x_start, x_t, t, clip_denoised=False)
            terms["vb"] = vb["output"]
            if self.loss == "rescaled_mse":
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = x_start if self.predict_xstart else noise
        terms["mse"] = mean_flat((target - model_output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None):
        """
        One term of the variational bound, in bits per dimension (IDDPM Eqs. 4-6):
        KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the discretised decoder NLL -log
        p(x_0|x_1) for t = 0.
        """
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised, model_kwargs)
        kl = normal_kl(true_mean, true_log_variance_clipped, out["mean"], out["log_variance"])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"],
                                                           log_scales=0.5 * out["log_variance"])
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return dict(output=torch.where(t == 0, decoder_nll, kl), pred_xstart=out["pred_xstart"])

    # ---- sampling --------------------------------------------------------------------------------

    def p_sample(self, model, x, t, clip_denoised=True, model_kwargs=None, noise=None):
        """One ancestral step x_t -> x_{t-1} (DDPM Algorithm 2), no noise at the last step."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        noise = torch.randn_like(x) if noise is None else noise
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        std = torch.exp(0.5 * out["log_variance"])
        return dict(sample=out["mean"] + nonzero_mask * std * noise, pred_xstart=out["pred_xstart"])

    def ddim_sample(self, model, x, t, clip_denoised=True, model_kwargs=None, eta=0.0, noise=None):
        """One DDIM step (DDIM Eq. 12): eta = 0 is deterministic, eta = 1 has DDPM's variance (DDIM
        Eq. 16)."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.shape)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.shape)
        sigma = (eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * torch.sqrt(1 - alpha_bar / alpha_bar_prev))
        noise = torch.randn_like(x) if noise is None else noise
        mean_pred = (out["pred_xstart"] * torch.sqrt(alpha_bar_prev)
                     + torch.sqrt(1 - alpha_bar_prev - sigma ** 2) * eps)
        nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))
        return dict(sample=mean_pred + nonzero_mask * sigma * noise, pred_xstart=out["pred_xstart"])

    @torch.no_grad()
    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                      device=None, progress=False, eta=None, noise_fn=None):
        """
        Run the reverse process from x_T = noise (or fresh Gaussian noise) to x_0. eta=None: DDPM
        ancestral sampling; eta=float: DDIM with that eta. Use a "ddimN" respacing for DDIM, as the
        official code does. noise_fn(x) draws each step's noise (default randn_like); sample.py uses
        one generator per image so an image does not depend on the batch it was drawn in.
        """
        img = noise if noise is not None else torch.randn(*shape, device=device)
        indices = list(range(self.num_timesteps))[::-1]
        for i in tqdm(indices, desc="sampling", leave=False, disable=not progress):
            t = torch.full((img.shape[0],), i, device=img.device, dtype=torch.long)
            noise = noise_fn(img) if noise_fn is not None else None
            if eta is None:
                out = self.p_sample(model, img, t, clip_denoised, model_kwargs, noise=noise)
            else:
                out = self.ddim_sample(model, img, t, clip_denoised, model_kwargs, eta=eta,
                                       noise=noise)
            img = out["sample"]
        return img

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, model_kwargs=None,
                         device=None, progress=False, eta=0.0, noise_fn=None):
        """p_sample_loop with DDIM steps (eta 0 by default), as the official code names it."""
        return self.p_sample_loop(model, shape, noise, clip_denoised, model_kwargs, device,
                                  progress, eta, noise_fn)

    # ---- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def calc_bpd_loop(self, model, x_start, clip_denoised=True, model_kwargs=None, progress=False,
                      chunk=1):
        """
        The full variational bound in bits per dimension (IDDPM Sec. 2; DDPM Eq. 5): the vb term at
        every timestep plus the prior KL(q(x_T|x_0) || N(0, I)). Also the per-timestep noise MSE,
        which shows where (which band of timesteps) a model is better. Data are assumed scaled to
        [-1, 1] on 256 levels. `chunk` timesteps share one forward, their rows stacked (a small
        model spends 1000 forwards of a few rows on overhead): the noise is drawn in the official
        loop's order (one randn_like per timestep, T-1 first), so the terms are chunk=1's up to the
        rounding of a larger batch.
        """
        n, ones = x_start.shape[0], [1] * (x_start.dim() - 1)
        kwargs = model_kwargs or {}
        vb, xstart_mse, mse = [], [], []
        starts = range(self.num_timesteps - 1, -1, -chunk)
        for first in tqdm(starts, desc="bits/dim", leave=False, disable=not progress):
            k = min(chunk, first + 1)  # timesteps first, first - 1, ..., first - k + 1
            t = torch.arange(first, first - k, -1, device=x_start.device).view(k, 1).expand(k, n)
            t = t.reshape(-1)
            noise = torch.cat([torch.randn_like(x_start) for _ in range(k)])
            x0 = x_start.repeat(k, *ones)
            stacked = {key: v.repeat(k, *[1] * (v.dim() - 1)) if torch.is_tensor(v) else v
                       for key, v in kwargs.items()}
            x_t = self.q_sample(x0, t, noise=noise)
            out = self._vb_terms_bpd(model, x0, x_t, t, clip_denoised, stacked)
            eps = self._predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            vb += out["output"].view(k, n).unbind(0)
            xstart_mse += mean_flat((out["pred_xstart"] - x0) ** 2).view(k, n).unbind(0)
            mse += mean_flat((eps - noise) ** 2).view(k, n).unbind(0)
        # index = timestep
        vb, xstart_mse, mse = (torch.stack(a[::-1], dim=1) for a in (vb, xstart_mse, mse))
        prior_bpd = self._prior_bpd(x_start)
        return dict(total_bpd=vb.sum(dim=1) + prior_bpd, prior_bpd=prior_bpd, vb=vb,
                    xstart_mse=xstart_mse, mse=mse)

    def _prior_bpd(self, x_start):
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension: the bound's prior term."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device,
                       dtype=torch.long)
        qt_mean, _, qt_log_variance = self.q_mean_variance(x_start, t)
        return mean_flat(normal_kl(qt_mean, qt_log_variance, 0.0, 0.0)) / np.log(2.0)


#################################################################################
#                      Guided Sampling (what sample.py calls)                   #
#################################################################################

def dit_sample(model, diffusion, z, y, cfg_scale=1.0, null_class=None, eta=None, progress=False,
               guide_channels=3, noise_fn=None):
    """
    Latents from noise z with labels y (or a text DiT's (N, text_dim) embeddings), as the official
    sample.py does it: with cfg_scale > 1 the batch is doubled with the null class (text: zero rows,
    the null embedding) and guided through model.forward_with_cfg (CFG Eq. 6); DDPM ancestral
    sampling, or DDIM with eta (on a "ddimN" respacing); clip_denoised=False since latents are
    unbounded. noise_fn(x) gives each step's noise for the first len(z) rows; the guided half's copy
    never matters, since forward_with_cfg reads only the first half.
    """
    if cfg_scale > 1.0:
        if y.is_floating_point():  # text embeddings (model_dit.TextEmbedder): zero rows are null
            null = torch.zeros_like(y)
        elif null_class is None:
            null = torch.full_like(y, model.y_embedder.num_classes)
        else:
            null = torch.full_like(y, null_class)
        z = torch.cat([z, z], 0)
        y = torch.cat([y, null], 0)
        model = functools.partial(model.forward_with_cfg, cfg_scale=cfg_scale,
                                  guide_channels=guide_channels)
        if noise_fn is not None:
            noise_fn = functools.partial(_noise_of_first_half, noise_fn)
    out = diffusion.p_sample_loop(model, z.shape, z, clip_denoised=False, model_kwargs=dict(y=y),
                                  progress=progress, eta=eta, noise_fn=noise_fn)
    return out.chunk(2, dim=0)[0] if cfg_scale > 1.0 else out


def _noise_of_first_half(noise_fn, x):
    """A guided batch's step noise: noise_fn's for the first half, repeated for the second."""
    return noise_fn(x[: len(x) // 2]).repeat(2, *([1] * (x.ndim - 1)))


#################################################################################
#            Stable Diffusion's samplers: PNDM (PLMS) and DDIM, as diffusers    #
#################################################################################
# SD 1.x samples with diffusers' PNDMScheduler (skip_prk_steps=True, set_alpha_to_one=False,
# steps_offset=1) and DDIMScheduler (eta 0, clip_sample=False) on the scaled_linear schedule. Both
# walk the "leading" grid t = k * (1000 // steps) + 1, and the step after t = 1 lands on alpha_bar_0
# (set_alpha_to_one=False). eps_fn(x, t) is the (guided) noise prediction at integer timestep t;
# latents start at unit-variance noise.

def sd_timesteps(steps, sampler="pndm", num_train_timesteps=1000, steps_offset=1):
    """The timesteps the model is called at, in order. PNDM repeats the second one (its first step
    is a Heun step)."""
    grid = [k * (num_train_timesteps // steps) + steps_offset for k in range(steps)]
    if sampler == "pndm":  # diffusers: concatenate([t[:-1], t[-2:-1], t[-1:]])[::-1]
        grid = grid[:-1] + grid[-2:-1] + grid[-1:]
    return grid[::-1]


def _ddim_step(x, eps, alpha_bar, alpha_bar_prev):
    """x_t -> x_prev with eps (DDIM Eq. 12, eta = 0); equal to PNDM Eq. 11's transfer phi written as
    in diffusers."""
    pred_x0 = (x - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar ** 0.5
    return alpha_bar_prev ** 0.5 * pred_x0 + (1 - alpha_bar_prev) ** 0.5 * eps


def _pndm_step(x, eps, alpha_bar, alpha_bar_prev):
    """PNDM Eq. 11, the transfer part phi(x_t, eps, t, t - delta), in diffusers' algebraic form."""
    denom = (alpha_bar * (1 - alpha_bar_prev) ** 0.5
             + (alpha_bar * (1 - alpha_bar) * alpha_bar_prev) ** 0.5)
    return (alpha_bar_prev / alpha_bar) ** 0.5 * x - (alpha_bar_prev - alpha_bar) * eps / denom


@torch.no_grad()
def sd_sample(eps_fn, z, steps=50, sampler="pndm", alphas_cumprod=None, progress=False):
    """
    Latents from noise z in `steps` steps. PNDM without its Runge-Kutta warm-up (skip_prk_steps):
    the first step is Heun's (evaluate at t, step, evaluate at t - delta, step again from t with the
    mean), then linear multistep (PLMS, PNDM Eq. 12) with 2, 3 and from then on 4 previous eps.
    DDIM: one eps per step.
    """
    if alphas_cumprod is None:
        alphas_cumprod = np.cumprod(1.0 - get_named_beta_schedule("scaled_linear"))
    # diffusers' float32 arithmetic
    ac = torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float32)
    stride = len(ac) // steps

    def alpha(t):  # alpha_bar_t, and alpha_bar_0 past the first step (set_alpha_to_one=False)
        return ac[t] if t >= 0 else ac[0]
    x, ets, x_heun = z, [], None
    timesteps = sd_timesteps(steps, sampler, len(ac))
    for k, t in enumerate(tqdm(timesteps, desc="sampling", leave=False, disable=not progress)):
        eps = eps_fn(x, t)
        if sampler == "ddim":
            x = _ddim_step(x, eps, alpha(t), alpha(t - stride))
            continue
        if k == 1:  # Heun: back to x at t + stride with the mean of both slopes
            x, x_heun = x_heun, None
            x = _pndm_step(x, (eps + ets[-1]) / 2, alpha(t + stride), alpha(t))
            continue
        ets = ets[-3:] + [eps]
        if len(ets) == 1:
            x_heun, e = x, eps
        elif len(ets) == 2:
            e = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            e = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            e = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
        x = _pndm_step(x, e, alpha(t), alpha(t - stride))
    return x


def sd_guided_eps(unet, context, uncond_context, cfg_scale=7.5):
    """eps_fn for sd_sample: the UNet with classifier-free guidance (CFG Eq. 6) against the empty
    prompt's context."""
    def eps_fn(x, t):
        t = torch.full((len(x),), t, device=x.device, dtype=torch.long)
        if cfg_scale == 1.0:
            return unet(x, t, context)
        both = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([context, uncond_context]))
        cond, uncond = both.chunk(2)
        return uncond + cfg_scale * (cond - uncond)
    return eps_fn


#################################################################################
#                          Gaussian Likelihood Helpers                          #
#################################################################################

def mean_flat(x):
    """Mean over all non-batch dimensions."""
    return x.mean(dim=list(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL divergence between two diagonal Gaussians, elementwise (scalars broadcast)."""
    logvar1, logvar2 = (v if torch.is_tensor(v) else torch.as_tensor(v).to(mean1)
                        for v in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + ((mean1 - mean2) ** 2) * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """A fast approximation of the standard normal CDF (tanh form, as in the official code)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """
    log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian (DDPM Eq. 13): the mass
    of the bin [x - 1/255, x + 1/255], with the edge bins extending to infinity.
    """
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
