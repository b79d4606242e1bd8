"""checkpoints.py: files that are not checkpoints get one whole sentence; written files get the umask's mode."""
import errno
import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from checkpoints import (CheckpointError, _reason, atomic_save, load_strict, model_weights,
                         read_state_dict, write_json)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_every_kind_of_wrong_file_is_one_sentence_naming_it(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    files = {"notes.txt": b"hello world\n", "config.json": b'{"lr": 0.0001}', "empty.pt": b"",
             "truncated.pt": data[: len(data) // 2], "image.pt": b"\x89PNG\r\n\x1a\n" + bytes(50),
             "code.pt": pickle.dumps({"w": _RunsCode()}, protocol=2)}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    expected = {"notes.txt": "not a PyTorch checkpoint (neither a zip archive nor a pickle; it starts with "
                             "b'hello wo')",
                "config.json": "not a PyTorch checkpoint", "empty.pt": "not a PyTorch checkpoint",
                "image.pt": "not a PyTorch checkpoint",
                "truncated.pt": "truncated or not a PyTorch checkpoint (PytorchStreamReader failed reading zip "
                                "archive: failed finding central directory)",
                "code.pt": "could run code (Trying to load unsupported GLOBAL posix.system whose module posix "
                           "is blocked)"}
    assert zipfile.is_zipfile(tmp_path / "good.pt") and read_state_dict(tmp_path / "good.pt").keys() == {"w"}
    for name, message in expected.items():
        with pytest.raises(CheckpointError) as e:
            read_state_dict(tmp_path / name)
        assert str(e.value).startswith(f"{tmp_path / name}: ") and message in str(e.value), str(e.value)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "PWNED").exists()


def test_a_long_reason_is_shortened_between_words():
    long = RuntimeError("the archive " + "entry " * 40 + "is damaged. Second sentence.\nMore detail.")
    reason = _reason(long)
    assert reason.endswith(" ...") and len(reason) <= 164
    assert set(reason[:-4].split()) <= {"the", "archive", "entry"}  # whole words only
    assert _reason(ValueError("short one. And another.")) == "short one"


def test_written_checkpoints_get_the_umask_mode(tmp_path):
    old = os.umask(0o002)  # a group-shared cluster folder
    try:
        atomic_save({"x": torch.zeros(1)}, tmp_path / "shared.pt")
        os.umask(0o077)
        atomic_save({"x": torch.zeros(1)}, tmp_path / "private.pt")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.pt").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "private.pt").stat().st_mode & 0o777 == 0o600
    assert torch.equal(read_state_dict(tmp_path / "shared.pt")["x"], torch.zeros(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private.pt", "shared.pt"]


def test_load_strict_names_the_file_and_the_first_offending_keys():
    """The one strict loader of the four model files: exact keys and shapes, else one sentence."""
    def meta_net():
        with torch.device("meta"):
            return torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(5)])
    good = {k: torch.ones(v.shape, dtype=torch.float64) for k, v in meta_net().state_dict().items()}
    net = load_strict(meta_net(), good, "net.pt", "a 5-layer net")
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" and (p == 1).all()
               for p in net.state_dict().values())
    bad = {k: v for k, v in good.items() if not k.endswith("bias")}  # 5 biases missing
    bad["extra.weight"] = torch.zeros(1)
    bad["0.weight"] = torch.zeros(3, 2)
    with pytest.raises(CheckpointError) as e:
        load_strict(meta_net(), bad, "net.pt", "a 5-layer net", fits="; its shapes fit nothing")
    assert str(e.value) == ("net.pt does not fit a 5-layer net: missing 0.bias, 1.bias, 2.bias "
                            "... (5); unexpected extra.weight (1); wrong shape 0.weight (1); its "
                            "shapes fit nothing")


def test_model_weights_unwraps_checkpoints():
    """train.py's EMA before its model, an ldm .ckpt's state_dict; DDP/compile prefixes and
    patches off."""
    w = torch.zeros(1)
    run = {"model": {"a": w}, "ema": {"module.a": w, "_orig_mod.b": w}}
    assert model_weights(run) == {"a": w, "b": w}
    assert model_weights({"state_dict": {"a": w}, "global_step": 3}) == {"a": w}
    assert model_weights({"a": w, "block_input.prompts": w}) == {"a": w}


def test_write_json_is_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    """A full disk mid-write leaves the old file as it was and no temporary file."""
    path = tmp_path / "progress.json"
    write_json(path, {"done": 3})
    assert json.loads(path.read_text()) == {"done": 3} and os.listdir(tmp_path) == ["progress.json"]

    def full_disk(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:4])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_json(path, {"done": 6})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"done": 3} and os.listdir(tmp_path) == ["progress.json"]
