"""scripts/make_test_certs.py: private keys are born private (mode 0600 at creation, never a wider mode
that is narrowed afterwards), and nothing existing is overwritten."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.conftest import load_script

REPO = Path(__file__).resolve().parents[1]
PRIVATE = ["ca.key", "server.key", "node0", "node1"]
PUBLIC = ["ca.crt", "server.crt", "node0.pub", "node1.pub"]


@pytest.fixture(scope="module")
def certs_module():
    return load_script("make_test_certs")


@pytest.fixture
def open_umask():
    """The loosest umask, so that a file's mode is what its creator asked for."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_private_keys_are_created_with_mode_0600_and_never_narrowed_afterwards(
    certs_module, tmp_path, monkeypatch, open_umask
):
    created: dict[str, int] = {}  # file name -> the mode os.open created it with
    real_open = os.open

    def spy_open(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT:
            created[Path(path).name] = mode
        return real_open(path, flags, mode, *args, **kwargs)

    def no_chmod(*args, **kwargs):
        raise AssertionError("a key's mode narrowed after it was written: it was readable meanwhile")

    monkeypatch.setattr(os, "open", spy_open)
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    paths = certs_module.make_certs(tmp_path / "certs", [], nodes=2)
    for name in PRIVATE:
        assert stat.S_IMODE(paths[name].stat().st_mode) == 0o600, name
        assert created[name] == 0o600, name
    for name in PUBLIC:
        assert paths[name].stat().st_mode & stat.S_IROTH, name  # certificates and public keys stay readable


def test_existing_files_are_never_overwritten(certs_module, tmp_path):
    folder = tmp_path / "certs"
    folder.mkdir()
    (folder / "server.key").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError, match="server.key"):
        certs_module.make_certs(folder, [], nodes=1)
    assert (folder / "server.key").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in folder.iterdir()) == ["server.key"]
