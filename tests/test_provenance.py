"""What a run records about how it was made: the commit (clean or dirty), the command, the hardware."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from hlora import provenance


def git(folder, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, check=True)
    return done.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_is_read_and_marked_dirty_when_tracked_files_change(tmp_path):
    assert provenance.git_commit(tmp_path) is None  # not a checkout
    git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git(tmp_path, "add", "a.txt")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git(tmp_path, "rev-parse", "--short=7", "HEAD").strip()
    assert provenance.git_commit(tmp_path) == head
    (tmp_path / "untracked.txt").write_text("not part of the code\n")
    assert provenance.git_commit(tmp_path) == head
    (tmp_path / "venv").mkdir()  # a folder the checkout does not track: its code is not this commit's
    assert provenance.git_commit(tmp_path / "venv") is None
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "b.txt").write_text("one\n")
    git(tmp_path, "add", "code/b.txt")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two")
    head = git(tmp_path, "rev-parse", "--short=7", "HEAD").strip()
    (tmp_path / "a.txt").write_text("two\n")
    assert provenance.git_commit(tmp_path) == f"{head}-dirty"
    assert provenance.git_commit(tmp_path / "code") == head  # a change outside the code's folder
    (tmp_path / "code" / "b.txt").write_text("two\n")
    assert provenance.git_commit(tmp_path / "code") == f"{head}-dirty"


def test_environment_names_the_command_given_by_the_cli(monkeypatch):
    monkeypatch.setattr(provenance, "_invocation", None)  # restored after the test
    provenance.record_invocation(["hlora", "run", "--set", "train.lr=1e-3 x"])
    env = provenance.environment("cpu")
    assert env["command"] == "hlora run --set 'train.lr=1e-3 x'"
    assert env["device"] == "cpu" and env["gpu"] is None and env["torch_threads"] >= 1
    assert len(env["load_avg"]) == 3 and all(x >= 0 for x in env["load_avg"])
    assert env["hlora"] and env["torch"] and env["python"].count(".") == 2
    # the commit is the one read when the code was loaded, not whatever the checkout holds by the end
    monkeypatch.setattr(provenance, "git_commit", lambda path=None: "abc1234")
    assert provenance.environment("cpu")["commit"] != "abc1234"
    provenance.record_invocation(["hlora"])
    assert provenance.environment("cpu")["commit"] == "abc1234"
