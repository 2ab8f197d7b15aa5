"""A local Redis Cluster for the tests: 3 masters and 3 replicas on free loopback ports.

`LocalCluster` starts six `redis-server --cluster-enabled yes` processes (each in its own temporary
directory, no persistence), joins them with `redis-cli --cluster create ... --cluster-replicas 1`,
waits until every node reports `cluster_state:ok`, and stops every process by its pid at the end.
Tests can fail a master over to its replica (`failover`, `kill_master`) and move a slot between
masters (`migrate_slot`) while traffic runs.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from integration.faultkit import LOOPBACK

#: How long a node may be unreachable before the cluster fails it over: short, so that a test
#: killing a master sees its replica promoted within seconds (the default is 15 s).
NODE_TIMEOUT_MS = 1000


def cluster_port(taken: set[int]) -> int:
    """A free port P whose cluster bus port P + 10000 is free too (so P <= 55535)."""
    for _ in range(200):
        port = random.randint(20_000, 45_000)
        if port in taken or port + 10_000 in taken:
            continue
        try:
            for candidate in (port, port + 10_000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind((LOOPBACK, candidate))
        except OSError:
            continue
        taken.update((port, port + 10_000))
        return port
    raise ClusterUnavailable("no free pair of loopback ports for a cluster node")


class ClusterUnavailable(RuntimeError):
    """The local cluster could not be started (binaries missing, ports, timeouts)."""


@dataclass
class Node:
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.directory / f"redis-{self.port}.log"

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


class LocalCluster:
    """Six redis-server processes joined into one cluster (3 masters, 1 replica each)."""

    def __init__(self, size: int = 6, replicas: int = 1) -> None:
        self.size = size
        self.replicas = replicas
        self.directory = Path(tempfile.mkdtemp(prefix="sqlacache-cluster-"))
        taken: set[int] = set()
        self.nodes = [Node(cluster_port(taken), self.directory) for _ in range(size)]
        self._server = shutil.which("redis-server")
        self._cli = shutil.which("redis-cli")

    # -- addresses --------------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """A cluster URL through the first node (any node discovers the others)."""
        return f"redis://{LOOPBACK}:{self.nodes[0].port}/0?cluster=true"

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(LOOPBACK, port) for port in self.ports]

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> LocalCluster:
        if self._server is None or self._cli is None:
            raise ClusterUnavailable("redis-server or redis-cli is not on PATH")
        try:
            for node in self.nodes:
                self._spawn(node)
            for node in self.nodes:
                self._wait_ping(node, timeout)
            self.cli(
                "--cluster",
                "create",
                *(node.address for node in self.nodes),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
                timeout=timeout,
            )
            self.wait_ok(timeout)
            for node in self.nodes:  # replicas have their masters' data (WAIT counts them)
                self._wait_synced(node.port, timeout)
        except Exception:
            self.stop()
            raise
        return self

    def _spawn(self, node: Node) -> None:
        assert self._server is not None
        command = [
            self._server,
            "--port",
            str(node.port),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{node.port}.conf",
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            # a replica may take over however long ago it last heard from its master
            "--cluster-replica-validity-factor",
            "0",
            # a shard's outage must not stop the others (the recommended setting for a cache:
            # the default stops every node, the meta slot's master included, until failover)
            "--cluster-require-full-coverage",
            "no",
            # DEBUG SLEEP makes a node silent for a while (a blackhole) in the soak test
            "--enable-debug-command",
            "local",
            "--dir",
            str(node.directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--bind",
            LOOPBACK,
            "--daemonize",
            "no",
            "--logfile",
            str(node.log),
        ]
        node.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=str(node.directory),
        )

    def _wait_ping(self, node: Node, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not node.running:
                raise ClusterUnavailable(
                    f"redis-server on port {node.port} exited:\n{self.tail(node)}"
                )
            with contextlib.suppress(subprocess.SubprocessError, ClusterUnavailable):
                if self.cli("-p", str(node.port), "ping", timeout=2).strip() == "PONG":
                    return
            time.sleep(0.05)
        raise ClusterUnavailable(f"redis-server on port {node.port} not answering after {timeout}s")

    def stop(self) -> None:
        """Kill every process by its pid and remove the temporary directory."""
        for node in self.nodes:
            process, node.process = node.process, None
            if process is not None:
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def tail(self, node: Node, lines: int = 20) -> str:
        try:
            return "".join(node.log.read_text(errors="replace").splitlines(True)[-lines:])
        except OSError:
            return "(no log)"

    # -- inspection ---------------------------------------------------------------------------

    def cli(self, *args: str, timeout: float = 10.0) -> str:
        assert self._cli is not None
        try:
            done = subprocess.run(
                [self._cli, "-h", LOOPBACK, *args],
                capture_output=True,
                timeout=timeout,
                check=False,
                text=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterUnavailable(f"redis-cli {' '.join(args)} timed out") from exc
        if done.returncode != 0:
            raise ClusterUnavailable(
                f"redis-cli {' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}"
            )
        return done.stdout

    def node_cli(self, port: int, *args: str, timeout: float = 10.0) -> str:
        return self.cli("-p", str(port), *args, timeout=timeout)

    def node_ok(self, port: int, *args: str) -> None:
        """Run a command that must answer OK (redis-cli exits 0 even on an error reply)."""
        out = self.node_cli(port, *args).strip()
        if out not in ("OK", "NOKEY"):
            raise ClusterUnavailable(f"{' '.join(args)} on {port}: {out}")

    def info(self, port: int, section: str = "cluster") -> dict[str, str]:
        """`CLUSTER INFO` (section "cluster") or an `INFO` section, as a dict."""
        command = ("cluster", "info") if section == "cluster" else ("info", section)
        out: dict[str, str] = {}
        for line in self.node_cli(port, *command).splitlines():
            if ":" in line:
                key, _, value = line.partition(":")
                out[key] = value.strip()
        return out

    def cluster_nodes(self, port: int | None = None) -> list[dict[str, str]]:
        """`CLUSTER NODES` as seen by a running node: id, port, role, master id, slots."""
        asked = port if port is not None else self.running_ports()[0]
        rows = []
        for line in self.node_cli(asked, "cluster", "nodes").splitlines():
            parts = line.split()
            if len(parts) < 8:
                continue
            flags = parts[2].split(",")
            rows.append(
                {
                    "id": parts[0],
                    "port": parts[1].split("@")[0].rsplit(":", 1)[1],
                    "role": "master" if "master" in flags else "replica",
                    "failed": "fail" in flags or "fail?" in flags,
                    "master": parts[3],
                    "slots": " ".join(parts[8:]),
                }  # type: ignore[dict-item]
            )
        return rows

    def running_ports(self) -> list[int]:
        return [node.port for node in self.nodes if node.running]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every running node says cluster_state:ok and agrees on one master per shard."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                ports = self.running_ports()
                states = [self.info(port).get("cluster_state") for port in ports]
                views = {self._slot_view(port) for port in ports}
                if states and all(state == "ok" for state in states) and len(views) == 1:
                    return
                last = f"states {states}"
            except ClusterUnavailable as exc:
                last = str(exc)
            time.sleep(0.1)
        raise ClusterUnavailable(f"cluster not ok after {timeout}s: {last}")

    def _slot_view(self, port: int) -> tuple[tuple[str, str], ...]:
        """Which live master serves which slots, as `port` sees it."""
        return tuple(
            sorted(
                (str(r["port"]), str(r["slots"]))
                for r in self.cluster_nodes(port)
                if r["role"] == "master" and not r["failed"] and r["slots"]
            )
        )

    def keyslot(self, key: str) -> int:
        return int(self.node_cli(self.running_ports()[0], "cluster", "keyslot", key).strip())

    def master_of_slot(self, slot: int) -> int:
        """The port of the live master serving `slot`."""
        for row in self.cluster_nodes():
            if row["role"] != "master" or row["failed"]:
                continue
            for part in str(row["slots"]).split():
                if part.startswith("["):
                    continue
                low, _, high = part.partition("-")
                if int(low) <= slot <= int(high or low):
                    return int(row["port"])
        raise ClusterUnavailable(f"no master serves slot {slot}")

    def replica_of(self, master_port: int, timeout: float = 10.0) -> int:
        """The master's live replica; waits (up to `timeout`) for one that an earlier fault left
        flagged as failing to be seen healthy again."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.cluster_nodes()
            master_id = next(r["id"] for r in rows if int(r["port"]) == master_port)
            live = self.running_ports()
            for row in rows:
                replica = row["role"] == "replica" and row["master"] == master_id
                if replica and not row["failed"] and int(row["port"]) in live:
                    return int(row["port"])
            if time.monotonic() > deadline:
                raise ClusterUnavailable(f"master {master_port} has no live replica")
            time.sleep(0.05)

    def masters(self) -> list[int]:
        return sorted(
            int(r["port"])
            for r in self.cluster_nodes()
            if r["role"] == "master" and not r["failed"]
        )

    # -- faults -------------------------------------------------------------------------------

    def failover(self, master_port: int, timeout: float = 20.0) -> int:
        """A manual, clean failover: the master's replica takes over. Returns the new master."""
        replica = self.replica_of(master_port)
        self.node_ok(replica, "cluster", "failover")
        self._wait_role(replica, "master", timeout)
        self.wait_ok(timeout)
        return replica

    def kill_master(self, master_port: int, timeout: float = 30.0, wait: bool = True) -> int:
        """SIGKILL a master and (with `wait`) wait until its replica is promoted. Returns the
        replica (the new master once promoted)."""
        replica = self.replica_of(master_port)
        self.kill_node(master_port)
        if wait:
            self.wait_promoted(replica, timeout)
        return replica

    def kill_node(self, port: int) -> None:
        """SIGKILL one node, whatever its role (a master's replica is not waited for here)."""
        node = next(n for n in self.nodes if n.port == port)
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(timeout=10)

    def wait_promoted(self, replica: int, timeout: float = 30.0) -> int:
        self._wait_role(replica, "master", timeout)
        self.wait_ok(timeout)
        return replica

    def restart_node(self, port: int, timeout: float = 30.0) -> None:
        """Start a killed node again: it rejoins (as a replica of whoever took its slots)."""
        node = next(n for n in self.nodes if n.port == port)
        if node.running:
            return
        self._spawn(node)
        self._wait_ping(node, timeout)
        self.wait_ok(timeout)
        self._wait_synced(port, timeout)

    def _wait_synced(self, port: int, timeout: float) -> None:
        """Until the node, back as a replica, has finished its sync with its master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ClusterUnavailable):
                info = self.info(port, "replication")
                if info.get("role") == "master" or info.get("master_link_status") == "up":
                    return
            time.sleep(0.05)
        raise ClusterUnavailable(f"node {port} did not finish syncing within {timeout}s")

    def _wait_role(self, port: int, role: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(ClusterUnavailable):
                if self.info(port, "replication").get("role") == role:
                    return
            time.sleep(0.05)
        raise ClusterUnavailable(f"node {port} did not become {role} within {timeout}s")

    def migrate_slot(self, slot: int, target_port: int, batch: int = 10, pause: float = 0.0) -> int:
        """Move `slot` to the master on `target_port` key by key (MIGRATING/IMPORTING, MIGRATE),
        the way `redis-cli --cluster reshard` does. `pause` between batches widens the window in
        which clients see ASK and TRYAGAIN. Returns the number of keys moved."""
        source_port = self.master_of_slot(slot)
        if source_port == target_port:
            return 0
        ids = {int(r["port"]): str(r["id"]) for r in self.cluster_nodes()}
        self.node_ok(target_port, "cluster", "setslot", str(slot), "importing", ids[source_port])
        self.node_ok(source_port, "cluster", "setslot", str(slot), "migrating", ids[target_port])
        moved = 0
        while True:
            keys = self.node_cli(
                source_port, "cluster", "getkeysinslot", str(slot), str(batch)
            ).split()
            if not keys:
                break
            self.node_ok(
                source_port,
                "migrate",
                LOOPBACK,
                str(target_port),
                "",
                "0",
                "5000",
                "REPLACE",
                "KEYS",
                *keys,
            )
            moved += len(keys)
            if pause:
                time.sleep(pause)
        for port in self.masters():
            self.node_ok(port, "cluster", "setslot", str(slot), "node", ids[target_port])
        self.wait_ok()
        return moved

    def silence(self, port: int, seconds: float) -> None:
        """The node answers nothing for `seconds` (keep it below NODE_TIMEOUT_MS: no failover)."""
        self.node_cli(port, "debug", "sleep", str(seconds), timeout=seconds + 10)

    def flushall(self) -> None:
        for port in self.masters():
            self.node_cli(port, "flushall")


def ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@contextlib.contextmanager
def local_cluster() -> Iterator[LocalCluster]:
    cluster = LocalCluster()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[LocalCluster]:
    """One local cluster for the whole test session, always stopped at the end.

    Skips (with the reason) when it cannot start, except under CI=true, where it fails.
    """
    cluster = LocalCluster()
    try:
        cluster.start()
    except (ClusterUnavailable, OSError) as exc:
        message = f"local Redis Cluster could not start: {exc}"
        if ci():
            pytest.fail(message + " (CI=true: failing instead of skipping)", pytrace=False)
        pytest.skip(message)
    try:
        yield cluster
    finally:
        cluster.stop()
