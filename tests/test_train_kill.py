"""Kill safety: SIGKILL mid-task leaves the bundle valid, and --resume completes the task."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from casam_core.files import atomic_write_json, read_json
from casam_bundle import Bundle
from trainer.cli import main
from trainer.synthetic import write_synthetic_task
from trainer.vae_training import single_thread

ARGS = ["--sam", "tiny", "--epochs", "2", "--batch-size", "2", "--masks-per-image", "1", "--vae-epochs", "20",
        "--device", "cpu", "--quiet"]


def test_sigkill_mid_task_then_resume(tmp_path, tmp_path_factory):
    data = write_synthetic_task(tmp_path / "data", "stripes", 6, seed=3)  # cached by other tests
    stems = sorted(p.stem for p in (data / "images").iterdir())
    atomic_write_json(data / "split.json", {"train": stems[:4], "test": stems[4:]})
    bundle_dir, cache = tmp_path / "bundle", tmp_path_factory.getbasetemp() / "embedding_cache"
    cmd = ["--bundle", str(bundle_dir), "--task", "checker", "--data", str(data), "--cache-dir", str(cache)] + ARGS
    # One thread: the run is small and the test machine's two cores are busy.
    env = {**os.environ, "CASAM_CACHE": str(tmp_path / "casam_cache"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", *cmd], env=env, cwd=Path(__file__).resolve().parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoint = bundle_dir / ".staging" / "checker" / "resume.pt"
    deadline = time.time() + 400
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    assert checkpoint.exists(), "no resume checkpoint after the first epoch"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    bundle = Bundle.open(bundle_dir)  # verifies every recorded file
    assert bundle.task_names == []
    assert not (bundle_dir / "tasks" / "checker").exists()

    summary_file = tmp_path / "summary.json"
    with single_thread():
        result = CliRunner().invoke(main, cmd + ["--resume", "--json-summary", str(summary_file)], env=env)
    assert result.exit_code == 0, result.output
    summary = read_json(summary_file)
    assert summary["resumed_from_epoch"] == 1
    assert summary["embedding_cache"]["misses"] == 0  # the killed run had cached every embedding
    bundle = Bundle.open(bundle_dir)
    assert bundle.task_names == ["checker"]
    log = read_json(bundle.task_dir("checker") / "train_log.json")
    assert [e["epoch"] for e in log["epochs"]] == [1, 2] and log["resumed_from_epoch"] == 1
    assert not (bundle_dir / ".staging" / "checker").exists()
