"""distributed.py: the seeds keep the bit layouts every earlier run and sample set drew from."""
import datetime
import functools
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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



def test_evaluation_shares_add_up_to_the_one_process_sums(monkeypatch):
    """
    heldout.evaluate split over 2 processes (80 held-out digits in batches of 32: process 0 takes
    batches 0 and 2, process 1 batch 1): what each process hands to distributed.host_sum adds up
    to what one process sums, each batch drawing what it drew with one process; float64 sums of 12
    terms in another order: within 12 ulps. (Bits/dim, 1000 forwards an image, shares the same way.)
    """
    import heldout
    import load
    import settings
    import training
    from dataset import PreparedData
    from diffusion import create_diffusion
    args = settings.parse_args([])
    data = PreparedData(args.data)
    rows = training.split(data, args.holdout)[1][:80]
    model = load.load_model(args.init)
    diffusion = create_diffusion("", args.noise_schedule)
    handed = []
    monkeypatch.setattr(distributed, "host_sum", functools.partial(record, handed))
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        heldout.evaluate(model, diffusion, data, rows, args, torch.device("cpu"), batch_size=32,
                         rank=rank, world=world, per_image=True)
    one, *shares = (torch.tensor(v, dtype=torch.float64) for v in handed)
    assert one[0] > 0 and shares[0][0] > 0 and shares[1][0] > 0
    assert torch.allclose(shares[0] + shares[1], one, rtol=12 * 2 ** -52, atol=0)
    # per image (the last 80 values): each process fills its own batches' rows, zeros elsewhere
    mine = [s[-80:] != 0 for s in shares]
    assert mine[0][:32].all() and mine[0][64:].all() and not mine[0][32:64].any()
    assert (mine[0] ^ mine[1]).all() and torch.equal(shares[0][-80:] + shares[1][-80:], one[-80:])


def record(handed, values, world):
    handed.append(values)
    return values


def _waiting_worker(rank, world, store, out):
    # The default group times out after 0.5 s; process 0 comes to the sum 1.5 s after process 1.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=0.5))
    distributed.host_group()
    if rank == 0:
        time.sleep(2)
    total = distributed.host_sum([1.0 + rank, 10.0 * rank], world)
    torch.save(total, out.with_suffix(f".{rank}"))
    distributed.teardown()


def test_a_process_waits_in_the_host_group_past_the_default_groups_timeout(tmp_path):
    """What a process that finished its share of an evaluation waits in: distributed.host_group, a
    gloo group with a week's patience, not the default group (0.5 s here; NCCL's watchdog: 10 min)."""
    mp.spawn(_waiting_worker, args=(2, tmp_path / "store", tmp_path / "sum"), nprocs=2)
    assert [torch.load(tmp_path / f"sum.{r}") for r in (0, 1)] == [[3.0, 10.0]] * 2
