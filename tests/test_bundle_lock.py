"""The bundle write lock: concurrent writers never lose a task, a busy bundle is reported
with the holder's pid, and a writer killed with SIGKILL releases the lock.

Writers here are separate processes driving ``Bundle.commit_task`` / ``remove_task``
directly (no training): the lock is an OS file lock, which only another process (or
another open file) can contend for.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from casam_bundle import Bundle
from conftest import make_random_bundle
from runtime_support import one_error_line
from trainer.cli import main

REPO = Path(__file__).resolve().parents[1]

# Commits the tasks named in argv[3:] (staged under <bundle>/.staging/<name>/task, records
# in argv[2]) through a Bundle object opened *before* any of them: a writer that appended
# to the bundle.json it read at start-up would drop the other process's tasks.
COMMITTER = """
import json, sys
from pathlib import Path
from casam_bundle import Bundle, TaskRecord
bundle = Bundle.open(sys.argv[1], verify=False)
records = json.loads(Path(sys.argv[2]).read_text())
print("opened", flush=True)
sys.stdin.readline()  # start together
for name in sys.argv[3:]:
    bundle.commit_task(TaskRecord.from_dict(records[name]), bundle.root / ".staging" / name / "task")
"""

# Holds the lock, says so on stdout, and lets go when a line arrives on stdin (or when killed).
HOLDER = """
import sys
from casam_bundle import bundle_lock
with bundle_lock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()
"""

# casam-train with the arguments that follow, in a process of its own.
TRAIN = "import sys; from trainer.cli import main; sys.argv[0] = 'casam-train'; main()"


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def _start(script: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], env=_env(**env), cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _stage_tasks(target: Path, source: Path, names: list[str]) -> Path:
    """Stage the tasks of bundle ``source`` in ``target`` as a trainer would; returns the records file."""
    src = Bundle.open(source)
    for name in names:
        shutil.copytree(src.task_dir(name), target / ".staging" / name / "task")
    records = target.parent / "records.json"
    records.write_text(json.dumps({n: src.task(n).to_dict() for n in names}))
    return records


def test_concurrent_commits_keep_every_task(tmp_path):
    source = make_random_bundle(tmp_path / "source", ("a1", "a2", "b1", "b2")).root
    target = make_random_bundle(tmp_path / "target", ("base",), seed=1).root
    records = _stage_tasks(target, source, ["a1", "a2", "b1", "b2"])
    # Each writer pauses 0.3 s between reading bundle.json and writing it: without the lock
    # both read the same list and the second write drops the first writer's task.
    fault = {"CASAM_FAULT": "commit:locked=sleep:0.3"}
    procs = [_start(COMMITTER, str(target), str(records), *names, **fault) for names in (["a1", "a2"], ["b1", "b2"])]
    for proc in procs:
        assert proc.stdout.readline().strip() == "opened", proc.stderr.read()
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    bundle = Bundle.open(target)  # verifies every recorded file
    assert sorted(bundle.task_names) == ["a1", "a2", "b1", "b2", "base"]
    assert bundle.task_names[0] == "base"
    assert sorted(p.name for p in (target / "tasks").iterdir()) == sorted(bundle.task_names)  # no orphan folder


def test_busy_bundle_fails_at_once_or_waits_and_sigkill_releases(tmp_path):
    root = make_random_bundle(tmp_path / "bundle", ("alpha", "beta", "gamma")).root
    holder = _start(HOLDER, str(root))  # held until killed
    assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    runner = CliRunner()
    busy = runner.invoke(main, ["remove", "--bundle", str(root), "--task", "alpha", "--wait", "0"])
    assert busy.stderr.count("\n") == 1 and f"is busy (pid {holder.pid})" in one_error_line(busy)
    assert Bundle.open(root).task_names == ["alpha", "beta", "gamma"]

    holder.send_signal(signal.SIGKILL)  # no cleanup runs: only the kernel can release the lock
    holder.wait(timeout=30)
    freed = runner.invoke(main, ["remove", "--bundle", str(root), "--task", "alpha", "--wait", "0"])
    assert freed.exit_code == 0, freed.stderr
    assert Bundle.open(root).task_names == ["beta", "gamma"]

    # A waiting writer, and no clock: the holder lets go only after the waiter has said that it
    # waits (its stderr line), so the wait is always exercised, however slow the machine.
    holder = _start(HOLDER, str(root))
    assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    waiter = _start(TRAIN, "remove", "--bundle", str(root), "--task", "beta", "--wait", "600")
    said = []
    for line in waiter.stderr:
        said.append(line)
        if "is busy" in line:
            break
    assert f"is busy (pid {holder.pid}); waiting up to 600 s" in said[-1], "".join(said)
    assert waiter.poll() is None  # still waiting for the lock
    holder.stdin.write("release\n")
    holder.stdin.flush()
    assert holder.wait(timeout=60) == 0
    _, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert Bundle.open(root).task_names == ["gamma"]
