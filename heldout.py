"""
Held-out numbers: what a run measures on images it never trains on. The held-out loss (fixed draws
of t and noise), the variational bound in bits/dim over all 1000 steps, the noise MSE per band of
timesteps, and on the bundled digits the sample quality (digits_fid: FD and KID of a digits
classifier's features). train.py logs them (--eval-every, --eval-bpd) and the demo prints them;
study.py evaluates every checkpoint of its runs with them.
"""
from pathlib import Path

import torch

import digits_fid
import distributed
from dataset import AUGMENT_DRAWS, DataError, augment


#################################################################################
#                       Held-out metrics and sample quality                     #
#################################################################################

def fixed_draws(x, args, seed):
    """
    Images as a model is measured on them: with --augment, each with a fixed draw of its random
    transformation (dataset.augment, drawn from a generator seeded by `seed`), the same draw for
    every model measured; without, x itself.
    """
    if not args.augment:
        return x
    gen = torch.Generator(x.device).manual_seed(seed)
    return augment(x, torch.rand(len(x), AUGMENT_DRAWS, generator=gen, device=x.device))


@torch.no_grad()
def evaluate(model, diffusion, data, rows, args, device, bpd=False, batch_size=512, rank=0,
             world=1, per_image=False):
    """
    Held-out metrics, with fixed noise: the training loss (4 draws of t and noise per image; with
    per_image also each image's, "losses", in the order of `rows`) and,
    with bpd, on the first --bpd-images of them, the variational bound in bits/dim over all 1000
    steps (calc_bpd_loop, batch_size rows a forward) and the noise MSE averaged over each band of
    100 timesteps. (A respaced
    chain would be cheaper, but with the cosine schedule its last step, beta near 1, amplifies
    every error of the noise prediction: its bound is dominated by that one term.)

    Under torchrun every process calls it: process `rank` of `world` evaluates every world-th
    batch, each batch's draws seeded by its first row as with one process, and the sums meet in
    distributed.host_sum, so no process waits inside an NCCL collective (whose watchdog ends a
    job after 10 minutes) while another evaluates. The numbers are one process's, to the order
    of a float64 sum.
    """
    was_training = model.training
    model.eval()
    out, mse_t, total = dict(heldout_loss=0.0), torch.zeros(diffusion.num_timesteps), 0.0
    losses = torch.zeros(len(rows) if per_image else 0, dtype=torch.float64, device=device)
    bpd_rows = rows[:args.bpd_images]
    for start in range(0, len(rows), batch_size)[rank::world]:
        gen = torch.Generator(device).manual_seed(start)
        x, y = data.batch(rows[start: start + batch_size], False, gen, device)
        x = fixed_draws(x, args, start)
        if args.unconditional:
            y = torch.zeros_like(y)
        for draw in range(4):
            gen = torch.Generator(device).manual_seed(10_000 * draw + start)
            t = torch.randint(0, 1000, (len(x),), generator=gen, device=device)
            noise = torch.randn(x.shape, generator=gen, device=device)
            terms = diffusion.training_losses(model, x, t, dict(y=y), noise=noise)
            out["heldout_loss"] += terms["loss"].sum().item() / (4 * len(rows))
            if per_image:
                losses[start: start + len(x)] += terms["loss"].double() / 4
        n = max(0, min(len(x), len(bpd_rows) - start))
        if bpd and n:
            torch.manual_seed(start)  # the same noise before and after training: paired
            r = diffusion.calc_bpd_loop(model, x[:n], clip_denoised=False,
                                        model_kwargs=dict(y=y[:n]), chunk=max(1, batch_size // n))
            total += r["total_bpd"].sum().item()
            mse_t = mse_t + r["mse"].sum(0).cpu()
    out["heldout_loss"], total, *sums = distributed.host_sum(
        [out["heldout_loss"], total, *mse_t.tolist(), *losses.tolist()], world)
    mse_t = torch.tensor(sums[:len(mse_t)], dtype=mse_t.dtype)
    if per_image:  # each process filled only its own rows: the sum has every image's
        out["losses"] = sums[len(mse_t):]
    if bpd:
        out["bpd"] = total / len(bpd_rows)
        # t in [0, 100), [100, 200), ...
        out["mse_bands"] = (mse_t / len(bpd_rows)).view(10, 100).mean(1).tolist()
    model.train(was_training)
    return out


def sample_quality(model, data, train_rows, heldout_rows, args, steps=100):
    """
    With --eval-fd: FD and KID (digits_fid) of 297 samples (DDPM, `steps` steps, fixed noise: the
    same before and after) against the held-out digits, and the held-out digits' own (297 training
    digits against them).
    """
    if not args.eval_fd:
        return {}
    if Path(args.data).resolve() != digits_fid.DATA:
        raise DataError(f"--eval-fd measures the bundled digits ({digits_fid.DATA}), "
                        f"not {args.data}")
    images = [fixed_draws(data.batch(rows, False)[0], args, 0) for rows in (train_rows, heldout_rows)]
    net = digits_fid.load_classifier()
    quality = digits_fid.SampleQuality(net, *images, replicates=0, chunks=1)
    samples = quality.of_samples(digits_fid.generate(model, quality.n, steps))
    floor = quality.measure(quality.train_sets, refs=("heldout",))
    return dict(fd_heldout=samples["fd_heldout"], kid_heldout=samples["kid_heldout"],
                floor_fd=floor["fd_heldout"], floor_kid=floor["kid_heldout"])


def measure(model, diffusion, data, train_rows, heldout_rows, args, device, rank=0, world=1):
    """
    --eval-bpd's numbers, before and after training: held-out bits/dim (every process its share)
    and sample quality (process 0's, the others waiting in distributed.host_group).
    """
    numbers = evaluate(model, diffusion, data, heldout_rows, args, device, bpd=True, rank=rank,
                       world=world)
    if rank == 0:
        numbers.update(sample_quality(model, data, train_rows, heldout_rows, args))
    if world > 1:
        torch.distributed.barrier(group=distributed.host_group())
    return numbers


def before_message(before, args, rows):
    """
    The line the demo prints before training (on the held-out `rows`): bits/dim (and sample FD/KID
    with --eval-fd).
    """
    images = len(rows[:args.bpd_images])
    line = f"held-out bits/dim ({images} images) before: {before['bpd']:.4f}"
    if args.eval_fd:
        line += (f"; sample FD {before['fd_heldout']:.3f}, KID {before['kid_heldout']:.4f} against "
                 f"the held-out digits (297 training digits: FD {before['floor_fd']:.3f}, KID "
                 f"{before['floor_kid']:.4f})")
    return line


def after_message(before, after, args, rows, ema):
    """The demo's last lines (on the held-out `rows`): each number before and after training."""
    images = len(rows[:args.bpd_images])
    weights = " (EMA weights)" if ema else ""
    lines = [f"held-out bits/dim ({images} images): {before['bpd']:.4f} before, "
             f"{after['bpd']:.4f} after {args.method or 'training'}{weights}"]
    if args.eval_fd:
        lines.append(f"sample FD against the held-out digits: {before['fd_heldout']:.3f} before, "
                     f"{after['fd_heldout']:.3f} after; KID {before['kid_heldout']:.4f} before, "
                     f"{after['kid_heldout']:.4f} after")
    return "\n".join(lines)
