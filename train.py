"""
The one training loop: pretrain a DiT, or further-train a converged one with any method of dmp.py.

    python train.py                                      # the demo: DMP on the bundled digits, CPU
    python train.py --dataset ffhq --model DiT-L/2       # pretrain DiT-L/2 on prepared FFHQ
    python train.py --dataset ffhq --init runs/000-ffhq-pretrain --method dmp          # the paper
    torchrun --nproc_per_node 8 train.py --dataset imagenet --init DiT-XL-2-256x256.pt
    python train.py --dataset laion --model sd15 --init v1-5-pruned-emaonly.safetensors  # SD 1.5
    python train.py --dataset coco --model DiT-B/2 --text-encoder stable-diffusion-v1-5/  # text DiT

Every run writes runs/NNN-<dataset>-<method>/: log.jsonl (one JSON object per line), checkpoints/
(the last --keep, written atomically), samples/ (a grid every --sample-every steps). --resume
RUN_DIR continues a run exactly: data order and every random draw are functions of (seed, step),
so an interrupted run ends bit-identical to an uninterrupted one (on CPU; GPU kernels are not all
deterministic).

Reading order: the settings (settings.py: one dataclass per concern, each field a flag whose
default is the paper's value), the set-up, then train(), the loop. One step is training.train_step, the first
function of training.py (bench.py and memory.py run the same one); what makes a run durable (its
folder, log, checkpoints, --resume, the one-sentence stops) is runs.py's.
"""
import sys

import torch
from tqdm import tqdm

import distributed
import dmp
import heldout
import load
import runs
import sampling
import settings
import training
from checkpoints import CheckpointError
from dataset import DataError, PreparedData
from diffusion import create_diffusion
from distributed import seed_of
from model_dit import CONFIGS, DIGITS_MODELS, DiT
from model_unet import UNet_configs
from model_vae import load_vae

#################################################################################
#                Set-up: data, model (SD or DiT, chosen once), device           #
#################################################################################

def training_data(args, world):
    """(data, training rows, held-out rows) of --data, refused if the batch does not split or
    the data cannot give what the run reads."""
    if args.batch_size % (world * args.grad_accum):
        sys.exit(f"error: --batch-size {args.batch_size} does not split over {world} process"
                 f"{'es' if world > 1 else ''} x {args.grad_accum} micro-batch"
                 f"{'es' if args.grad_accum > 1 else ''}")
    data = PreparedData(args.data)
    if args.holdout >= len(data):
        raise DataError(f"--holdout {args.holdout} leaves no training images: {args.data} holds "
                        f"{len(data)}")
    if args.text and data.captions is None:
        raise DataError(f"{args.data} has no captions: prepare it with prepare_data.py --captions")
    if args.text and (args.eval_every or args.eval_bpd):
        raise DataError("held-out evaluation (--eval-every, --eval-bpd) reads labels, not "
                        "captions; sample an FID set instead")
    if args.augment and data.kind != "pixels":
        raise DataError(f"--augment transforms pixels, and {args.data} holds latents: its images "
                        f"were encoded before any transformation could be drawn")
    return (data, *training.split(data, args.holdout))


def build_model(args, data, device=None, sd=False, record=False):
    """
    (model, parameter groups, text encoder, found): SD's UNet (`sd`) from --init, or a DiT from
    --init or a fresh one of --model (on captions, with its frozen CLIP text encoder: --text-encoder,
    by default the one the --init checkpoint recorded), patched by --method. found: load.open_model's
    (`record`: the base's record). Initial weights (a new model, the prompts, ...) follow --seed.
    """
    torch.manual_seed(args.seed)
    device, found, model, encoder = device or torch.device("cpu"), dict(settings={}), None, None
    if sd and not args.init:
        raise CheckpointError(f"--model {args.model} further-trains Stable Diffusion: name its "
                              f"checkpoint with --init")
    if args.init:
        model, found = load.open_model(args.init, unet_config=UNet_configs.get(args.model) if sd
                                       else None, num_heads=args.num_heads, record=record)
    if sd:
        if model.config["in_channels"] != data.shape[0]:
            raise DataError(f"{args.data} holds {list(data.shape)} latents; the UNet takes "
                            f"{model.config['in_channels']} channels")
        encoder = load.load_sd_text_encoder(args.init, args.model, device) if args.text else None
        return model, dmp.patch(model, args.method, **settings.method_options(args, sd=True)), encoder, found
    if args.text:
        args.text_encoder = args.text_encoder or found["settings"].get("text_encoder")
        encoder = load.load_text_encoder(args.text_encoder, device)
    text_dim = encoder.config["hidden_size"] if encoder is not None else None
    labels = not (args.unconditional or text_dim)
    if args.init:
        check_init(args, data, model, text_dim, labels)
    else:
        arch = DIGITS_MODELS.get(args.model) or CONFIGS[args.model]
        model = DiT(input_size=data.shape[-1], in_channels=data.shape[0], learn_sigma=True,
                    num_classes=data.num_classes if labels else 1,
                    class_dropout_prob=args.class_dropout if labels else 0.0,
                    text_dim=text_dim, **arch)
    if (model.config["in_channels"], model.config["input_size"]) != (data.shape[0], data.shape[-1]):
        raise DataError(f"{args.data} holds {list(data.shape)} inputs; the model takes "
                        f"{model.config['in_channels']} x {model.config['input_size']}^2")
    backbone = training.trained_weights(model)  # all but the fixed pos_embed
    if not args.method:
        return model, [dict(params=backbone, lr_scale=1.0, name="all")], encoder, found
    groups = dmp.patch(model, args.method, **settings.method_options(args))
    if not args.init:  # DMP from scratch (Table 6): the backbone trains too
        groups.append(dict(params=backbone, lr_scale=1.0, name="backbone"))
        for p in backbone:
            p.requires_grad_(True)
    return model, groups, encoder, found


def check_init(args, data, model, text_dim, labels):
    """An --init DiT that cannot further-train on this data: one sentence."""
    if getattr(model, "patch_method", None):
        raise CheckpointError(f"{args.init} is already patched ({model.patch_method}): "
                              f"further-train its base")
    if model.text_dim != text_dim:
        what = [f"text embeddings of width {d}" if d else "class labels"
                for d in (model.text_dim, text_dim)]
        raise CheckpointError(f"{args.init} takes {what[0]} but this run gives {what[1]}")
    classes = getattr(model.y_embedder, "num_classes", 0)  # (a text DiT: a TextEmbedder)
    if labels and data.num_classes > classes:
        # Label `classes` is the model's guidance "null" class: a real class there is wrong.
        raise DataError(f"{args.data} has {data.num_classes} classes and {args.init} knows "
                        f"{classes} (label {classes} is its guidance null class): further-train "
                        f"on data of at most {classes} classes, or with --unconditional")


def cuda_settings(device, sd):
    """On CUDA: TF32 matmuls (as the official DiT), and for SD's UNet (`sd`) cuDNN's benchmark
    mode, which times the convolution kernels once per input shape (a run's are fixed)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = sd


class Grid:
    """
    The sample grid the loop draws every --sample-every steps (dit or sd, chosen once), with
    fixed seeds so successive grids compare: a DiT's 16 images, DDIM 50 (a text DiT's image k from
    the first caption of image k); SD's first 4 captions, PNDM 50 with guidance 7.5. The VAE is
    read at the first grid and kept.
    """
    def __init__(self, data, device, encoder, noise_schedule):
        self.data, self.device, self.encoder, self.schedule = data, device, encoder, noise_schedule
        self.captions, self.vae = [c[0] for c in data.captions or []], []

    def dit(self, model, path):
        text = dict(prompts=self.captions[:16], text_encoder=self.encoder) if self.encoder else {}
        return sampling.write_grid(model, path, vae=self.autoencoder(), noise_schedule=self.schedule, num=16,
                                   seed=0, steps=50, sampler="ddim", device=self.device, **text)

    def sd(self, unet, path):
        vae = self.autoencoder()
        resolution = self.data.shape[-1] * 2 ** (len(vae.config["ch_mult"]) - 1)
        return sampling.write_sd_grid(unet, self.encoder, vae, path, self.captions[:4], num=4,
                                      resolution=resolution)

    def autoencoder(self):
        if not self.vae:  # read once ('none': None)
            self.vae.append(load_vae(self.data.vae, self.device))
        return self.vae[0]


def start(log, args, step, data, rows, model, trained, run_dir, device, **setting):
    """What rank 0 says at the start: a new run its data, what trains and its folder, and logs its
    settings; a resumed one where it resumes. Both print the precision and the device."""
    n_trained, n_total = sum(p.numel() for p in trained), sum(p.numel() for p in model.parameters())
    what = f"further-training {args.init} with {args.method}" if args.init else "pretraining"
    if step == 0:
        print(f"{args.dataset}: {len(rows[0])} training images {list(data.shape)}, "
              f"{len(rows[1])} held out; {what}: {n_trained:,} of {n_total:,} parameters "
              f"train ({100 * n_trained / n_total:.2f}%); run folder {run_dir}")
        log(event="start", args=vars(args), trained_parameters=n_trained,
            total_parameters=n_total, **setting)
    else:
        log(event="resume", step=step, world=setting["world"], precision=setting["precision"])
    print(f"precision: {training.PRECISIONS[setting['precision']]} ({device})")


def measure_bpd(args, log, model, weights, step, diffusion, data, rows, device, rank, world,
                before=None):
    """--eval-bpd: the held-out numbers (heldout.measure) of `model` (its `weights`, raw or EMA),
    logged, and printed by rank 0 with those measured `before` training. Returns them."""
    numbers = heldout.measure(model, diffusion, data, *rows, args, device, rank, world)
    log(event="eval", step=step, weights=weights, **numbers)
    if rank == 0 and step == 0:
        print(heldout.before_message(numbers, args, rows[1]))
    elif rank == 0 and before is not None:
        print(heldout.after_message(before, numbers, args, rows[1], weights == "ema"))
    return numbers


#################################################################################
#                                 Training Loop                                 #
#################################################################################

def train(args, folder):
    """A run of `args` (parse_args'), its folder `folder` (a runs.Folder): set up, then the loop."""
    args, resume, run_dir = runs.resumed(args)  # --resume: the run's settings and last checkpoint
    rank, world, backend = distributed.setup()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, sd = distributed.local_device(args.device), args.model in UNet_configs
    cuda_settings(device, sd)
    precision = training.choose_precision(args.precision, device)
    data, *rows = training_data(args, world)  # rows: the training and the held-out images
    model, groups, encoder, found = build_model(args, data, device, sd, record=rank == 0)
    runs.check_resumed(resume, run_dir, args, data, found.get("base"))
    model.set_checkpointing(args.checkpointing).to(device).train()
    trained = [p for g in groups for p in g["params"]]
    opt = training.optimizer(groups, args.lr, args.weight_decay)
    ema = training.EMA(model, args.ema) if args.ema else None
    autocast, scaler = training.mixed_precision(precision, device)
    step = runs.restore(resume, model, ema, opt, scaler, args.init)
    run_dir = folder.open(run_dir, f"{args.dataset}-{args.method or 'pretrain'}", args.results_dir,
                          rank, world)
    log = runs.RunLog(run_dir, rank, folder)  # its first line of losses keeps the folder
    checkpoints = runs.Checkpoints(run_dir, args.keep, rank, world, model=model, ema=ema, opt=opt,
                                   args=args, data=data, base=found.get("base"), scaler=scaler,
                                   sd=sd)
    # The model says whether it learns the variance (DiT's hybrid loss) or predicts the noise only.
    diffusion = create_diffusion("", args.noise_schedule,
                                 learn_sigma=getattr(model, "learn_sigma", False))
    if args.compile:
        training.compile_blocks(model)
    ddp = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    condition = training.conditioning(encoder, sd)  # labels, or captions through the encoder
    grid = Grid(data, device, encoder, args.noise_schedule)
    write_grid = grid.sd if sd else grid.dit
    measured, weights = (model, "raw") if ema is None else (ema.model, "ema")
    # Every process evaluates its share of the held-out images (none waits in a collective).
    eval_every = args.eval_every if len(rows[1]) else 0
    sample_every = args.sample_every if rank == 0 else 0
    bpd = args.eval_bpd and len(rows[1])
    if rank == 0:
        start(log, args, step, data, rows, model, trained, run_dir, device, world=world,
              backend=backend, precision=precision)
    before = None
    if bpd and step == 0:
        before = measure_bpd(args, log, model, "raw", 0, diffusion, data, rows, device, rank, world)

    losses = runs.LossMeter(step, device)
    batches = training.Prefetcher(data, rows[0], args, device, rank, world)  # get_batch's batches
    bar = tqdm(total=args.iterations, initial=step, disable=rank != 0, desc=run_dir.name,
               dynamic_ncols=True)
    interrupted = runs.catch_ctrl_c(world)
    while step < args.iterations:
        if interrupted:  # Ctrl-C: the step it came in is complete; saved, so --resume goes on
            runs.stop_interrupted(checkpoints, folder, step, bar)
        # Everything random in this step (label dropout, gate noise) is drawn after seeding with
        # (seed, step, rank): a resumed run redraws exactly what the uninterrupted one drew.
        torch.manual_seed(seed_of(args.seed, step, rank))
        batch = batches.get(step)
        mixtures = []  # the step's gate weights (dmp.Mixture), for the losses and the log
        with runs.out_of_memory(args, step, rank, world, device, bar):
            # forward, backward and AdamW's step, in --grad-accum micro-batches; then the EMA
            losses.add(training.train_step(
                ddp, opt, batch, diffusion, mixtures=mixtures, condition=condition,
                importance_coef=args.importance_coef, load_coef=args.load_coef,
                grad_accum=args.grad_accum, autocast=autocast, scaler=scaler, ema=ema))
        step += 1
        bar.update(1)
        last = step == args.iterations
        if step % args.log_every == 0 or step % args.ckpt_every == 0 or last:
            mean, speed = losses.mean(step, world)
            runs.stop_if_not_finite(mean, trained, step, checkpoints.last, bar)
            # DMP: how far the gate has moved from uniform (a uniform gate is prompt tuning at lr/N)
            log(step=step, weights="raw", **mean, **dmp.logged_gate_movement(mixtures),
                steps_per_sec=speed, images_per_sec=speed * args.batch_size)
            bar.set_postfix(loss=f"{mean['loss']:.4f}", imp=f"{mean['importance']:.3g}",
                            load=f"{mean['load']:.3g}", it_s=f"{speed:.2f}")
        if eval_every and step % eval_every == 0:
            log(event="eval", step=step, weights=weights,
                **heldout.evaluate(measured, diffusion, data, rows[1], args, device, rank=rank,
                                   world=world))
        if step % args.ckpt_every == 0 or last:
            checkpoints.save(step)
        if sample_every and (step % sample_every == 0 or last):
            path = write_grid(measured, run_dir / "samples" / f"{step:07d}.png")
            log(event="samples", step=step, weights=weights, path=str(path))
    bar.close()
    batches.close()

    if bpd:
        measure_bpd(args, log, measured, weights, step, diffusion, data, rows, device, rank, world,
                    before)
    if rank == 0:
        grid_line = f"sample grid: {run_dir / 'samples' / f'{step:07d}.png'}\n"
        print(f"{grid_line if args.sample_every else ''}checkpoint: {load.checkpoints(run_dir)[-1]}")
    distributed.teardown()  # torchrun, even with one process


def main(argv=None):
    """Train (the module docstring). A run that stops, whatever the reason, before it logged a step
    or wrote a checkpoint leaves no folder behind (runs.Folder)."""
    with runs.Folder() as folder:
        train(settings.parse_args(argv), folder)


def cli(argv=None):
    """The command line: bad input and faults (a full disk) end in one sentence, not a traceback."""
    with runs.one_sentence():
        main(argv)


if __name__ == "__main__":
    cli()
