"""Test hosts on one machine: network namespaces joined by veth to a private switch.

``Network(["a", "b"]).up()`` makes a *services* namespace holding a bridge (the switch) and one
namespace per host, each with an ``eth0`` plugged into that bridge, plus a veth from the test's
own (root) namespace into it, so the test can start sagas and read results. Everything sits in
one /24 private subnet chosen so that it overlaps no route of the machine (checked under a
lock, as several test runs may build networks at once). No namespace has a default route:
traffic can only go to the addresses of these namespaces, or their loopback.

- the services namespace runs what every host shares: ``start_redis()`` (a private
  redis-server) and ``start_postgres()`` (a private cluster, tests/support/pgcluster.py), both
  listening on the services address;
- ``popen(host, args)`` / ``run(host, args)`` / ``prefix(host)`` run a command on a host
  (``ip netns exec``);
- ``partition(host)`` cuts a host off (its switch port goes down: the cable is pulled, packets
  vanish, connections hang; with ``how="netem"`` a 100% loss qdisc where the kernel has
  sch_netem) and ``heal(host)`` plugs it back;
- ``down()`` (also at exit) kills every process left in these namespaces and deletes them.
  Names carry the test process's pid (``sagas<pid>-...``); ``cleanup_leftovers()`` removes
  the namespaces and links of test processes that died without cleaning up.

Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2; ``supported()`` says whether this
machine can, and why not.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import ipaddress
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tests.support.pgcluster import PgCluster

PREFIX = "sagas"
LOCK = Path(tempfile.gettempdir()) / "sagas-netns.lock"
SERVICES = "svc"
SERVICES_HOST = 1
ROOT_HOST = 254
# Candidate subnets, tried in random order: 10.213.x.0/24, far from the usual 10.0/10.1/10.10.
CANDIDATES = [ipaddress.ip_network(f"10.213.{i}.0/24") for i in range(1, 250)]

PartitionHow = Literal["link", "netem"]


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def supported() -> tuple[bool, str]:
    """Whether namespaces and veth links can be made here (a probe made and removed)."""
    if not shutil.which("ip"):
        return False, "iproute2 (ip) is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    link = f"sg{os.getpid()}p"
    try:
        _ip("netns", "add", probe)
        _ip("link", "add", link, "type", "veth", "peer", "name", link + "x")
        _ip("link", "set", link + "x", "netns", probe)
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        return True, ""
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return False, f"network namespaces cannot be made here: {exc}"
    finally:
        _ip("link", "del", link, check=False)
        _ip("netns", "del", probe, check=False)


def netem_supported() -> bool:
    """Whether the kernel has sch_netem (many container kernels do not)."""
    ns = f"{PREFIX}{os.getpid()}-netem"
    try:
        _ip("netns", "add", ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        result = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo",
                                 "root", "netem", "loss", "100%"], capture_output=True)
        return result.returncode == 0
    except (RuntimeError, OSError):
        return False
    finally:
        _ip("netns", "del", ns, check=False)


def _kill_namespace_processes(ns: str) -> None:
    out = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in out:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def cleanup_leftovers() -> list[str]:
    """Delete the namespaces and root links of test processes that died; returns the names."""
    removed: list[str] = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.fullmatch(rf"{PREFIX}(\d+)-.+", name)
        if match and not _pid_alive(int(match.group(1))):
            _kill_namespace_processes(name)
            _ip("netns", "del", name, check=False)
            removed.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        match = re.match(r"\d+: (sg(\d+)[A-Za-z]\w*)[@:]", line)
        if match and not _pid_alive(int(match.group(2))):
            _ip("link", "del", match.group(1), check=False)
            removed.append(match.group(1))
    return removed


def _used_networks() -> list[ipaddress.IPv4Network]:
    used = []
    for args in (("-4", "route", "show", "table", "all"), ("-4", "-o", "addr", "show")):
        for token in re.findall(r"(\d+\.\d+\.\d+\.\d+(?:/\d+)?)", _ip(*args).stdout):
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(token, strict=False))
    return used


@dataclass
class Host:
    name: str
    netns: str
    address: str
    port: str  # its switch port (a bridge member in the services namespace)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.netns]


class Network:
    def __init__(self, hosts: Sequence[str]) -> None:
        if len(hosts) > 200 or len(set(hosts)) != len(hosts):
            raise ValueError("host names must be unique (at most 200)")
        self.tag = f"{PREFIX}{os.getpid()}"
        self.link_tag = f"sg{os.getpid()}"  # interface names are 15 characters at most
        self.host_names = list(hosts)
        self.subnet: ipaddress.IPv4Network | None = None
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        self.partitioned: dict[str, PartitionHow] = {}
        self._root_link: str | None = None
        self._up = False
        atexit.register(self.down)

    # --- addresses ---------------------------------------------------------------------------
    def _addr(self, n: int) -> str:
        assert self.subnet is not None
        return str(self.subnet.network_address + n)

    @property
    def services_address(self) -> str:
        return self._addr(SERVICES_HOST)

    @property
    def root_address(self) -> str:
        return self._addr(ROOT_HOST)

    @property
    def services_ns(self) -> str:
        return f"{self.tag}-{SERVICES}"

    def host(self, name: str) -> Host:
        return self.hosts[name]

    # --- building ----------------------------------------------------------------------------
    def up(self) -> Network:
        cleanup_leftovers()
        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # choose and claim the subnet in one go
            try:
                used = _used_networks()
                free = [n for n in CANDIDATES if not any(n.overlaps(u) for u in used)]
                if not free:
                    raise RuntimeError("no free /24 in 10.213.0.0/16 for the test network")
                self.subnet = random.choice(free)
                self._build()
            except BaseException:
                self.down()
                raise
        self._up = True
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.namespaces.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        self._no_ipv6(ns)

    @staticmethod
    def _no_ipv6(ns: str | None) -> None:
        """No IPv6 on these links: nothing autoconfigured, no router solicitations."""
        prefix = ["ip", "netns", "exec", ns] if ns else []
        for key in ("all", "default"):
            subprocess.run([*prefix, "sysctl", "-q", "-w",
                            f"net.ipv6.conf.{key}.disable_ipv6=1"], capture_output=True)

    def _build(self) -> None:
        assert self.subnet is not None
        plen = self.subnet.prefixlen
        svc = self.services_ns
        self._add_ns(svc)
        _ip("-n", svc, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
        _ip("-n", svc, "addr", "add", f"{self.services_address}/{plen}", "dev", "br0")
        _ip("-n", svc, "link", "set", "br0", "up")

        # the test's own namespace: a veth into the switch
        self._root_link = f"{self.link_tag}r"
        _ip("link", "add", self._root_link, "type", "veth", "peer", "name", f"{self.link_tag}R")
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/net/ipv6/conf/{self._root_link}/disable_ipv6").write_text("1")
        self._plug(f"{self.link_tag}R", "root")
        _ip("addr", "add", f"{self.root_address}/{plen}", "dev", self._root_link)
        _ip("link", "set", self._root_link, "up")

        for i, name in enumerate(self.host_names):
            ns = f"{self.tag}-{name}"
            self._add_ns(ns)
            inner, outer = f"{self.link_tag}h{i}", f"{self.link_tag}p{i}"
            _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("-n", ns, "link", "set", inner, "name", "eth0")
            address = self._addr(10 + i)
            _ip("-n", ns, "addr", "add", f"{address}/{plen}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            port = f"port-{name}"[:15]
            self._plug(outer, port)
            self.hosts[name] = Host(name, ns, address, port)
        self._wait_reachable()

    def _plug(self, link: str, port: str) -> None:
        """Move ``link`` into the services namespace as switch port ``port``."""
        svc = self.services_ns
        _ip("link", "set", link, "netns", svc)
        _ip("-n", svc, "link", "set", link, "name", port)
        _ip("-n", svc, "link", "set", port, "master", "br0")
        _ip("-n", svc, "link", "set", port, "up")

    def _wait_reachable(self, timeout: float = 10) -> None:
        """Every host and the test reach the services namespace (a listener there answers)."""
        probe = subprocess.Popen(
            [*self.prefix(None), sys.executable, "-c",
             "import socket,sys; s=socket.socket(); s.bind((sys.argv[1], 9)); s.listen(64);"
             "[s.accept()[0].close() for _ in range(int(sys.argv[2]))]",
             self.services_address, str(len(self.hosts) + 1)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            clients = [[sys.executable, "-c", _CONNECT, self.services_address, str(timeout)]]
            clients += [[*h.prefix(), sys.executable, "-c", _CONNECT, self.services_address,
                         str(timeout)] for h in self.hosts.values()]
            for cmd in clients:
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 5)
                if result.returncode != 0:
                    raise RuntimeError(f"test network not reachable: {cmd[:4]}: "
                                       f"{result.stderr.strip()}")
        finally:
            probe.kill()
            probe.wait(5)

    # --- running things -------------------------------------------------------------------------
    def prefix(self, host: str | None) -> list[str]:
        """The command prefix that runs inside ``host`` (None: the services namespace)."""
        ns = self.services_ns if host is None else self.hosts[host].netns
        return ["ip", "netns", "exec", ns]

    def run(self, host: str | None, args: Sequence[str], **kwargs: object
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.prefix(host), *args], capture_output=True, text=True,
                              **kwargs)  # type: ignore[call-overload,no-any-return]

    def popen(self, host: str | None, args: Sequence[str], **kwargs: object
              ) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*self.prefix(host), *args], **kwargs)  # type: ignore[call-overload,no-any-return]

    def start_redis(self, port: int = 6379) -> NsRedis:
        return NsRedis(self, port).start()

    def start_postgres(self, port: int = 5432, settings: dict[str, str] | None = None
                       ) -> PgCluster:
        return PgCluster(port=port, listen=self.services_address,
                         netns=self.prefix(None), settings=settings).start()

    # --- faults ---------------------------------------------------------------------------------
    def partition(self, host: str, how: PartitionHow = "link") -> None:
        """Cut ``host`` off from everything: its processes keep running, their packets vanish."""
        if host in self.partitioned:
            return
        port = self.hosts[host].port
        if how == "link":
            _ip("-n", self.services_ns, "link", "set", port, "down")
        else:
            for cmd in ([*self.prefix(host), "tc", "qdisc", "add", "dev", "eth0", "root",
                         "netem", "loss", "100%"],
                        [*self.prefix(None), "tc", "qdisc", "add", "dev", port, "root",
                         "netem", "loss", "100%"]):
                subprocess.run(cmd, check=True, capture_output=True, timeout=30)
        self.partitioned[host] = how

    def heal(self, host: str) -> None:
        how = self.partitioned.pop(host, None)
        if how is None:
            return
        port = self.hosts[host].port
        if how == "link":
            _ip("-n", self.services_ns, "link", "set", port, "up")
        else:
            subprocess.run([*self.prefix(host), "tc", "qdisc", "del", "dev", "eth0", "root"],
                           capture_output=True, timeout=30)
            subprocess.run([*self.prefix(None), "tc", "qdisc", "del", "dev", port, "root"],
                           capture_output=True, timeout=30)

    @contextlib.contextmanager
    def partitioned_host(self, host: str, how: PartitionHow = "link") -> Iterator[None]:
        self.partition(host, how)
        try:
            yield
        finally:
            self.heal(host)

    def reachable(self, host: str | None, port: int, timeout: float = 2) -> bool:
        """Whether ``host`` (None: this test process) can open a TCP connection to the services
        namespace on ``port``."""
        if host is None:
            try:
                with socket.create_connection((self.services_address, port), timeout=timeout):
                    return True
            except OSError:
                return False
        result = self.run(host, [sys.executable, "-c", _CONNECT, self.services_address,
                                 str(timeout), str(port)], timeout=timeout + 10)
        return result.returncode == 0

    # --- teardown ---------------------------------------------------------------------------------
    def down(self) -> None:
        """Kill whatever still runs in these namespaces, delete them and the root link."""
        for ns in reversed(self.namespaces):
            _kill_namespace_processes(ns)
        time.sleep(0.1 if self.namespaces else 0)
        for ns in reversed(self.namespaces):
            _ip("netns", "del", ns, check=False)
        if self._root_link:
            _ip("link", "del", self._root_link, check=False)
        self.namespaces.clear()
        self.hosts.clear()
        self._root_link = None
        self._up = False

    def __enter__(self) -> Network:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


# Connect to argv[1]:argv[3] (default port 9), retrying until argv[2] seconds passed.
_CONNECT = (
    "import socket,sys,time\n"
    "end=time.monotonic()+float(sys.argv[2]); port=int(sys.argv[3]) if len(sys.argv)>3 else 9\n"
    "while True:\n"
    "    try:\n"
    "        socket.create_connection((sys.argv[1], port), timeout=1).close(); break\n"
    "    except OSError as e:\n"
    "        if time.monotonic()>end: sys.exit(f'{sys.argv[1]}:{port}: {e}')\n"
    "        time.sleep(0.1)\n"
)


class NsRedis:
    """A private redis-server in the services namespace, on the services address."""

    def __init__(self, network: Network, port: int) -> None:
        self.network = network
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.network.services_address}:{self.port}/0"

    def start(self, timeout: float = 10) -> NsRedis:
        from sagas.devtools.localredis import redis_server_binary

        self.process = self.network.popen(
            None, [redis_server_binary(), "--port", str(self.port), "--bind",
                   self.network.services_address, "--save", "", "--appendonly", "no",
                   "--protected-mode", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.network.reachable(None, self.port, timeout=0.5):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start in the services namespace on {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
