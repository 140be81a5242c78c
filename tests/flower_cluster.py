"""A real SuperLink and SuperNodes on loopback, for the Flower tests (and by hand: see __main__).

Every process starts in its own session (process group) with its own FLWR_HOME and HOME under a
temporary folder, on free ports, and `Cluster.close()` kills each group and waits for it, so a test
leaves no process and no file behind whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode and flwr live beside python
REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "flower-app"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A SuperLink and `nodes` SuperNodes (`nodes[i]` is node i's config, e.g. "partition-id=0
    num-partitions=3"), all under `root`. `tls` is None (insecure) or a folder made by
    scripts/make_test_certs.py; with `auth` (TLS only) the SuperLink admits only the SuperNodes whose
    public keys (`tls/nodeK.pub`) were registered with `flwr supernode register`, which it does."""

    def __init__(
        self, root: Path, nodes: Sequence[str], tls: Path | None = None, auth: bool = False
    ) -> None:
        self.root = Path(root)
        self.tls = tls
        self.port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.run_id: str | None = None
        self.logs: dict[str, Path] = {}
        self.home = self.root / "home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "FLWR_HOME": str(self.home / ".flwr"),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        self._write_flwr_config()
        link = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port)]
        link += ["--disable-runtime-dependency-installation"]
        link += self._link_tls()
        self.auth = auth
        if auth:
            assert tls is not None, "SuperNode authentication needs TLS"
            link += ["--enable-supernode-auth"]
        try:
            self._start("superlink", link)
            if auth:
                for i in range(len(nodes)):
                    self._retry("supernode", "register", str(tls / f"node{i}.pub"), "test")
            for i, node_config in enumerate(nodes):
                self.start_node(i, node_config)
        except BaseException:
            self.close()
            raise

    def _write_flwr_config(self) -> None:
        flwr_home = self.home / ".flwr"
        flwr_home.mkdir(parents=True, exist_ok=True)
        security = (
            "insecure = true" if self.tls is None else f'root-certificates = "{self.tls / "ca.crt"}"'
        )
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\n'
            f"{security}\n",
            encoding="utf-8",
        )

    def _link_tls(self) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        t = self.tls
        args = ["--ssl-ca-certfile", str(t / "ca.crt"), "--ssl-certfile", str(t / "server.crt")]
        args += ["--ssl-keyfile", str(t / "server.key")]
        return args

    def start_node(self, i: int, node_config: str) -> None:
        args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}"]
        args += ["--port", str(free_port()), "--node-config", node_config]
        if self.tls is None:
            args += ["--insecure"]
        else:
            args += ["--root-certificates", str(self.tls / "ca.crt")]
            if self.auth:
                args += ["--auth-supernode-private-key", str(self.tls / f"node{i}")]
        self._start(f"node{i}", args)

    def _start(self, name: str, args: list[str]) -> None:
        log = self.root / f"{name}.log"
        self.logs[name] = log
        with log.open("ab") as f:
            self.procs[name] = subprocess.Popen(
                ["nice", "-n", "19", *args], cwd=self.root, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=self.root, env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )

    def submit(self, run_config: dict[str, object]) -> str:
        """`flwr run flower-app test` with these run config values; returns the run's id."""
        items = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        out = self._retry("run", str(APP_DIR), "test", "--run-config", items)
        self.run_id = out.split("started run")[-1].split()[0]
        return self.run_id

    def _retry(self, *args: str, tries: int = 60) -> str:
        """`flwr *args`, again every 2 s while it fails (the SuperLink takes a moment to listen)."""
        done = None
        for _ in range(tries):
            done = self.flwr(*args)
            if done.returncode == 0:
                return done.stdout
            time.sleep(2)
        raise RuntimeError(f"flwr {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}\n{self.tail()}")

    def kill(self, name: str) -> None:
        """SIGKILL the process group of `name` (a node: its SuperExec and ClientApps die with it)."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def tail(self, lines: int = 40) -> str:
        """The last lines of every process's log, and of the run's (the ServerApp's) log."""
        out = []
        if self.run_id is not None:
            try:
                shown = self.flwr("log", self.run_id, "test", "--show", timeout=30).stdout.splitlines()
            except subprocess.TimeoutExpired:
                shown = ["(flwr log timed out)"]
            out.append("--- run log ---\n" + "\n".join(shown[-lines:]))
        for name, path in self.logs.items():
            text = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
            out.append(f"--- {name} ---\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    def close(self) -> None:
        # Flower starts some helpers in sessions of their own (the SuperLink's SuperExec): found by
        # parentage now, killed by id after the groups.
        strays = {pid for proc in self.procs.values() for pid in _descendants(proc.pid)}
        for name in list(self.procs):
            proc = self.procs[name]
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):  # what is left of the group: its helpers
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _descendants(pid: int) -> set[int]:
    """Every living process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def wait_for(path: Path, cluster: Cluster, timeout: float) -> None:
    """Wait until `path` exists; raise with the processes' logs after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout:g} s\n{cluster.tail()}")
        time.sleep(0.2)
