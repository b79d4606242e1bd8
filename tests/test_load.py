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
