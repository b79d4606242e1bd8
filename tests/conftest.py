import os
from pathlib import Path

# One thread for torch in the tests and in the scripts they start: the tensors are tiny, and two
# threads that wait for each other while other jobs hold the cores made the suite twice as slow
# (302 s against 152 s on 2 shared cores, the same 206 tests).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def rel_err(out, ref):
    """The largest absolute difference relative to the reference's largest value, in float64."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (the small UNets run several times faster on one thread
    than on two contended ones), whatever OMP_NUM_THREADS says; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """train.main(--threads) sets torch's thread count for the process: give every test the suite's own."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _files(roots):
    """Every file under the roots, path -> bytes."""
    paths = [p for root in roots for p in sorted(Path(root).rglob("*")) if p.is_file()]
    return {p: p.read_bytes() for p in paths}


@pytest.fixture
def unchanged():
    """
    unchanged(*roots) records every file under the roots and returns a check to call after the
    fault: each of those files must still be there, byte for byte (new files may appear).
    """
    def record(*roots):
        before = _files(roots)

        def check():
            after = _files(roots)
            assert [str(p) for p, data in before.items() if after.get(p) != data] == []
        return check
    return record


def error_line(stderr):
    """
    The one line of a script's stderr that says what went wrong: there must be exactly one (progress
    bars aside), with no traceback anywhere.
    """
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if "error: " in line]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def one_sentence():
    """one_sentence(stderr): error_line as a fixture (the one line naming what went wrong)."""
    return error_line
