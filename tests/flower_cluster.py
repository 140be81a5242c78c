"""A real SuperLink and SuperNodes on loopback, for the Flower tests.

Every process starts in its own session (process group) with its own FLWR_HOME and HOME under a
temporary folder, and `Cluster.close()` kills each group and waits for it, so a test leaves no process
and no file behind whatever happens.

Made for a busy machine (other test runs, other users): every wait is a deadline polled often, never a
fixed sleep; a port is chosen free when a process starts, and a process that loses it to another
program before binding it (the port was free when chosen) is started again on a new one; the SuperLink
is known to serve before anything is sent to it, so `flwr run` is sent once (a retried `flwr run` could
start a second run); the processes run at normal priority (at a low one, a starved ClientApp's runtime
token can expire and the round records a timeout).
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


START_TIMEOUT_S = 300  # a process's start, `flwr` calls: generous, for a machine busy with other work
PORT_TRIES = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pythonpath() -> str:
    """PYTHONPATH for the processes: first the folder this process's hlora was imported from, then the
    caller's entries made absolute."""
    import hlora

    entries = [Path(hlora.__file__).resolve().parents[1]]
    entries += [Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(str(p) for p in entries))


def listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex(("127.0.0.1", port)) == 0


class ProcessExited(RuntimeError):
    """A process exited before it served."""


class PortTaken(ProcessExited):
    """A process could not bind the port chosen for it: another program took it meanwhile."""


def start_process(
    args: list[str], log: Path, cwd: Path, env: dict[str, str], ready, timeout: float = START_TIMEOUT_S,
    on_start=None,
) -> subprocess.Popen:
    """Start `args` in a session of its own, its output appended to `log`, and poll until `ready()`.
    PortTaken where it exits for want of its port, ProcessExited where it exits otherwise (both with
    what it wrote), RuntimeError where it does not serve in `timeout` seconds (still running: the
    caller stops it). `on_start(proc)` is called as soon as it runs, so that the caller can stop it
    whatever happens next."""
    start = log.stat().st_size if log.exists() else 0  # this start's lines, after any earlier one's
    with log.open("ab") as f:
        proc = subprocess.Popen(
            args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
    if on_start is not None:
        on_start(proc)
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            with log.open("rb") as f:
                f.seek(start)
                text = f.read().decode("utf-8", errors="replace")
            error = PortTaken if "address already in use" in text.lower() else ProcessExited
            raise error(f"{args[0]} exited with status {proc.returncode}\n{text[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{args[0]} did not serve in {timeout:g} s")
        time.sleep(0.2)
    return proc


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
        self.port = 0  # the SuperLink's, chosen when it starts
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
            # The apps import the hlora under test (this checkout's), whatever else the venv points at;
            # a relative PYTHONPATH would not hold in the processes' own folders.
            "PYTHONPATH": _pythonpath(),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        self.auth = auth
        if auth:
            assert tls is not None, "SuperNode authentication needs TLS"
        try:
            self._start_superlink()
            if auth:
                for i in range(len(nodes)):
                    self.register(i)
            for i, node_config in enumerate(nodes):
                self.start_node(i, node_config)
        except BaseException:
            self.close()
            raise

    def _start_superlink(self) -> None:
        """Start the SuperLink on a free port and wait until it serves (again on another port if it
        lost the one chosen)."""
        for _ in range(PORT_TRIES):
            self.port = free_port()
            self._write_flwr_config()
            link = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port)]
            link += ["--disable-runtime-dependency-installation", *self._link_tls()]
            link += ["--enable-supernode-auth"] if self.auth else []
            try:
                self._start("superlink", link, ready=lambda: listening(self.port))
                return
            except PortTaken:
                continue
        raise RuntimeError(f"the SuperLink found no free port in {PORT_TRIES} tries\n{self.tail()}")

    def register(self, i: int) -> None:
        """`flwr supernode register` node i's public key (`tls/node{i}.pub`)."""
        self._retry("supernode", "register", str(self.tls / f"node{i}.pub"), "test", done_if="already in use")

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
        """Start SuperNode i (its authentication key `tls/node{i}` with `auth`), and wait until its own
        runtime API serves, on a free port (another if it lost the one chosen). Whether the SuperLink
        admits it is for the caller to see."""
        name = f"node{i}"
        for _ in range(PORT_TRIES):
            port = free_port()
            args = [str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}"]
            args += ["--port", str(port), "--node-config", node_config]
            if self.tls is None:
                args += ["--insecure"]
            else:
                args += ["--root-certificates", str(self.tls / "ca.crt")]
                if self.auth:
                    args += ["--auth-supernode-private-key", str(self.tls / name)]
            try:
                self._start(name, args, ready=lambda p=port: listening(p), exit_ok=True)
                return
            except PortTaken:
                continue
        raise RuntimeError(f"{name} found no free port in {PORT_TRIES} tries\n{self.tail()}")

    def _start(self, name: str, args: list[str], ready, exit_ok: bool = False) -> None:
        """Start `args` as `name` (`start_process`); with `exit_ok`, a process that exits (not for its
        port) is not an error here."""
        log = self.root / f"{name}.log"
        self.logs[name] = log
        def keep(proc: subprocess.Popen) -> None:
            self.procs[name] = proc

        try:
            start_process(args, log, self.root, self.env, ready, on_start=keep)
        except PortTaken:
            raise
        except ProcessExited:
            if not exit_ok:
                raise
        except RuntimeError as e:
            raise RuntimeError(f"{name}: {e}\n{self.tail()}") from None

    def flwr(self, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "flwr"), *args], cwd=self.root, env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )

    def submit(self, run_config: dict[str, object]) -> str:
        """`flwr run flower-app test` with these run config values, once (the SuperLink serves already);
        returns the run's id."""
        items = " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())
        done = self.flwr("run", str(APP_DIR), "test", "--run-config", items)
        if done.returncode != 0 or "started run" not in done.stdout:
            raise RuntimeError(f"flwr run failed:\n{done.stdout}\n{done.stderr}\n{self.tail()}")
        self.run_id = done.stdout.split("started run")[-1].split()[0]
        return self.run_id

    def _retry(self, *args: str, done_if: str | None = None) -> str:
        """`flwr *args`, again while it fails, for up to START_TIMEOUT_S; only for calls that may be
        repeated (a repeat whose output says `done_if` means an earlier try did it)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        out = ""
        while time.monotonic() < deadline:
            try:
                done = self.flwr(*args, timeout=max(10.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                continue
            out = done.stdout + done.stderr
            if done.returncode == 0 or (done_if is not None and done_if in out):
                return done.stdout
            time.sleep(1.0)
        raise RuntimeError(f"flwr {' '.join(args)} failed:\n{out}\n{self.tail()}")

    def kill(self, name: str) -> None:
        """SIGKILL the process group of `name` (a node: its SuperExec and ClientApps die with it)."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=START_TIMEOUT_S)

    def alive(self, name: str) -> bool:
        return self.procs[name].poll() is None

    def tail(self, lines: int = 40) -> str:
        """The last lines of every process's log, and of the run's (the ServerApp's) log."""
        out = []
        if self.run_id is not None:
            try:
                shown = self.flwr("log", self.run_id, "test", "--show", timeout=60).stdout.splitlines()
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
        deadline = time.monotonic() + 30
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):  # what is left of the group: its helpers
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
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
