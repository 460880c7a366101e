"""2-process gloo runs under torchrun. Two launches serve most cases (see ``train_dist_worker.phases``):

- a 2-process run keeps identical weights on both ranks and equals a 1-process run with the same global batch;
- resumed after step 2, runs with dropout 0.1 and loader workers (tokenizer and FlowTok) equal their
  uninterrupted runs exactly;
- when every sample of one rank's batch is unreadable, both ranks skip that step together: their data positions
  stay equal, each rank's skip count is stored, the resumed run equals the uninterrupted one and logs the same
  skip count;
- no DDP gradient-stride warning.

A third launch kills torchrun itself with SIGKILL: its workers notice, save a checkpoint and exit.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train_flowtok import write_pairs
from train_helpers import make_image_folder

WORKER = os.path.join(os.path.dirname(__file__), "train_dist_worker.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1")


def _launch(args, port_offset=0):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(29500 + (os.getpid() + port_offset) % 1000), WORKER, *map(str, args)]


def _first_batch_of_rank1(files, seed=0):
    """The files of rank 1's first batch (2 samples) in epoch 0, as ``ResumableSampler`` deals them."""
    from torch.utils.data import DistributedSampler

    sampler = DistributedSampler(range(len(files)), num_replicas=2, rank=1, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(0)
    return [files[index] for index in list(sampler)[:2]]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    from tokenflow_ext.train.data import IMAGE_EXTENSIONS, list_files

    root = tmp_path_factory.mktemp("dist")
    data = make_image_folder(root / "data", generated=4)
    broken = make_image_folder(root / "broken", generated=4)
    for path in _first_batch_of_rank1(list_files(broken, IMAGE_EXTENSIONS)):
        with open(path, "wb") as handle:
            handle.write(b"unreadable")
    pairs = write_pairs(root / "pairs", 12, seed=0)
    out = root / "out"
    out.mkdir()
    logs = []
    for phase in ("first", "resume"):
        result = subprocess.run(_launch([phase, data, broken, pairs, out]), env=ENV, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        logs.append(result.stderr)
    return {"root": root, "data": data, "out": out, "stderr": "\n".join(logs)}


def _ranks(folder):
    return torch.load(folder / "rank0_of_2.pt"), torch.load(folder / "rank1_of_2.pt")


def test_two_process_torchrun_equals_one_process(launched):
    import train_dist_worker  # the 1-process reference runs in this process (saves a start-up)

    one = launched["root"] / "one"
    one.mkdir()
    train_dist_worker.main(launched["data"], str(one), 3)
    two = launched["out"] / "plain"
    rank0, rank1 = _ranks(two)
    single = torch.load(one / "rank0_of_1.pt")
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), f"ranks differ at {key}"
    # Same function: the reconstructions of the photographs agree. Weight by weight, all but a few agree
    # to 1e-5: conv biases right before a GroupNorm with one channel per group (the tiny config) get a
    # gradient that is zero up to rounding, and Adam turns that noise into +-lr steps; they do not change
    # the model's output.
    torch.testing.assert_close(rank0.pop("reconstruction"), single.pop("reconstruction"), rtol=0, atol=1e-4)
    off = [key for key, value in rank0.items() if not torch.allclose(value, single[key], rtol=1e-4, atol=1e-5)]
    assert len(off) <= 0.05 * len(rank0), off
    # The same noise reaches a rare weight element too (one of 36864 in a conv after kernel changes that move
    # the last bits): weights may have at most 0.1% of their elements off, each well under one Adam step (1e-3).
    for key in (k for k in off if not k.endswith(".bias")):
        diff = (rank0[key] - single[key]).abs()
        outside = diff > 1e-5 + 1e-4 * single[key].abs()
        assert outside.float().mean() <= 1e-3 and diff.max() < 1e-4, (key, int(outside.sum()), diff.max().item())
    first = torch.load(two / "run" / "checkpoints" / "step_0000002.pt", weights_only=True)
    assert first["world_size"] == 2 and first["step"] == 2 and len(first["ranks"]) == 2
    assert torch.load(two / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("name", ["dropout", "flow", "broken"])
def test_resume_after_step_2_equals_the_uninterrupted_run(launched, name):
    straight, resumed = _ranks(launched["out"] / name), _ranks(launched["out"] / f"{name}_resumed")
    for rank in (0, 1):
        for key, value in straight[rank].items():
            assert torch.equal(value, resumed[rank][key]), f"rank {rank}: {key}"


def _log(folder):
    return [json.loads(line) for line in open(folder / "run" / "log.jsonl")]


def test_an_unreadable_batch_on_one_rank_is_skipped_by_both(launched):
    folder = launched["out"] / "broken" / "run" / "checkpoints"
    first = torch.load(folder / "step_0000001.pt", weights_only=True)
    positions = [(rank["epoch"], rank["batch_in_epoch"]) for rank in first["ranks"]]
    assert positions == [(0, 2), (0, 2)]  # step 1 came from the second batch on both ranks
    assert [rank["skipped"] for rank in first["ranks"]] == [0, 2] and first["skipped"] == 2
    for step in (2, 3, 4, 5):
        ranks = torch.load(folder / f"step_{step:07d}.pt", weights_only=True)["ranks"]
        assert ranks[0]["epoch"] == ranks[1]["epoch"] and ranks[0]["batch_in_epoch"] == ranks[1]["batch_in_epoch"]
    straight = {row["step"]: row["skipped"] for row in _log(launched["out"] / "broken")}
    resumed = {row["step"]: row["skipped"] for row in _log(launched["out"] / "broken_resumed")}
    assert resumed and all(resumed[step] == straight[step] for step in resumed), (straight, resumed)


def test_no_gradient_stride_warning(launched):
    assert "Grad strides do not match" not in launched["stderr"]


def _gone(pid):
    try:
        with open(f"/proc/{pid}/status") as handle:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in handle)
    except FileNotFoundError:
        return True


def test_workers_save_and_exit_when_torchrun_is_killed(tmp_path):
    data = make_image_folder(tmp_path / "data", generated=4)
    out = tmp_path / "out"
    out.mkdir()
    with open(tmp_path / "stderr.txt", "w") as stderr:
        launcher = subprocess.Popen(_launch(["forever", data, data, data, out], port_offset=17), env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    folder = out / "forever" / "run" / "checkpoints"
    pids = []
    try:
        deadline = time.monotonic() + 180
        while not (folder / "step_0000005.pt").exists():
            assert launcher.poll() is None and time.monotonic() < deadline, open(tmp_path / "stderr.txt").read()[-3000:]
            time.sleep(0.2)
        pids = [int((out / "forever" / f"pid{rank}").read_text()) for rank in (0, 1)]
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 60
        while not all(_gone(pid) for pid in pids):
            assert time.monotonic() < deadline, "the workers kept running after their launcher was killed"
            time.sleep(0.2)
    finally:
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    final = torch.load(folder / "last.pt", weights_only=True)
    assert final["step"] == _log(out / "forever")[-1]["step"] >= 5  # every step done is in the checkpoint
    assert "stopped by launcher exit" in open(tmp_path / "stderr.txt").read()
