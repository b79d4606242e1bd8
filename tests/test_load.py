"""load.py: a train.py run folder names its last checkpoint, for the model and its recorded settings."""
import torch

import load
from model_dit import DiT


def test_a_run_folder_loads_its_last_checkpoint(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    models = {}
    for step, schedule in ((2, "linear"), (4, "cosine")):
        torch.manual_seed(step)
        model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2,
                    num_heads=2, num_classes=1, class_dropout_prob=0.0)
        with torch.no_grad():  # DiT starts with a zero output layer: weights that give an output
            for param in model.parameters():
                param.normal_(0, 0.1)
        torch.save(dict(model=model.state_dict(), ema=None, config=model.config,
                        noise_schedule=schedule, vae="none"),
                   tmp_path / "run" / "checkpoints" / f"{step:07d}.pt")
        models[step] = model.eval()
    (tmp_path / "run" / "checkpoints" / "0000009.pt.tmp").write_bytes(b"half a checkpoint")
    assert load.resolve(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "0000004.pt"
    loaded = load.load_model(tmp_path / "run").eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 500]), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), models[4](x, t, y))
        assert not torch.equal(loaded(x, t, y), models[2](x, t, y))
    assert load.recorded_settings(tmp_path / "run") == dict(noise_schedule="cosine", vae="none")
    assert load.resolve(tmp_path) == tmp_path  # a folder without checkpoints/ is itself (diffusers)


def init_files(tmp_path):
    """What --init is given, in `tmp_path`: a plain DiT state dict (the official layout,
    plain.pt), a train.py checkpoint of the same weights (train.pt) and a DMP patch on it
    (patch.pt), which is returned as a model (its prompts zero: the same outputs as the base)."""
    import dmp
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4,
                num_classes=1, class_dropout_prob=0.0)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    torch.save(dict(model=model.state_dict(), ema=model.state_dict(), config=model.config,
                    noise_schedule="cosine", vae="none"), tmp_path / "train.pt")
    patched = load.load_model(tmp_path / "train.pt")
    dmp.patch(patched, "dmp")
    load.save_patch(patched, tmp_path / "patch.pt", base=tmp_path / "train.pt", vae="none")
    return patched


def test_init_opens_each_file_once(tmp_path, monkeypatch):
    """
    train.py --init (load.open_model with the base's record): a plain state dict (the official
    layout), a train.py checkpoint and a patch on it are each opened once, their sha256 taken from
    that one read, and the settings they recorded from it too.
    """
    import builtins
    import hashlib
    import io
    import os
    patched = init_files(tmp_path)
    opened = []

    def counting(real):
        def opener(file, *args, **kwargs):
            if str(file).startswith(str(tmp_path)):
                opened.append(os.path.basename(str(file)))
            return real(file, *args, **kwargs)
        return opener
    for module, name in ((builtins, "open"), (io, "open"), (os, "open")):
        monkeypatch.setattr(module, name, counting(getattr(module, name)))
    for init, files, settings in (("plain.pt", ["plain.pt"], {}),
                                  ("train.pt", ["train.pt"], dict(noise_schedule="cosine", vae="none")),
                                  ("patch.pt", ["patch.pt", "train.pt"], dict(noise_schedule="cosine", vae="none"))):
        opened.clear()
        loaded, found = load.open_model(tmp_path / init, num_heads=4, record=True)
        assert sorted(opened) == sorted(files), init  # each file once
        digest = hashlib.sha256((tmp_path / init).read_bytes()).hexdigest()
        assert found["base"]["sha256"] == digest and found["settings"] == settings
        x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 700]), torch.zeros(2, dtype=torch.long)
        with torch.no_grad():
            assert torch.equal(loaded.eval()(x, t, y), patched.eval()(x, t, y))


def test_following_init_to_a_model_touches_three_files(tmp_path):
    """
    Issue 26: following train.py --init to a loaded model (load.open_model with the base's record)
    runs functions of three project files: load.py (resolving the name, reading each file once),
    checkpoints.py (the one reader every loader shares: torch.load with weights_only=True, the
    strict fill) and model_dit.py (the DiT, its config from the file). That holds for a plain state
    dict, a train.py checkpoint and a run folder (its last checkpoint, as `--init runs/000-...`).
    A patch adds the file of the method it patches with, dmp.py (dmp.patch rebuilds the prompts and
    the gate before its weights load; train.py then refuses an already patched --init), and
    nothing else. Traced: every Python function called while it loads, by its source file.
    """
    import os
    import shutil
    import sys
    init_files(tmp_path)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "train.pt", tmp_path / "run" / "checkpoints" / "0000004.pt")
    root, touched = os.path.dirname(os.path.abspath(load.__file__)), set()

    def tracer(frame, event, arg):
        file = os.path.abspath(frame.f_code.co_filename)  # ("<string>": code made at run time)
        if os.path.dirname(file) == root and file.endswith(".py"):  # not tests/, torch, <string>
            touched.add(os.path.basename(file))
        return None  # calls only, no line events
    path = {"load.py", "checkpoints.py", "model_dit.py"}
    for init, files in (("plain.pt", path), ("train.pt", path), ("run", path),
                        ("patch.pt", path | {"dmp.py"})):
        touched.clear()
        previous = sys.gettrace()
        sys.settrace(tracer)
        try:
            load.open_model(tmp_path / init, num_heads=4, record=True)
        finally:
            sys.settrace(previous)
        assert touched == files, init
