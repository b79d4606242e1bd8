"""train.py on the bundled digits with the tiny DiT: resume, crash safety, NaN stop, every method, DDP."""
import functools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dmp
import heldout
import load
import sampling
import settings
import train
import training
from checkpoints import read_state_dict
from conftest import error_line
from dataset import PreparedData, augment, synthetic_latents
from runs import claim_run_dir, resumed_args
from model_dit import DiT
from diffusion import create_diffusion

ROOT = Path(__file__).parents[1]
FAST = ["--dataset", "digits", "--batch-size", "16", "--sample-every", "0", "--eval-every", "0", "--device", "cpu",
        "--log-every", "1"]


def run(tmp_path, *extra, name="runs"):
    train.main(FAST + ["--results-dir", str(tmp_path / name), *extra])
    return sorted((tmp_path / name).iterdir())[-1]


def log_of(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    """A tiny pretrained DiT: four steps at a large rate, no EMA, give every weight (adaLN gates too) a value."""
    tmp = tmp_path_factory.mktemp("base")
    run_dir = run(tmp, "--iterations", "4", "--ckpt-every", "4", "--ema", "0", "--lr", "1e-2")
    return load.checkpoints(run_dir)[-1]


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [[], ["--init", "BASE", "--method", "dmp", "--noisy-gate"]], ids=["pretrain", "dmp"])
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, base_checkpoint, extra):
    extra = [str(base_checkpoint) if e == "BASE" else e for e in extra]
    whole = run(tmp_path, "--iterations", "6", "--ckpt-every", "3", *extra, name="whole")
    part = run(tmp_path, "--iterations", "3", "--ckpt-every", "3", *extra, name="part")
    train.main(["--resume", str(part), "--iterations", "6"])
    a, b = (read_state_dict(load.checkpoints(d)[-1]) for d in (whole, part))
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "state"):
        if a.get(key) is not None:
            assert same_state(a[key], b[key]), key
    assert str(a["opt"]["state"]) == str(b["opt"]["state"])  # exact repr of every moment tensor
    losses = [e["loss"] for e in log_of(whole) if "loss" in e]
    assert losses[3:] == [e["loss"] for e in log_of(part) if "loss" in e][3:]


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    driver = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
import train
real, calls = os.fsync, []
def fsync(fd):  # the second checkpoint's bytes are written, not yet renamed into place: die here
    calls.append(fd)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(fd)
os.fsync = fsync
train.main({FAST + ["--results-dir", str(tmp_path / "runs"), "--iterations", "6", "--ckpt-every", "2"]!r})
"""
    out = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == -9
    run_dir = next((tmp_path / "runs").iterdir())
    files = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert load.checkpoints(run_dir)[-1].name == "0000002.pt" and any(f.endswith(".tmp") for f in files)
    assert read_state_dict(load.checkpoints(run_dir)[-1])["step"] == 2
    train.main(["--resume", str(run_dir)])  # and the run goes on from there
    assert read_state_dict(load.checkpoints(run_dir)[-1])["step"] == 6


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    driver = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import train
import training
real, count = training.compute_loss, [0]
def compute_loss(*args):
    loss, terms = real(*args)
    count[0] += 1
    return (loss * float("nan"), terms * float("nan")) if count[0] > 2 else (loss, terms)
training.compute_loss = compute_loss
train.main({FAST + ["--results-dir", str(tmp_path / "runs"), "--iterations", "6", "--ckpt-every", "2"]!r})
"""
    out = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1
    message = out.stderr.strip().splitlines()[-1]
    assert "no longer finite at step 3" in message and "0000002.pt" in message
    run_dir = next((tmp_path / "runs").iterdir())
    assert [p.name for p in load.checkpoints(run_dir)] == ["0000002.pt"]
    state = read_state_dict(load.checkpoints(run_dir)[-1])["model"]
    assert all(v.isfinite().all() for v in state.values())


def test_the_loss_falls_on_the_digits(tmp_path):
    run_dir = run(tmp_path, "--iterations", "60", "--lr", "1e-3", "--batch-size", "64", "--log-every", "20",
                  "--ckpt-every", "60")
    losses = [e["loss"] for e in log_of(run_dir) if "loss" in e]
    print("loss every 20 steps:", [round(v, 3) for v in losses])
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("method", dmp.METHODS)
def test_every_method_further_trains_and_its_checkpoint_loads(tmp_path, base_checkpoint, method):
    run_dir = run(tmp_path, "--init", str(base_checkpoint), "--method", method, "--iterations", "3",
                  "--ckpt-every", "3", "--lr", "1e-2")
    ckpt = load.checkpoints(run_dir)[-1]
    entries = read_state_dict(ckpt)
    assert entries["method"] == method and entries["base"]["name"] == str(base_checkpoint)
    model = load.load_model(str(ckpt))  # base + what the method trained
    base = load.load_model(str(base_checkpoint))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        assert not torch.equal(model.eval()(x, t, y), base.eval()(x, t, y))


def test_one_lr_rule_explicit_multipliers_and_the_gate_log(tmp_path, base_checkpoint):
    """--lr-scale and --gate-lr-scale reach the optimiser; a DMP run logs its gate's movement."""
    run_dir = run(tmp_path, "--init", str(base_checkpoint), "--method", "dmp", "--iterations", "3",
                  "--ckpt-every", "3", "--lr", "1e-2", "--lr-scale", "0.5", "--gate-lr-scale", "10")
    groups = read_state_dict(load.checkpoints(run_dir)[-1])["opt"]["param_groups"]
    assert [g["lr"] for g in groups] == [5e-3, 5e-2]
    lines = [e for e in log_of(run_dir) if "loss" in e]
    assert len(lines) == 3
    assert all(0 <= e["gate_dev_mean"] <= e["gate_dev_max"] and e["gate_tv_t"] >= 0
               and 0 < e["gate_entropy_min"] <= 1 for e in lines)
    assert lines[-1]["gate_dev_max"] > 0  # the gate has left uniform: its prompts are non-zero now
    lora = run(tmp_path, "--init", str(base_checkpoint), "--method", "lora", "--lora-rank", "dmp",
               "--iterations", "1", "--ckpt-every", "1", name="lora")
    assert read_state_dict(load.checkpoints(lora)[-1])["options"]["rank"] == 1
    assert "gate_dev_max" not in log_of(lora)[-1]
    with pytest.raises(SystemExit):
        settings.parse_args(["--lora-rank", "many"])


def test_dmp_from_scratch_trains_backbone_and_prompts(tmp_path):
    run_dir = run(tmp_path, "--method", "dmp", "--iterations", "2", "--ckpt-every", "2")
    model = load.load_model(str(load.checkpoints(run_dir)[-1]))
    assert isinstance(model.block_input, dmp.MixtureOfPrompts) and model.block_input.prompts.abs().sum() > 0


def _ddp_worker(rank, world, store, base, out):
    # A file store, not a TCP port: no other process can take it between choosing it and binding it.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    grads = _gradients(base, rank, world)
    structures = _train_every_structure(rank, world)
    if rank == 0:
        torch.save(dict(grads=grads, structures=structures), out)
    dist.destroy_process_group()


def _gradients(base, rank=0, world=1):
    """The gradient of one DMP training step's loss, computed on this process's share of the batch."""
    args = settings.parse_args(FAST + ["--init", str(base), "--method", "dmp", "--batch-size", "8"])
    data = PreparedData(args.data)
    rows, _ = training.split(data, args.holdout)
    model, groups, *_ = train.build_model(args, data)
    with torch.no_grad():  # non-zero prompts (the same on every process): the gate gets a gradient too
        prompts = model.block_input.prompts
        prompts.copy_(torch.randn(prompts.shape, generator=torch.Generator().manual_seed(0)))
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    batch = training.get_batch(data, rows, 5, args, torch.device("cpu"), rank, world)
    loss, _ = training.compute_loss(wrapped, create_diffusion("", args.noise_schedule), batch)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_ddp_with_two_cpu_processes_matches_the_single_process_gradient(tmp_path, base_checkpoint):
    """The same two processes also train each of DDP_STRUCTURES for three steps (one start)."""
    torch.manual_seed(0)
    single = _gradients(base_checkpoint)
    mp.spawn(_ddp_worker, args=(2, tmp_path / "store", base_checkpoint, tmp_path / "g.pt"), nprocs=2)
    result = torch.load(tmp_path / "g.pt")
    assert result["structures"] == [" ".join(f) for f in DDP_STRUCTURES]
    ddp = result["grads"]
    assert single.keys() == ddp.keys()
    for name in single:
        assert torch.allclose(single[name], ddp[name], rtol=1e-5, atol=1e-7), name


def test_torchrun_runs_the_loop_with_two_processes(tmp_path, base_checkpoint):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train.py", *FAST, "--init", str(base_checkpoint), "--iterations", "2", "--ckpt-every", "2",
           "--eval-every", "2", "--results-dir", str(tmp_path / "runs")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = next((tmp_path / "runs").iterdir())
    assert [p.name for p in load.checkpoints(run_dir)] == ["0000002.pt"]
    assert next(e for e in log_of(run_dir) if e.get("event") == "start")["world"] == 2
    evaluation = [e for e in log_of(run_dir) if e.get("event") == "eval"]  # both processes took part
    assert len(evaluation) == 1 and evaluation[0]["step"] == 2 and evaluation[0]["heldout_loss"] > 0


def test_tiny_stable_diffusion_trains_dmp_on_a_tar_shard_then_samples_with_pndm(tmp_path):
    """
    End to end: an SD-layout single file (the golden tiny UNet and VAE, a tiny CLIP), 8 captioned images in an
    img2dataset shard, 20 DMP steps, PNDM with guidance. A zero patch gives the base's samples bit for bit.
    """
    import io
    import tarfile
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import save_file
    import prepare_data
    import sample
    from model_clip import CLIP_TINY, CLIPTextModel
    from model_unet import UNetModel
    golden = ROOT / "tests" / "golden"
    torch.manual_seed(0)
    sd = {f"cond_stage_model.transformer.text_model.{k}": v for k, v in CLIPTextModel(**CLIP_TINY).state_dict().items()}
    for name in ("unet_tiny", "vae_tiny"):
        with safe_open(golden / f"{name}.safetensors", "pt") as f:
            sd.update({k[len("ldm."):]: f.get_tensor(k) for k in f.keys() if k.startswith("ldm.")})
    save_file(sd, tmp_path / "sd-tiny.safetensors")
    rng = np.random.default_rng(0)
    with tarfile.open(tmp_path / "00000.tar", "w") as t:
        for i in range(8):
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(png, "PNG")
            for name, data in ((f"{i:09d}.png", png.getvalue()), (f"{i:09d}.txt", f"a photo of thing {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    prepare_data.prepare(tmp_path / "00000.tar", tmp_path / "data", resolution=32, vae=tmp_path / "sd-tiny.safetensors",
                         captions="txt")
    train.main(["--dataset", "laion", "--model", "sd-tiny", "--data", str(tmp_path / "data"), "--init",
                str(tmp_path / "sd-tiny.safetensors"), "--iterations", "20", "--batch-size", "4", "--lr", "1e-1",
                "--device", "cpu", "--log-every", "10", "--ckpt-every", "20", "--results-dir", str(tmp_path / "runs")])
    run_dir = next((tmp_path / "runs").iterdir())
    log = log_of(run_dir)
    with torch.device("meta"):
        channels = sum(c for c, _ in UNetModel(**load.SD_MODELS["sd-tiny"]["unet"]).block_shapes)
    assert log[0]["trained_parameters"] == 256 * channels + (128 + 32 + 25) * 256 + 256 == 482_816  # prompts, gate
    assert all(math.isfinite(e["loss"]) for e in log if "loss" in e)
    ckpt = load.checkpoints(run_dir)[-1]
    entries = read_state_dict(ckpt)
    assert entries["method"] == "dmp" and entries["options"]["gate_cond"] == "t+c" and entries["step"] == 20
    assert max(v.abs().max() for k, v in entries["state"].items() if "prompts" in k) > 1e-3  # the prompts learned

    unet, _, _ = load.load_sd(tmp_path / "sd-tiny.safetensors", "sd-tiny")
    dmp.patch(unet, "dmp", gate_cond="t+c")
    load.save_patch(unet, tmp_path / "zero.pt", base=tmp_path / "sd-tiny.safetensors")
    common = ["--model", "sd-tiny", "--prompt", "a photo of thing 1", "a red square", "--resolution", "32",
              "--steps", "5", "--seed", "3"]
    images = {}
    for name, extra in (("base", []), ("zero", ["--patch", str(tmp_path / "zero.pt")]), ("dmp", [])):
        ckpt_arg = str(ckpt) if name == "dmp" else str(tmp_path / "sd-tiny.safetensors")
        sample.main(common + ["--ckpt", ckpt_arg, "--out", str(tmp_path / f"{name}.png"), *extra])
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    # two 32x32 images, shown 64x64 in the grid (sampling.save_grid), 2-pixel borders
    assert images["base"].shape == (2 + 66, 2 * 66 + 2, 3) and images["base"].std() > 5
    assert np.array_equal(images["zero"], images["base"])  # a zero-initialised patch changes nothing
    assert np.abs(images["dmp"] - images["base"]).max() >= 1  # the trained one does (weights 1/256: a little)


def test_tiny_text_dit_pretrains_then_trains_dmp_on_captions_and_samples_from_prompts(tmp_path):
    """
    --dataset coco with a tiny DiT and the golden tiny CLIP (a text_encoder/ folder): pretraining, DMP on t + text,
    then sample.py from prompts with guidance against the null embedding. A zero patch gives the base's samples.
    """
    from PIL import Image
    from safetensors import safe_open
    from safetensors.torch import save_file
    import prepare_data
    import sample
    with safe_open(ROOT / "tests" / "golden" / "clip_text_tiny.safetensors", "pt") as f:
        clip = {f"text_model.{k[len('state.'):]}": f.get_tensor(k) for k in f.keys() if k.startswith("state.")}
    (tmp_path / "clip" / "text_encoder").mkdir(parents=True)
    save_file(clip, tmp_path / "clip" / "text_encoder" / "model.safetensors")
    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
        (tmp_path / "images" / f"{i}.txt").write_text(f"a photo of thing {i}")
    prepare_data.prepare(tmp_path / "images", tmp_path / "data", resolution=8, vae="none", captions="txt")
    common = ["--dataset", "coco", "--model", "digits", "--data", str(tmp_path / "data"), "--batch-size", "8",
              "--device", "cpu", "--log-every", "1", "--sample-every", "0", "--text-encoder", str(tmp_path / "clip")]
    from checkpoints import CheckpointError
    with pytest.raises(CheckpointError, match="needs the CLIP ViT-L/14 text encoder"):
        train.main(common[:-2] + ["--results-dir", str(tmp_path / "none")])  # no --text-encoder: one sentence
    train.main(common + ["--iterations", "4", "--ckpt-every", "4", "--lr", "1e-2", "--ema", "0",
                         "--results-dir", str(tmp_path / "base")])
    base = load.checkpoints(next((tmp_path / "base").iterdir()))[-1]
    entries = read_state_dict(base)
    assert entries["config"]["text_dim"] == 16 and entries["noise_schedule"] == "cosine"
    assert entries["text_encoder"] == str((tmp_path / "clip").resolve())
    train.main(common[:-2] + ["--init", str(base), "--iterations", "10", "--ckpt-every", "10", "--lr", "1e-1",
                              "--sample-every", "10", "--results-dir", str(tmp_path / "runs")])  # encoder: the base's
    run_dir = next((tmp_path / "runs").iterdir())
    log = log_of(run_dir)
    hidden, blocks, prompts = 64, 4, 16  # the digits DiT, one prompt per token (16)
    assert log[0]["trained_parameters"] == blocks * prompts * hidden + (hidden + blocks) * prompts + prompts
    assert all(math.isfinite(e["loss"]) for e in log if "loss" in e)
    assert (run_dir / "samples" / "0000010.png").is_file()  # train.py's grid of the first captions
    ckpt = load.checkpoints(run_dir)[-1]
    entries = read_state_dict(ckpt)
    assert entries["method"] == "dmp" and entries["options"]["gate_cond"] == "t+c"  # Table 9: t + text
    assert entries["text_encoder"] == str((tmp_path / "clip").resolve())
    assert max(v.abs().max() for k, v in entries["state"].items() if "prompts" in k) > 1e-3

    model = load.load_model(str(base))
    dmp.patch(model, "dmp", gate_cond="t+c")
    load.save_patch(model, tmp_path / "zero.pt", base=str(base))
    args = ["--prompt", "a photo of thing 1", "a red square", "--steps", "5", "--seed", "3"]
    images = {}
    zero = ["--ckpt", str(base), "--patch", str(tmp_path / "zero.pt")]
    for name, extra in (("base", ["--ckpt", str(base)]), ("zero", zero), ("dmp", ["--ckpt", str(ckpt)]),
                        ("cfg1", ["--ckpt", str(base), "--cfg-scale", "1"])):
        sample.main(args + extra + ["--out", str(tmp_path / f"{name}.png")])
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    assert images["base"].shape == (2 + 66, 2 * 66 + 2, 3) and images["base"].std() > 5  # 8x8 as 64x64
    assert np.array_equal(images["zero"], images["base"])  # a zero-initialised patch changes nothing
    assert np.abs(images["dmp"] - images["base"]).max() >= 1  # the trained one does
    assert np.abs(images["cfg1"] - images["base"]).max() >= 1  # the default 1.5 guides against the null embedding


#################################################################################
#        Bad input and faults: one sentence, nothing lost, nothing mixed        #
#################################################################################

def cli(*argv):
    """train.py's command line in-process: (exit status, message) as the user would see them."""
    with pytest.raises(SystemExit) as exit_info:
        train.cli([str(a) for a in argv])
    code = exit_info.value.code
    return (1, code) if isinstance(code, str) else (code, None)


def test_a_run_folder_is_claimed_never_reused_nor_left_empty(tmp_path, unchanged, monkeypatch):
    runs = tmp_path / "runs"
    common = FAST + ["--results-dir", str(runs), "--iterations", "2", "--ckpt-every", "1"]
    for seed in (1, 2):
        train.main(common + ["--seed", str(seed)])
    first, second = sorted(runs.iterdir())
    shutil.rmtree(first)  # the user deletes run 000; a third run must not count its way into 001
    kept = unchanged(second)
    train.main(common + ["--seed", "3", "--keep", "1"])
    kept()
    assert sorted(p.name for p in runs.iterdir()) == ["001-digits-pretrain", "002-digits-pretrain"]
    assert [p.name for p in load.checkpoints(second)] == ["0000001.pt", "0000002.pt"]

    # Runs starting together, under two names: each gets a folder and a number of its own.
    import threading
    folders, start = [], threading.Barrier(8)

    def claim(name):
        start.wait()
        folders.append(claim_run_dir(tmp_path / "together", name))
    threads = [threading.Thread(target=claim, args=(f"digits-{i % 2}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({f.name[:3] for f in folders}) == 8 and all(f.is_dir() for f in folders)

    def broken(*args):
        raise RuntimeError("a fault before the first log line")
    monkeypatch.setattr(training, "compute_loss", broken)
    with pytest.raises(RuntimeError, match="before the first log line"):
        train.main(common + ["--seed", "4"])
    assert sorted(p.name for p in runs.iterdir()) == ["001-digits-pretrain", "002-digits-pretrain"]
    kept()


@pytest.mark.parametrize("argv, message", [
    (["--iterations", "0"], "--iterations 0 (must be at least 1)"),
    (["--iterations=-5"], "--iterations -5 (must be at least 1)"),
    (["--batch-size", "0"], "--batch-size 0 (must be at least 1)"),
    (["--lr", "-1"], "--lr -1.0 (must be at least 0)"),
    (["--lr", "nan", "--ema", "1"], "--lr nan (must be at least 0), --ema 1.0 (must be from 0, "
                                    "below 1)"),
    (["--holdout", "5000"], "--holdout 5000 leaves no training images: assets/digits holds 1797"),
])
def test_bad_numbers_are_refused_before_anything_is_made(tmp_path, capsys, one_sentence, argv,
                                                         message):
    code, text = cli(*FAST, "--results-dir", tmp_path / "runs", *argv)
    text = text or one_sentence(capsys.readouterr().err)
    assert code == (1 if "holdout" in message else 2) and message in text and "\n" not in text
    assert not (tmp_path / "runs").exists()


def test_init_checkpoint_holds_the_ema_it_measured_and_resume_restores_it(tmp_path,
                                                                         base_checkpoint):
    common = FAST + ["--init", str(base_checkpoint), "--ema", "0.5", "--lr", "1e-2",
                     "--eval-every", "4", "--ckpt-every", "2"]
    whole = run(tmp_path, *common, "--iterations", "4", name="whole")
    part = run(tmp_path, *common, "--iterations", "2", name="part")
    train.main(["--resume", str(part), "--iterations", "4"])
    entries = read_state_dict(load.checkpoints(whole)[-1])
    assert entries["weights"] == "ema" and entries["state"].keys() == entries["raw_state"].keys()
    assert not same_state(entries["state"], entries["raw_state"])  # an average of 4 steps
    resumed = read_state_dict(load.checkpoints(part)[-1])
    assert same_state(resumed["state"], entries["state"])  # the EMA went on from where it was
    logged = [e for e in log_of(whole) if e.get("event") == "eval"]
    assert [e["weights"] for e in logged] == ["ema"]
    assert all(e["weights"] == "raw" for e in log_of(whole) if "loss" in e)
    # What the run reported is what the saved file gives when measured again.
    args = settings.parse_args(FAST + ["--init", str(base_checkpoint)])
    data = PreparedData(args.data)
    _, heldout_rows = training.split(data, args.holdout)
    model = load.load_model(str(load.checkpoints(whole)[-1]))
    diffusion = create_diffusion("", "cosine")
    again = heldout.evaluate(model, diffusion, data, heldout_rows, args, torch.device("cpu"))
    assert again["heldout_loss"] == pytest.approx(logged[0]["heldout_loss"], rel=1e-6)


def test_the_ema_of_a_frozen_backbone_copies_only_what_trains(base_checkpoint):
    """--ema with --init: the EMA model shares the frozen backbone's tensors (no second backbone on
    the GPU) and holds its own copy of the trained ones; its state dict is a whole model's."""
    args = settings.parse_args(FAST + ["--init", str(base_checkpoint), "--ema", "0.5"])
    raw, groups, *_ = train.build_model(args, PreparedData(args.data))
    ema = training.EMA(raw, args.ema).model
    trained = {id(p) for g in groups for p in g["params"]}
    pairs = list(zip(ema.parameters(), raw.parameters(), strict=True))
    assert all((e is p) == (id(p) not in trained) for e, p in pairs)
    assert sum(e.numel() for e, p in pairs if e is not p) == sum(p.numel() for g in groups for p in g["params"])
    assert not any(e.requires_grad for e, _ in pairs) and all(raw.get_parameter(n).requires_grad == (
        id(raw.get_parameter(n)) in trained) for n, _ in raw.named_parameters())
    assert same_state(ema.state_dict(), raw.state_dict())
    with torch.no_grad():
        next(iter(groups[0]["params"])).add_(1.0)  # the live weights move, the EMA's copy does not
    assert not same_state(ema.state_dict(), raw.state_dict())


def test_resume_takes_cadence_from_the_command_line_and_refuses_other_changes(tmp_path, unchanged):
    run_dir = run(tmp_path, "--iterations", "2", "--ckpt-every", "2")
    train.main(["--resume", str(run_dir), "--iterations=6", "--log-every=2", "--ckpt-every", "2",
                "--keep=1"])
    assert [e["step"] for e in log_of(run_dir) if "loss" in e] == [1, 2, 4, 6]
    assert [p.name for p in load.checkpoints(run_dir)] == ["0000006.pt"]
    kept = unchanged(tmp_path)
    code, text = cli("--resume", run_dir, "--iterations", "8", "--lr=0.5", "--seed", "0")
    assert code == 1 and "--lr 0.5 (the run's: 0.0001)" in text and "\n" not in text
    assert "--seed" not in text  # given, but the run's own value
    kept()


def test_the_logged_mean_covers_exactly_the_steps_since_the_last_log(tmp_path):
    every = run(tmp_path, "--lr", "0", "--iterations", "12", "--ckpt-every", "12", name="every")
    steps = [e["mse"] for e in log_of(every) if "loss" in e]
    common = ["--lr", "0", "--log-every", "4", "--ckpt-every", "6"]
    odd = run(tmp_path, *common, "--iterations", "12", name="odd")
    logged = {e["step"]: e["mse"] for e in log_of(odd) if "loss" in e}
    spans = {4: (0, 4), 6: (4, 6), 8: (6, 8), 12: (8, 12)}
    means = {s: sum(steps[a:b]) / (b - a) for s, (a, b) in spans.items()}
    assert logged == pytest.approx(means, rel=1e-5)
    part = run(tmp_path, *common, "--iterations", "6", name="part")
    train.main(["--resume", str(part), "--iterations", "8"])
    after_resume = [e["mse"] for e in log_of(part) if "loss" in e][-1]
    assert after_resume == pytest.approx(sum(steps[6:8]) / 2, rel=1e-5)


def test_init_from_a_dit_without_learned_variance(tmp_path):
    from model_dit import DIGITS_MODEL, DiT
    torch.manual_seed(0)
    model = DiT(input_size=8, in_channels=1, learn_sigma=False, num_classes=1,
                class_dropout_prob=0.0, **DIGITS_MODEL)
    torch.save(dict(model=model.state_dict(), config=model.config, noise_schedule="cosine",
                    vae="none"), tmp_path / "eps_only.pt")
    run_dir = run(tmp_path, "--init", str(tmp_path / "eps_only.pt"), "--iterations", "2",
                  "--ckpt-every", "2")
    assert all(math.isfinite(e["loss"]) and e["vb"] == 0 for e in log_of(run_dir) if "loss" in e)
    assert load.load_model(str(load.checkpoints(run_dir)[-1])).learn_sigma is False


def test_files_that_are_not_checkpoints_get_one_sentence(tmp_path, unchanged):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "config.json").write_text('{"lr": 1e-4}')
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    not_ours = tmp_path / "run" / "checkpoints" / "0000004.pt"
    torch.save(dict(model={}, step=4), not_ours)
    kept = unchanged(tmp_path)
    cases = [(["--init", tmp_path / "notes.txt"], "notes.txt: not a PyTorch checkpoint"),
             (["--init", tmp_path / "config.json"], "config.json: not a PyTorch checkpoint"),
             (["--resume", tmp_path / "config.json"], "config.json: not a PyTorch checkpoint"),
             (["--resume", tmp_path / "run"], "0000004.pt is not a checkpoint of a train.py run"),
             (["--resume", tmp_path / "deleted-run"], "deleted-run: no such file")]
    for argv, message in cases:
        code, text = cli(*FAST, "--results-dir", tmp_path / "runs", *argv)
        assert code == 1 and message in text and "\n" not in text, text
    kept()
    assert not (tmp_path / "runs").exists()


FULL_DISK = """
import resource, sys
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # ulimit -f
import train
train.cli(sys.argv[1:])
"""


def test_a_full_disk_while_writing_a_checkpoint_or_the_log(tmp_path, unchanged, one_sentence):
    """RLIMIT_FSIZE makes every write past a size fail, as a full disk does."""
    first = run(tmp_path, "--iterations", "1", "--ckpt-every", "1")
    kept = unchanged(tmp_path)
    argv = FAST + ["--results-dir", str(tmp_path / "runs"), "--iterations", "2",
                   "--ckpt-every", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", FULL_DISK, "100000", *argv], cwd=ROOT,
                         capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert "0000002.pt: could not be written (File too large)" in one_sentence(out.stderr)
    kept()
    second = next(p for p in (tmp_path / "runs").iterdir() if p != first)
    assert list((second / "checkpoints").iterdir()) == []  # no temporary file left behind
    assert [e["step"] for e in log_of(second) if "loss" in e] == [1, 2]

    # Resumed with room for half a log line: the line is taken back, the log stays as it was.
    kept = unchanged(tmp_path)
    limit = (first / "log.jsonl").stat().st_size + 50
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(limit), "--resume", str(first),
                          "--iterations", "2"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 1 and "log.jsonl: File too large" in one_sentence(out.stderr)
    kept()


def test_the_sample_grid_is_large_enough_to_see(tmp_path, monkeypatch):
    """train.py's grid shows each 8x8 digit at 64x64, by nearest neighbour: a pixel, a square. The
    VAE (here 'none') is read once for the run's grids, not once a grid."""
    from PIL import Image
    reads = []
    for module in (train, sampling):
        monkeypatch.setattr(module, "load_vae", functools.partial(counted, reads, module.load_vae))
    run_dir = run(tmp_path, "--init", str(ROOT / "assets" / "dit_digits.pt"), "--iterations", "2",
                  "--ckpt-every", "2", "--sample-every", "1")
    assert reads == ["none"] and (run_dir / "samples" / "0000002.png").exists()
    grid = np.asarray(Image.open(run_dir / "samples" / "0000001.png"))
    assert grid.shape == (4 * 66 + 2, 4 * 66 + 2, 3)  # 16 digits, 4 x 4, 2-pixel borders
    cells = grid[2:, 2:, 0].reshape(4, 66, 4, 66)[:, :64, :, :64].reshape(4, 8, 8, 4, 8, 8)
    assert (cells == cells[:, :, :1, :, :, :1]).all()  # every 8x8 square one value
    assert len(np.unique(cells)) > 50  # digits, not a blank


def counted(calls, function, name, *args):
    calls.append(name)
    return function(name, *args)


def test_the_text_encoder_runs_under_the_steps_autocast():
    """A text DiT's captions go through CLIP inside the step's autocast (bf16 matmuls, not fp32)
    and the DiT reads their pooled embeddings in fp32; fp32 (no autocast) leaves CLIP in fp32."""
    from model_clip import CLIP_TINY, CLIPTextModel, caption_embeddings
    from model_dit import DiT
    torch.manual_seed(0)
    clip = CLIPTextModel(**CLIP_TINY).requires_grad_(False)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                text_dim=CLIP_TINY["hidden_size"])
    seen = []
    clip.encoder.layers[0].mlp.fc1.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    args = settings.parse_args(["--grad-accum", "2"])
    batch = (torch.randn(4, 1, 8, 8), ["a cat", "", "a dog", "two cats"], torch.tensor([1, 500, 999, 3]),
             torch.randn(4, 1, 8, 8))
    opt = torch.optim.AdamW(model.parameters())
    for dtype, on in ((torch.bfloat16, True), (torch.float32, False)):
        autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=on)
        terms = training.train_step(model, opt, batch, create_diffusion("", "cosine"), grad_accum=args.grad_accum,
                                    autocast=autocast, condition=functools.partial(caption_embeddings, clip))
        assert seen == [dtype, dtype] and terms.isfinite().all()  # one call per micro-batch
        seen.clear()


def test_the_prefetched_batches_are_get_batchs_and_pinned_only_for_cuda(monkeypatch):
    """
    train.py's loop reads the next step's rows in a thread (training.Prefetcher): the same batches
    as get_batch, in the same order, after a jump (a resume) too, for stored latents (bench's) and
    pixels with captions. Page-locked memory only when the device is CUDA (a CPU-only torch has
    none): on the CPU nothing is pinned; for CUDA, every host tensor of a batch is.
    """
    import bench
    pinned = []

    def pin_memory(tensor):
        pinned.append(tensor.dtype)
        return tensor
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    cpu = torch.device("cpu")
    with bench.synthetic_run(bench.PRESETS["tiny"]) as (stored, latents):
        digits = settings.parse_args(["--dataset", "digits", "--batch-size", "6"])
        pixels = PreparedData(digits.data)
        pixels.captions = [[f"digit {i}", f"a {i}"] for i in range(len(pixels))]
        digits.text = True
        for data, args in ((latents, stored), (pixels, digits)):
            rows = np.arange(len(data))
            for rank, world in ((0, 1), (1, 2)):
                batches = training.Prefetcher(data, rows, args, cpu, rank, world)
                for step in (0, 1, 2, 7, 8):
                    got, want = batches.get(step), training.get_batch(data, rows, step, args, cpu, rank, world)
                    assert all(g == w if isinstance(g, list) else torch.equal(g, w)
                               for g, w in zip(got, want, strict=True))
                batches.close()
        assert pinned == []
        assert training.Prefetcher(latents, rows, stored, torch.device("cuda", 0)).read.keywords["pin"]
        training.host_batch(latents, np.arange(len(latents)), 3, stored, pin=True)
        training.host_batch(pixels, np.arange(len(pixels)), 3, digits, pin=True)
    assert pinned == [torch.float16, torch.int64, torch.uint8, torch.int64, torch.bool]


def test_cudnn_benchmark_for_the_unet_on_cuda_only(monkeypatch):
    """cuDNN times its convolution kernels for SD's UNet on CUDA (fixed shapes); a DiT (no
    convolutions but its patch embedding) and the CPU leave the setting alone."""
    for flag in ("benchmark", "allow_tf32"):
        monkeypatch.setattr(torch.backends.cudnn, flag, False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    train.cuda_settings(torch.device("cpu"), True)  # sd-tiny
    assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
    train.cuda_settings(torch.device("cuda", 0), False)  # DiT-B/2
    assert not torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32
    train.cuda_settings(torch.device("cuda", 0), True)  # sd15
    assert torch.backends.cudnn.benchmark


def test_the_demo_bits_per_dim_can_be_turned_off():
    assert settings.parse_args([]).eval_bpd is True
    assert settings.parse_args(["--no-eval-bpd"]).eval_bpd is False


#################################################################################
#        One step for every card: micro-batches, checkpointing, precision       #
#################################################################################

def test_grad_accum_equals_one_batch_and_resumes_bit_identically(tmp_path):
    """
    K=4 micro-batches of 4 give the gradient of one batch of 16, and a resumed K=4 run is exact.
    The gradients are compared through Adam's first moment after one step, (1 - beta1) g, which is
    linear in them: the weights would not do, since Adam divides each gradient by its own size, so
    a component that is rounding noise (1e-11 against eps 1e-8) moves by a fraction of lr either way
    (1.2e-5 was measured on one x86 CPU, under 1e-5 on another). The two sums differ in order only:
    float32 rounding (2^-24 = 6e-8 per addition, over the 16 images and the tokens) puts them
    within 1e-4 of the largest component (8e-8 measured), and 1e-3 leaves room for cancellation;
    a micro-batch lost or counted twice, or a missing 1/K, moves them by 1/16 = 6e-2 or more.
    """
    common = ["--init", str(ROOT / "assets" / "dit_digits.pt"), "--method", "dmp", "--lr", "1e-2"]
    one = run(tmp_path, *common, "--iterations", "1", "--ckpt-every", "1", name="one")
    four_1 = run(tmp_path, *common, "--grad-accum", "4", "--iterations", "1", "--ckpt-every", "1",
                 name="four_1")
    a, b = (read_state_dict(load.checkpoints(d)[-1])["opt"]["state"] for d in (one, four_1))
    assert a.keys() == b.keys() and len(a) > 0
    worst = max(((a[i]["exp_avg"] - b[i]["exp_avg"]).abs().max() / a[i]["exp_avg"].abs().max()).item()
                for i in a)
    assert worst < 1e-3, worst
    # The losses of the first step (the same weights): means of 16 positive terms in two orders,
    # within 16 roundings (1e-6) of each other.
    x, y = ([e for e in log_of(d) if "loss" in e][0] for d in (one, four_1))
    assert [x[k] for k in training.LOG_TERMS] == pytest.approx([y[k] for k in training.LOG_TERMS],
                                                            rel=1e-5, abs=1e-9)
    four = run(tmp_path, *common, "--grad-accum", "4", "--iterations", "4", "--ckpt-every", "2",
               name="four")
    b = read_state_dict(load.checkpoints(four)[-1])
    assert max(v.abs().max() for v in b["raw_state"].values()) > 1e-2  # the prompts and gate moved
    part = run(tmp_path, *common, "--grad-accum", "4", "--iterations", "2", "--ckpt-every", "2",
               name="part")
    train.main(["--resume", str(part), "--iterations", "4"])
    c = read_state_dict(load.checkpoints(part)[-1])
    assert same_state(b["raw_state"], c["raw_state"]) and same_state(b["state"], c["state"])
    assert str(b["opt"]["state"]) == str(c["opt"]["state"])
    assert ([e["loss"] for e in log_of(four) if "loss" in e][2:]
            == [e["loss"] for e in log_of(part) if "loss" in e][2:])
    code, text = cli(*FAST, "--results-dir", tmp_path / "runs", "--grad-accum", "3")
    assert code == 1 and "--batch-size 16 does not split over 1 process x 3 micro-batches" in text


def test_balancing_losses_over_micro_batches(base_checkpoint, monkeypatch):
    """
    The importance loss is a mean over samples: four micro-batches give the batch's. Hard
    selection's smooth load is, per block, the CV^2 of a sum S over the batch: with the gate's noise
    the same, the parts' sums S_k add up to S, CV^2(S) <= sum_k w_k CV^2(S_k) with w_k = mean(S_k) /
    mean(S), the weights are 1/4 to 5%, and here the step's load (their plain mean) is above the
    batch's.
    """
    cpu = torch.device("cpu")
    losses, sums = {}, []
    for selection in ("soft", "hard"):
        args = settings.parse_args(FAST + ["--init", str(base_checkpoint), "--method", "dmp",
                                        "--selection", selection])
        data = PreparedData(args.data)
        rows, _ = training.split(data, args.holdout)
        model, *_ = train.build_model(args, data)
        mop = model.train().block_input
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a gate that prefers some prompts, so the losses are not zero
            mop.gate.weight.copy_(torch.randn(mop.gate.weight.shape, generator=gen))
            mop.gate_index.copy_(torch.randn(mop.gate_index.shape, generator=gen))
        noise = torch.randn(16, mop.depth, mop.num_prompts, generator=gen)
        taken = [0]

        def gate_noise(like, noise=noise, taken=taken):
            """The gate's noise: the next rows of one draw for the batch, however it is split."""
            out = noise[taken[0]: taken[0] + len(like)]
            taken[0] += len(like)
            return out
        monkeypatch.setattr(torch, "randn_like", gate_noise)
        batch = training.get_batch(data, rows, 3, args, cpu)
        diffusion = create_diffusion("", args.noise_schedule)
        mixtures = []
        whole = training.compute_loss(model, diffusion, batch, mixtures=mixtures)[1]
        sums = [mixtures[-1].load]
        taken[0] = 0
        parts = []
        for i in range(0, 16, 4):
            micro = training.micro_batch(batch, slice(i, i + 4))
            parts.append(training.compute_loss(model, diffusion, micro, mixtures=mixtures)[1])
            sums.append(mixtures[-1].load)
        monkeypatch.undo()
        means = zip(whole.tolist(), torch.stack(parts).mean(0).tolist(), strict=True)
        losses[selection] = dict(zip(training.LOG_TERMS, means, strict=True))
    soft, hard = losses["soft"], losses["hard"]
    assert soft["importance"][0] > 1e-3 and hard["importance"][0] > 1e-3
    for terms in (soft, hard):
        for name in ("mse", "vb", "importance"):
            assert terms[name][1] == pytest.approx(terms[name][0], rel=1e-5), name
    assert soft["load"] == (0.0, 0.0)  # Eq. 11 under a softmax
    S, parts = sums[0], torch.stack(sums[1:])  # (L, N), (4, L, N): hard selection's
    assert torch.allclose(parts.sum(0), S, rtol=1e-5)
    w = parts.mean(-1) / S.mean(-1)  # (4, L)
    assert (w - 0.25).abs().max() < 0.05 * 0.25
    assert (dmp.cv_squared(S) <= (w * dmp.cv_squared(parts)).sum(0) * (1 + 1e-6)).all()
    whole_load, parts_load = hard["load"]
    assert whole_load > 1e-4 and parts_load >= whole_load


def test_checkpointing_changes_nothing(tmp_path, base_checkpoint):
    for extra in ([], ["--init", str(base_checkpoint), "--method", "dmp", "--noisy-gate"]):
        states = []
        for name, flag in (("plain", []), ("ckpt", ["--checkpointing"])):
            d = run(tmp_path / str(len(extra)), *extra, *flag, "--iterations", "3", "--ckpt-every",
                    "3", "--lr", "1e-2", name=name)
            entries = read_state_dict(load.checkpoints(d)[-1])
            states.append(entries.get("model") or entries["state"])
        assert same_state(*states)


def test_fp16_with_a_gradient_scaler_on_cpu(tmp_path, monkeypatch):
    """
    --precision fp16 runs fp16 autocast with torch's GradScaler (on CPU too): a step whose
    gradients overflow leaves the weights as they were and halves the scale, a finite one steps;
    a resumed run restores the scale and ends bit-identical.
    """
    common = ["--precision", "fp16", "--lr", "1e-3", "--ema", "0"]
    whole = run(tmp_path, *common, "--iterations", "4", "--ckpt-every", "2", name="whole")
    part = run(tmp_path, *common, "--iterations", "2", "--ckpt-every", "2", name="part")
    train.main(["--resume", str(part), "--iterations", "4"])
    a, b = (read_state_dict(load.checkpoints(d)[-1]) for d in (whole, part))
    assert same_state(a["model"], b["model"]) and a["scaler"] == b["scaler"]
    assert a["scaler"]["scale"] in [2.0 ** k for k in range(17)]  # 65536, halved per overflow
    assert log_of(whole)[0]["precision"] == "fp16"
    assert [e["precision"] for e in log_of(part) if e.get("event") == "resume"] == ["fp16"]

    args = settings.parse_args(FAST + ["--precision", "fp16"])
    data = PreparedData(args.data)
    rows, _ = training.split(data, args.holdout)
    model, groups, *_ = train.build_model(args, data)
    opt = torch.optim.AdamW(groups[0]["params"], lr=1e-3)
    autocast, scaler = training.mixed_precision("fp16", torch.device("cpu"))
    scaler.load_state_dict(dict(scaler.state_dict(), scale=1.0))  # this model's gradients fit fp16
    diffusion = create_diffusion("", args.noise_schedule)
    real = training.compute_loss

    def overflowing(*a):
        loss, terms = real(*a)
        return loss * float("inf"), terms
    for overflow in (True, False):
        before = [p.detach().clone() for p in model.parameters()]
        monkeypatch.setattr(training, "compute_loss", overflowing if overflow else real)
        batch = training.get_batch(data, rows, 0, args, torch.device("cpu"))
        training.train_step(model, opt, batch, diffusion, autocast=autocast, scaler=scaler)
        changed = [not torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True)]
        assert scaler.get_scale() == 0.5  # halved by the overflow, then kept
        assert any(changed) != overflow


def test_an_out_of_memory_error_is_one_sentence_and_keeps_the_run(tmp_path, unchanged, monkeypatch):
    first = run(tmp_path, "--iterations", "1", "--ckpt-every", "1")
    kept, log = unchanged(first / "checkpoints"), (first / "log.jsonl").read_bytes()

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(training, "compute_loss", out_of_memory)
    code, text = cli("--resume", first, "--iterations", "2", "--grad-accum", "2")
    assert code == 1 and "\n" not in text
    assert text.startswith("error: out of memory on cpu at step 2: a global batch of 16 (16 on "
                           "this process in 2 micro-batches of 8) did not fit; --grad-accum 4 "
                           "(micro-batches of 4), --checkpointing")
    assert "or a smaller --batch-size would help" in text
    kept()
    assert (first / "log.jsonl").read_bytes().startswith(log)
    code, text = cli(*FAST, "--results-dir", tmp_path / "new", "--checkpointing")
    assert code == 1 and "--checkpointing" not in text and "--grad-accum 2" in text
    assert list((tmp_path / "new").iterdir()) == []  # a fresh run leaves no empty folder


def test_compiled_blocks_give_the_eager_step(base_checkpoint):
    """
    --compile's regional compilation, traced by dynamo (aot_eager: no C++ build): the four blocks
    share one compiled graph, and the step with checkpointing is the eager one.
    """
    from torch._dynamo.utils import counters
    args = settings.parse_args(FAST + ["--init", str(base_checkpoint), "--method", "dmp"])
    data = PreparedData(args.data)
    rows, _ = training.split(data, args.holdout)
    diffusion = create_diffusion("", args.noise_schedule)
    batch = training.get_batch(data, rows, 0, args, torch.device("cpu"))
    grads = []
    for compiled in (False, True):
        model, *_ = train.build_model(args, data)
        with torch.no_grad():
            model.block_input.prompts.normal_(generator=torch.Generator().manual_seed(0))
        model.set_checkpointing(True).train()
        if compiled:
            torch._dynamo.reset()
            counters.clear()
            training.compile_blocks(model, backend="aot_eager")
        loss, _ = training.compute_loss(model, diffusion, batch)
        loss.backward()
        grads.append([loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad])
    assert counters["stats"]["unique_graphs"] == 1 and counters["aot_autograd"]["total"] == 1
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_flips_are_a_switch_the_digits_presets_turn_off_and_the_command_line_back_on():
    assert settings.parse_args(["--dataset", "digits"]).flip is False
    assert settings.parse_args(["--dataset", "demo"]).flip is False
    assert settings.parse_args(["--dataset", "ffhq"]).flip is True
    assert settings.parse_args(["--dataset", "ffhq", "--no-flip"]).flip is False
    args = settings.parse_args(["--dataset", "digits", "--flip", "--batch-size", "16"])
    assert args.flip is True
    data = PreparedData(args.data)
    rows, _ = training.split(data, args.holdout)
    flipped = training.get_batch(data, rows, 0, args, torch.device("cpu"))[0]
    args.flip = False
    plain = training.get_batch(data, rows, 0, args, torch.device("cpu"))[0]
    mirrored = [i for i in range(16) if not torch.equal(flipped[i], plain[i])]
    assert 0 < len(mirrored) < 16  # each image flipped with probability 1/2
    for i in mirrored:
        assert torch.equal(flipped[i], plain[i].flip(-1))


def test_augment_rotates_shifts_and_shrinks_never_enlarges():
    """
    dataset.augment's geometry, pinned by transformations whose result is known exactly: the
    identity draw, a 90-degree turn (pixel centres land on pixel centres), a half-pixel shift (each
    pixel the mean of two neighbours) and a shrink by 2 about the centre (the outer ring becomes
    background). Bilinear weights in float32: within 1e-5 of values in [-1, 1].
    """
    x = torch.linspace(-1, 1, 128).view(2, 1, 8, 8)
    def draw(*u):
        return torch.tensor([u, u])
    # the identity: x + 1 - 1 (the background's shift) is x to an ulp of 2, 2**-22
    assert torch.allclose(augment(x, draw(0.5, 1, 0.5, 0.5)), x, atol=2 ** -22, rtol=0)
    turned = augment(x, draw(1, 1, 0.5, 0.5), rotate=90)
    assert torch.allclose(turned, torch.rot90(x, -1, (2, 3)), atol=1e-5, rtol=0)
    shifted = augment(x, draw(0.5, 1, 1, 0.5))  # half a pixel along the width
    assert torch.allclose(shifted[..., :-1], (x[..., :-1] + x[..., 1:]) / 2, atol=1e-5, rtol=0)
    assert torch.allclose(shifted[..., -1], (x[..., -1] - 1) / 2, atol=1e-5, rtol=0)  # background
    shrunk = augment(torch.ones(1, 1, 8, 8), draw(0.5, 0, 0.5, 0.5)[:1], scale=(0.5, 0.5))
    ring = torch.ones(8, 8, dtype=torch.bool)
    ring[2:6, 2:6] = False
    assert (shrunk[0, 0][ring] == -1).all() and (shrunk[0, 0][~ring] == 1).all()


def test_augment_draws_fresh_transformations_per_step_the_same_over_processes():
    """
    --augment: every training image transformed by a draw of (seed, step), drawn for the whole
    global batch (two processes' shares are one process's batch) after the step's other draws
    (timesteps and noise are those of a run without it); the held-out images get fixed draws,
    the same at every evaluation, and the presets leave it off.
    """
    assert settings.parse_args(["--dataset", "digits"]).augment is False
    args = settings.parse_args(["--dataset", "digits", "--augment", "--batch-size", "16"])
    data = PreparedData(args.data)
    rows, heldout_rows = training.split(data, args.holdout)
    cpu = torch.device("cpu")
    x, y, t, noise = training.get_batch(data, rows, 0, args, cpu)
    halves = [training.get_batch(data, rows, 0, args, cpu, rank, 2) for rank in (0, 1)]
    for whole, *shares in zip((x, y, t, noise), *halves, strict=True):
        assert torch.equal(whole, torch.cat(shares))
    args.augment = False
    plain, _, t_plain, noise_plain = training.get_batch(data, rows, 0, args, cpu)
    assert torch.equal(t, t_plain) and torch.equal(noise, noise_plain)
    assert all(not torch.equal(a, b) for a, b in zip(x, plain, strict=True))
    assert torch.equal(heldout.fixed_draws(plain, args, 0), plain)
    args.augment = True
    fixed = heldout.fixed_draws(plain, args, 0)
    assert torch.equal(fixed, heldout.fixed_draws(plain, args, 0)) and not torch.equal(fixed, x)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                num_classes=1, learn_sigma=True).eval()
    torch.manual_seed(0)
    for p in model.final_layer.parameters():  # DiT's is zero: its output would not read x
        torch.nn.init.normal_(p, std=0.1)
    diffusion = create_diffusion("", "cosine")
    measured = [heldout.evaluate(model, diffusion, data, heldout_rows[:8], args, cpu)
                for _ in range(2)]
    args.augment = False
    assert measured[0] == measured[1] != heldout.evaluate(model, diffusion, data,
                                                          heldout_rows[:8], args, cpu)


def test_augment_refuses_latents(tmp_path, capsys, one_sentence):
    synthetic_latents(tmp_path / "latents", 8, (4, 4, 4), 1)
    code, text = cli(*FAST, "--data", tmp_path / "latents", "--holdout", "0", "--augment",
                     "--results-dir", tmp_path / "runs")
    text = text or one_sentence(capsys.readouterr().err)
    assert code == 1 and "--augment transforms pixels" in text
    assert not (tmp_path / "runs").exists()


def test_a_run_saved_with_the_old_no_flip_setting_resumes_without_flips(tmp_path):
    """Runs started before --flip/--no-flip recorded no_flip: a resumed one keeps what it drew."""
    saved = vars(settings.parse_args(["--dataset", "ffhq"]))
    del saved["flip"], saved["given"]
    for no_flip in (True, False):
        args = settings.parse_args(["--resume", str(tmp_path)])
        given = set(vars(args).pop("given"))
        resumed = resumed_args(args, given, dict(saved, no_flip=no_flip), tmp_path)
        assert resumed.flip is not no_flip and not hasattr(resumed, "no_flip")


# ------------------------------------------------ nothing lost, nothing mixed (issue 24: train.py)

def data_copy(tmp_path, name, classes=None):
    """assets/digits copied; with `classes`, its labels folded into that many classes."""
    out = tmp_path / name
    shutil.copytree(ROOT / "assets" / "digits", out)
    if classes:
        labels = np.load(out / "labels.npy") % classes
        np.save(out / "labels.npy", labels)
        manifest = json.loads((out / "manifest.json").read_text())
        manifest.update(num_classes=classes, class_names=[str(c) for c in range(classes)])
        (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_a_resume_refuses_other_data_under_the_same_path(tmp_path, unchanged):
    """Item 6: `--resume` did not notice that --data now held other prepared data, and trained on."""
    data = data_copy(tmp_path, "data")
    run_dir = run(tmp_path, "--data", str(data), "--iterations", "1", "--ckpt-every", "1")
    shutil.rmtree(data)
    data_copy(tmp_path, "data", classes=3)  # other prepared data, the same path
    kept = unchanged(tmp_path)
    code, text = cli("--resume", run_dir, "--iterations", "2")
    assert code == 1 and "data now holds other prepared data than" in text and "\n" not in text, text
    kept()


def test_a_run_folder_is_held_by_one_process(tmp_path, unchanged):
    """Item 7: two `--resume` of one run at once both went on, every step logged twice."""
    run_dir = run(tmp_path, "--iterations", "1", "--ckpt-every", "1")
    holder = subprocess.Popen(["flock", "--no-fork", str(run_dir / ".lock"), "sleep", "30"])  # another process
    try:
        while not subprocess.run(["flock", "-n", str(run_dir / ".lock"), "true"]).returncode:
            pass  # until it holds the folder
        kept = unchanged(tmp_path)
        code, text = cli("--resume", run_dir, "--iterations", "2")
        assert code == 1 and f"{run_dir} is in use by another process (a train.py run)" in text, text
        kept()
    finally:
        holder.kill()
        holder.wait()
    train.main(["--resume", str(run_dir), "--iterations", "2"])  # the other one gone: it goes on
    assert [e["step"] for e in log_of(run_dir) if "loss" in e] == [1, 2]


def test_further_training_on_more_classes_than_the_model_knows_is_refused(tmp_path, unchanged):
    """Item 10: a 2-class model on 3-class data trained label 2, its guidance null class, as a class."""
    two, three = data_copy(tmp_path, "two", classes=2), data_copy(tmp_path, "three", classes=3)
    base = run(tmp_path, "--data", str(two), "--no-unconditional", "--iterations", "1", "--ckpt-every", "1")
    kept = unchanged(tmp_path)
    code, text = cli(*FAST, "--results-dir", tmp_path / "runs", "--data", three, "--no-unconditional",
                     "--init", load.checkpoints(base)[-1], "--method", "dmp", "--iterations", "1")
    assert code == 1 and "three has 3 classes and" in text and "knows 2 (label 2 is its guidance null" in text
    kept()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [base.name]


def test_a_log_without_its_last_newline_gets_whole_lines(tmp_path):
    """Item 13: the resume entry was glued onto a last line that had lost its newline (a hand edit)."""
    run_dir = run(tmp_path, "--iterations", "1", "--ckpt-every", "1")
    log = run_dir / "log.jsonl"
    log.write_bytes(log.read_bytes().rstrip(b"\n"))
    train.main(["--resume", str(run_dir), "--iterations", "2"])
    entries = log_of(run_dir)  # every line parses
    assert [e.get("event") for e in entries if "event" in e][-1] == "resume"


def test_ctrl_c_saves_the_step_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    """Item 14: Ctrl-C was a KeyboardInterrupt traceback leaving log lines and no checkpoint."""
    step = training.train_step
    calls = []

    def ctrl_c_in_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # arrives in the middle of the step
        return step(*args, **kwargs)
    monkeypatch.setattr(training, "train_step", ctrl_c_in_step_two)
    code, text = cli(*FAST, "--results-dir", tmp_path / "runs", "--iterations", "6", "--ckpt-every", "6")
    run_dir = next((tmp_path / "runs").iterdir())
    assert code == 1 and error_line(capsys.readouterr().err + text) == text
    assert f"interrupted (Ctrl-C) at step 2; the run is saved in {run_dir}/checkpoints/0000002.pt" in text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    monkeypatch.undo()
    train.main(["--resume", str(run_dir), "--iterations", "3"])
    assert [e["step"] for e in log_of(run_dir) if "loss" in e] == [1, 2, 3]


def test_folders_given_as_checkpoint_files_are_named_as_folders(tmp_path, unchanged):
    """Item 15: `--init assets/digits` (a folder that exists) said "no such file"."""
    kept = unchanged(tmp_path)
    code, text = cli(*FAST, "--results-dir", tmp_path / "runs", "--init", ROOT / "assets" / "digits",
                     "--method", "dmp")
    assert code == 1 and "digits is a folder, not a checkpoint file" in text, text
    kept()


def compiled_frames(model, *inputs):
    """Dynamo's counters for one forward of the model after compile_blocks (the eager backend:
    what is traced, not how it runs)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = model(*inputs)
    training.compile_blocks(model, backend="eager")
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=1):
        assert torch.equal(model(*inputs), eager)  # the same operations, traced
    frames, graphs = dict(counters["frames"]), counters["stats"]["unique_graphs"]
    breaks = sum(counters["graph_break"].values())
    torch._dynamo.reset()
    return frames, graphs, breaks


def test_compile_covers_every_unet_block_and_dit_in_one_graph():
    """
    The UNet's blocks all run TimestepEmbedSequential.forward but differ, so each is a graph of its
    own; with one code object Dynamo stops at its recompile limit (8; 1 here, on a 5-block UNet:
    a ResBlock, the middle block, ...) and runs the rest eager. DiT's identical blocks: one graph.
    """
    from model_unet import SD_TINY, UNetModel
    torch.manual_seed(0)
    unet = UNetModel(**dict(SD_TINY, channel_mult=[1], num_res_blocks=1, attention_resolutions=[]))
    dmp.patch(unet, "dmp", prompt_grid=4)
    blocks = 1 + len(unet.input_blocks) + len(unet.output_blocks)
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(2, 5, 32)
    assert compiled_frames(unet, x, t, context) == (dict(total=blocks, ok=blocks), blocks, 0)
    dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
              num_classes=10)
    dmp.patch(dit, "dmp")
    assert compiled_frames(dit, x, t, torch.tensor([1, 2])) == (dict(total=1, ok=1), 1, 0)
    # sd-tiny's 25 blocks (traced above on 5, to stay fast): 25 code objects, so 25 caches
    sd_tiny = training.compile_blocks(UNetModel(**SD_TINY), backend="eager")
    blocks = [*sd_tiny.input_blocks, sd_tiny.middle_block, *sd_tiny.output_blocks]
    codes = {id(b.forward._torchdynamo_orig_callable.__func__.__code__) for b in blocks}
    assert len(blocks) == len(codes) == 25


# DMP's options that change which parameters exist or which get a gradient: each must train under
# DDP, which stops at the second step when a trained parameter got no gradient in the first.
DDP_STRUCTURES = [["--gate", "attention"], ["--authors-code", "--gate", "attention"],
                  ["--selection", "hard"], ["--selection", "hard", "--hard-weights", "one"],
                  ["--authors-code"], ["--prompt-depth", "1"]]


def _train_every_structure(rank, world):
    """Three DDP steps of each of DDP_STRUCTURES on a tiny DiT: the flags of those that ran."""
    done = []
    for flags in DDP_STRUCTURES:
        args = settings.parse_args(FAST + ["--method", "dmp", *flags])
        torch.manual_seed(0)
        model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                    num_classes=1, class_dropout_prob=0.0)
        groups = dmp.patch(model, "dmp", **settings.method_options(args))
        ddp = torch.nn.parallel.DistributedDataParallel(model.train())
        opt = torch.optim.SGD([p for g in groups for p in g["params"]], lr=0.1)
        for step in range(3):
            torch.manual_seed(step * world + rank)
            x, t = torch.randn(2, 1, 8, 8), torch.randint(0, 1000, (2,))
            mixtures = []
            loss = ddp(x, t, torch.zeros(2, dtype=torch.long), mixtures=mixtures).square().mean()
            (loss + sum(dmp.balancing_losses(mixtures))).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        done.append(" ".join(flags))
    return done


@pytest.mark.parametrize("flags", [["--gate", "attention", "--noisy-gate"],
                                   ["--gate", "attention", "--selection", "hard"],
                                   ["--selection", "hard", "--hard-weights", "one", "--top-k", "1"],
                                   ["--selection", "hard", "--hard-weights", "one", "--load-coef", "0"]])
def test_dmp_options_that_leave_the_gate_untrained_are_one_sentence(flags, capsys, one_sentence):
    with pytest.raises(SystemExit):
        settings.parse_args(FAST + ["--method", "dmp", *flags])
    assert "gate" in one_sentence(capsys.readouterr().err)
