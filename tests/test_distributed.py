"""distributed.py: the seeds keep the bit layouts every earlier run and sample set drew from."""
import torch

import distributed


def test_seeds_keep_the_layouts_runs_and_sample_sets_were_drawn_with():
    """
    train.py's 63-bit seeds (each step's data and draws) and sample.py's 64-bit seed of image k,
    as the releases before the two shared one function computed them: a resumed run or a
    continued FID set draws what it drew before.
    """
    assert distributed.seed_of(0, 5) == 6102389744414414618
    assert distributed.seed_of(3, 7, 1) == 888946925548604815
    assert distributed.seed_of(1, 2, 3) == 6498626229777268288
    assert distributed.seed_of(0, 3, bits=64) == 6582426945856704739
    assert distributed.seed_of(12345, 0, bits=64) == 13091511679009522556 > 2 ** 63
    assert distributed.seed_of(0, 3, bits=64) >> 1 == distributed.seed_of(0, 3)  # one word


def test_one_process_is_no_group(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.setup() == (0, 1, None)
    assert distributed.local_device("cpu") == torch.device("cpu")
    distributed.teardown()  # nothing to leave: no error
