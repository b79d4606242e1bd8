"""train.py on the bundled digits with the tiny DiT: resume, crash safety, NaN stop, every method, DDP."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dmp
import train
from checkpoints import read_state_dict

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
    return train.checkpoints(run_dir)[-1]


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra", [[], ["--init", "BASE", "--method", "dmp", "--noisy-gate"]], ids=["pretrain", "dmp"])
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, base_checkpoint, extra):
    extra = [str(base_checkpoint) if e == "BASE" else e for e in extra]
    whole = run(tmp_path, "--iterations", "6", "--ckpt-every", "3", *extra, name="whole")
    part = run(tmp_path, "--iterations", "3", "--ckpt-every", "3", *extra, name="part")
    train.main(["--resume", str(part), "--iterations", "6"])
    a, b = (read_state_dict(train.checkpoints(d)[-1]) for d in (whole, part))
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
    assert train.checkpoints(run_dir)[-1].name == "0000002.pt" and any(f.endswith(".tmp") for f in files)
    assert read_state_dict(train.checkpoints(run_dir)[-1])["step"] == 2
    train.main(["--resume", str(run_dir)])  # and the run goes on from there
    assert read_state_dict(train.checkpoints(run_dir)[-1])["step"] == 6


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    driver = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import train
real, count = train.compute_loss, [0]
def compute_loss(*args):
    loss, terms = real(*args)
    count[0] += 1
    return (loss * float("nan"), terms * float("nan")) if count[0] > 2 else (loss, terms)
train.compute_loss = compute_loss
train.main({FAST + ["--results-dir", str(tmp_path / "runs"), "--iterations", "6", "--ckpt-every", "2"]!r})
"""
    out = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 1
    message = out.stderr.strip().splitlines()[-1]
    assert "no longer finite at step 3" in message and "0000002.pt" in message
    run_dir = next((tmp_path / "runs").iterdir())
    assert [p.name for p in train.checkpoints(run_dir)] == ["0000002.pt"]
    state = read_state_dict(train.checkpoints(run_dir)[-1])["model"]
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
    ckpt = train.checkpoints(run_dir)[-1]
    entries = read_state_dict(ckpt)
    assert entries["method"] == method and entries["base"]["name"] == str(base_checkpoint)
    model = dmp.load_model(str(ckpt))  # base + what the method trained
    base = dmp.load_model(str(base_checkpoint))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 900]), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        assert not torch.equal(model.eval()(x, t, y), base.eval()(x, t, y))


def test_one_lr_rule_explicit_multipliers_and_the_gate_log(tmp_path, base_checkpoint):
    """--lr-scale and --gate-lr-scale reach the optimiser; a DMP run logs its gate's movement."""
    run_dir = run(tmp_path, "--init", str(base_checkpoint), "--method", "dmp", "--iterations", "3",
                  "--ckpt-every", "3", "--lr", "1e-2", "--lr-scale", "0.5", "--gate-lr-scale", "10")
    groups = read_state_dict(train.checkpoints(run_dir)[-1])["opt"]["param_groups"]
    assert [g["lr"] for g in groups] == [5e-3, 5e-2]
    lines = [e for e in log_of(run_dir) if "loss" in e]
    assert len(lines) == 3
    assert all(0 <= e["gate_dev_mean"] <= e["gate_dev_max"] and e["gate_tv_t"] >= 0
               and 0 < e["gate_entropy_min"] <= 1 for e in lines)
    assert lines[-1]["gate_dev_max"] > 0  # the gate has left uniform: its prompts are non-zero now
    lora = run(tmp_path, "--init", str(base_checkpoint), "--method", "lora", "--lora-rank", "dmp",
               "--iterations", "1", "--ckpt-every", "1", name="lora")
    assert read_state_dict(train.checkpoints(lora)[-1])["options"]["rank"] == 1
    assert "gate_dev_max" not in log_of(lora)[-1]
    with pytest.raises(SystemExit):
        train.parse_args(["--lora-rank", "many"])


def test_dmp_from_scratch_trains_backbone_and_prompts(tmp_path):
    run_dir = run(tmp_path, "--method", "dmp", "--iterations", "2", "--ckpt-every", "2")
    model = dmp.load_model(str(train.checkpoints(run_dir)[-1]))
    assert isinstance(model.block_input, dmp.MixtureOfPrompts) and model.block_input.prompts.abs().sum() > 0


def _ddp_worker(rank, world, port, base, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    grads = _gradients(base, rank, world)
    if rank == 0:
        torch.save(grads, out)
    dist.destroy_process_group()


def _gradients(base, rank=0, world=1):
    """The gradient of one DMP training step's loss, computed on this process's share of the batch."""
    args = train.parse_args(FAST + ["--init", str(base), "--method", "dmp", "--batch-size", "8"])
    data = train.PreparedData(args.data)
    rows, _ = train.split(data, args.holdout)
    model, groups = train.build_model(args, data)
    with torch.no_grad():  # non-zero prompts (the same on every process): the gate gets a gradient too
        model.block_input.prompts.copy_(torch.randn(model.block_input.prompts.shape, generator=torch.Generator().manual_seed(0)))
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    batch = train.get_batch(data, rows, 5, args, torch.device("cpu"), rank, world)
    loss, _ = train.compute_loss(wrapped, model, train.create_diffusion("", args.noise_schedule), batch, args)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_ddp_with_two_cpu_processes_matches_the_single_process_gradient(tmp_path, base_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.manual_seed(0)
    single = _gradients(base_checkpoint)
    mp.spawn(_ddp_worker, args=(2, port, base_checkpoint, tmp_path / "g.pt"), nprocs=2)
    ddp = torch.load(tmp_path / "g.pt")
    assert single.keys() == ddp.keys()
    for name in single:
        assert torch.allclose(single[name], ddp[name], rtol=1e-5, atol=1e-7), name


def test_torchrun_runs_the_loop_with_two_processes(tmp_path, base_checkpoint):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train.py", *FAST, "--init", str(base_checkpoint), "--iterations", "2", "--ckpt-every", "2",
           "--results-dir", str(tmp_path / "runs")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    run_dir = next((tmp_path / "runs").iterdir())
    assert [p.name for p in train.checkpoints(run_dir)] == ["0000002.pt"]
    assert next(e for e in log_of(run_dir) if e.get("event") == "start")["world"] == 2


@pytest.fixture
def one_thread():
    """The tiny UNet runs several times faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_stable_diffusion_trains_dmp_on_a_tar_shard_then_samples_with_pndm(tmp_path, one_thread):
    """
    End to end: an SD-layout single file (the golden tiny UNet and VAE, a tiny CLIP), 8 captioned images in an
    img2dataset shard, 20 DMP steps, PNDM with guidance. A zero patch gives the base's samples bit for bit.
    """
    import io
    import tarfile
    import numpy as np
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
        channels = sum(c for c, _ in UNetModel(**sample.SD_MODELS["sd-tiny"]["unet"]).block_shapes)
    assert log[0]["trained_parameters"] == 256 * channels + (128 + 32 + 25) * 256 + 256 == 482_816  # prompts, gate
    assert all(math.isfinite(e["loss"]) for e in log if "loss" in e)
    ckpt = train.checkpoints(run_dir)[-1]
    entries = read_state_dict(ckpt)
    assert entries["method"] == "dmp" and entries["options"]["gate_cond"] == "t+c" and entries["step"] == 20
    assert max(v.abs().max() for k, v in entries["state"].items() if "prompts" in k) > 1e-3  # the prompts learned

    unet, _, _ = sample.load_sd(tmp_path / "sd-tiny.safetensors", "sd-tiny")
    dmp.patch(unet, "dmp", gate_cond="t+c")
    dmp.save_patch(unet, tmp_path / "zero.pt", base=tmp_path / "sd-tiny.safetensors")
    common = ["--model", "sd-tiny", "--prompt", "a photo of thing 1", "a red square", "--resolution", "32",
              "--steps", "5", "--seed", "3"]
    images = {}
    for name, extra in (("base", []), ("zero", ["--patch", str(tmp_path / "zero.pt")]), ("dmp", [])):
        ckpt_arg = str(ckpt) if name == "dmp" else str(tmp_path / "sd-tiny.safetensors")
        sample.main(common + ["--ckpt", ckpt_arg, "--out", str(tmp_path / f"{name}.png"), *extra])
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    assert images["base"].shape == (2 + 34, 2 * 34 + 2, 3) and images["base"].std() > 5
    assert np.array_equal(images["zero"], images["base"])  # a zero-initialised patch changes nothing
    assert np.abs(images["dmp"] - images["base"]).max() >= 1  # the trained one does (weights 1/256: a little)


def test_tiny_text_dit_pretrains_then_trains_dmp_on_captions_and_samples_from_prompts(tmp_path, one_thread):
    """
    --dataset coco with a tiny DiT and the golden tiny CLIP (a text_encoder/ folder): pretraining, DMP on t + text,
    then sample.py from prompts with guidance against the null embedding. A zero patch gives the base's samples.
    """
    import numpy as np
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
    base = train.checkpoints(next((tmp_path / "base").iterdir()))[-1]
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
    ckpt = train.checkpoints(run_dir)[-1]
    entries = read_state_dict(ckpt)
    assert entries["method"] == "dmp" and entries["options"]["gate_cond"] == "t+c"  # Table 9: t + text
    assert entries["text_encoder"] == str((tmp_path / "clip").resolve())
    assert max(v.abs().max() for k, v in entries["state"].items() if "prompts" in k) > 1e-3

    model = dmp.load_model(str(base))
    dmp.patch(model, "dmp", gate_cond="t+c")
    dmp.save_patch(model, tmp_path / "zero.pt", base=str(base))
    args = ["--prompt", "a photo of thing 1", "a red square", "--steps", "5", "--seed", "3"]
    images = {}
    zero = ["--ckpt", str(base), "--patch", str(tmp_path / "zero.pt")]
    for name, extra in (("base", ["--ckpt", str(base)]), ("zero", zero), ("dmp", ["--ckpt", str(ckpt)]),
                        ("cfg1", ["--ckpt", str(base), "--cfg-scale", "1"])):
        sample.main(args + extra + ["--out", str(tmp_path / f"{name}.png")])
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
    assert images["base"].shape == (2 + 10, 2 * 10 + 2, 3) and images["base"].std() > 5
    assert np.array_equal(images["zero"], images["base"])  # a zero-initialised patch changes nothing
    assert np.abs(images["dmp"] - images["base"]).max() >= 1  # the trained one does
    assert np.abs(images["cfg1"] - images["base"]).max() >= 1  # the default 1.5 guides against the null embedding
