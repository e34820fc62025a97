"""Data-parallel training under torchrun (CPU, gloo, 2 processes, tiny SAM).

One module-scoped chain keeps this cheap: a 2-rank run is killed (rank 1, by SIGKILL)
after its first epoch, then resumed under torchrun, and compared with an uninterrupted
single-process run of the same task with the same global batch. Three train images in
batches of 2 make the second step's global batch a single image, so rank 1 takes part in
that step with an empty share.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from runtime_support import one_error_line
from safetensors.numpy import load_file

from casam_bundle import Bundle
from casam_core.files import atomic_write_json, read_json
from trainer.synthetic import write_synthetic_task
from trainer.train_task import TrainConfig, train_task
from trainer.session import SessionOptions
from trainer.vae_training import single_thread

REPO = Path(__file__).resolve().parents[1]
TASK = "stripes"
N_TRAIN, N_TEST = 3, 1
CONFIG = TrainConfig(epochs=2, batch_size=2, masks_per_image=1, vae_epochs=5, folds=2)
ARGS = ["--sam", "tiny", "--epochs", str(CONFIG.epochs), "--batch-size", str(CONFIG.batch_size),
        "--masks-per-image", "1", "--vae-epochs", str(CONFIG.vae_epochs), "--folds", str(CONFIG.folds),
        "--device", "cpu", "--quiet"]


def torchrun(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node=2 -m trainer ARGS`` (a free port is picked)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer", *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def rank_pid(parent: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (a descendant of ``parent``; Linux /proc)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    todo = list(children.get(parent, []))
    while todo:
        pid = todo.pop()
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
        todo += children.get(pid, [])
    raise AssertionError(f"no rank {rank} worker under pid {parent}")


def summaries(stdout: str) -> list[dict]:
    """Every JSON summary printed (one per rank that committed)."""
    decoder, out, i = json.JSONDecoder(), [], stdout.find("{")
    while i != -1:
        value, end = decoder.raw_decode(stdout, i)
        out.append(value)
        i = stdout.find("{", end)
    return [s for s in out if isinstance(s, dict) and s.get("task") == TASK]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_sam):
    work = tmp_path_factory.mktemp("ddp")
    data = write_synthetic_task(work / "data", "stripes", N_TRAIN + N_TEST, seed=5, size=(96, 96))
    stems = sorted(p.stem for p in (data / "images").iterdir())
    atomic_write_json(data / "split.json", {"train": stems[:N_TRAIN], "test": stems[N_TRAIN:]})

    with single_thread():  # the torchrun workers run on one thread each, like this reference
        train_task(work / "single", TASK, data, config=CONFIG,
                   session=SessionOptions(sam="tiny", device="cpu", cache_dir=work / "cache_single", quiet=True,
                                          frozen_sam=tiny_sam))

    bundle_dir = work / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CASAM_CACHE": str(work / "casam_cache"), "PYTHONPATH": str(REPO)}
    cmd = ["--bundle", str(bundle_dir), "--task", TASK, "--data", str(data), "--cache-dir", str(work / "cache_ddp")] + ARGS
    proc = torchrun(cmd, env)
    checkpoint = bundle_dir / ".staging" / TASK / "resume.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.communicate()[1][-3000:]}"
    assert checkpoint.exists(), "no resume checkpoint after the first epoch"
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    _, killed_err = proc.communicate(timeout=120)
    after_kill = {"returncode": proc.returncode, "tasks": Bundle.open(bundle_dir).task_names,  # verifies every file
                  "task_dir": (bundle_dir / "tasks" / TASK).exists(), "stderr": killed_err}

    resumed = torchrun(cmd + ["--resume"], env)
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    return {"work": work, "after_kill": after_kill, "stdout": out, "bundle": bundle_dir}


def test_killing_a_rank_leaves_the_bundle_valid_and_resume_finishes(runs):
    killed = runs["after_kill"]
    assert killed["returncode"] != 0, "torchrun must report the killed rank"
    assert killed["tasks"] == [] and not killed["task_dir"], "nothing may be committed by a killed run"
    (summary,) = summaries(runs["stdout"])
    assert summary["resumed_from_epoch"] == 1
    assert summary["embedding_cache"]["misses"] == 0  # the killed run had cached every embedding
    assert summary["data_parallel"] == {"processes": 2, "backend": "gloo"}
    log = read_json(Bundle.open(runs["bundle"]).task_dir(TASK) / "train_log.json")
    assert [e["epoch"] for e in log["epochs"]] == [1, 2] and log["resumed_from_epoch"] == 1


def test_only_rank_zero_commits(runs):
    # Every rank that commits prints a summary; a second commit would replace the first.
    assert len(summaries(runs["stdout"])) == 1
    bundle = Bundle.open(runs["bundle"])
    assert bundle.task_names == [TASK]
    staging = runs["bundle"] / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_two_ranks_fill_the_same_cache_as_one(runs):
    one, two = runs["work"] / "cache_single", runs["work"] / "cache_ddp"
    entries = sorted(p.relative_to(one) for p in one.rglob("*.npy"))
    assert len(entries) == N_TRAIN + N_TEST
    assert sorted(p.relative_to(two) for p in two.rglob("*.npy")) == entries
    for entry in entries:
        assert (one / entry).read_bytes() == (two / entry).read_bytes(), entry


def test_ddp_weights_match_one_process(runs):
    """Same global batches, same prompts: only the order of the float32 gradient sums differs.

    Each gradient element is a float32 sum of n = batch × 64² pixel terms, × 3 for the
    LayerNorm shared by the three blocks; DDP adds each rank's partial sum in the
    all-reduce, a different order, which moves it by about sqrt(n)·u of its magnitude
    (u = 2⁻²⁴). Adam divides the gradient by its own RMS, so a relative gradient error r
    moves a step of at most lr by at most r·lr: after `steps` steps a weight agrees to
    steps·lr·sqrt(n)·u (3.7e-9 here). Adam's ε = 1e-8 is the exception: where |g| is near
    ε, the step follows the gradient's absolute error, up to a sign flip of g that sits
    within rounding of zero. At the first step 3.5% of the gradient elements have
    |g| < 1e-8 with this tiny SAM and data (a property of the data, not of the CPU), so
    at most 5% (3.5% with a margin) of the weights may differ by
    more. Measured: 0.015% do. A gradient off by a factor of two (a wrong loss scale)
    moved 98.9% of them by more.
    """
    steps = CONFIG.epochs * math.ceil(N_TRAIN / CONFIG.batch_size)
    n = CONFIG.batch_size * 64 * 64 * 3
    tolerance = steps * CONFIG.lr * math.sqrt(n) * 2.0 ** -24
    one = load_file(str(Bundle.open(runs["work"] / "single").task_dir(TASK) / "alignment.safetensors"))
    two = load_file(str(Bundle.open(runs["bundle"]).task_dir(TASK) / "alignment.safetensors"))
    assert one.keys() == two.keys()
    diff = np.concatenate([np.abs(one[k].astype(np.float64) - two[k]).ravel() for k in sorted(one)])
    assert np.isfinite(diff).all()
    outside = float(np.mean(diff > tolerance))
    assert outside <= 0.05, f"{outside:.2%} of the weights differ by more than {tolerance:.2e} (max {diff.max():.2e})"


@pytest.mark.parametrize("size", [1, 2, 3])
def test_rank_shares_split_every_batch_exactly_once(size):
    from trainer.distributed import World

    for count in range(7):
        shares = [World(rank=r, size=size).share(count) for r in range(size)]
        assert sorted(np.concatenate(shares).tolist()) == list(range(count))


def test_subcommands_refuse_to_run_under_torchrun(tmp_path):
    from click.testing import CliRunner

    from trainer.cli import main

    result = CliRunner().invoke(main, ["synth", str(tmp_path / "d"), "--style", "dots", "--count", "1"],
                                env={"WORLD_SIZE": "2"})
    assert "does not run under torchrun" in one_error_line(result)
    assert not (tmp_path / "d").exists()
