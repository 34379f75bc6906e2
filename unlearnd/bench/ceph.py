"""A real S3 server for tests: Ceph's RADOS Gateway from Debian's `radosgw` package, over a one-node Ceph
cluster (one monitor, one OSD keeping its objects in memory) in a temp dir on loopback ports. Nothing is
mocked: the gateway is the S3 server Ceph deployments run in production; only the storage under it is
small and volatile. Starting it takes about ten seconds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from unlearnd.bench.servers import free_port

COMMANDS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph-authtool", "ceph")
ACCESS_KEY = "unlearnd-test-access"
SECRET_KEY = "unlearnd-test-secret"


def ceph_installed() -> bool:
    return all(shutil.which(name) for name in COMMANDS)


def _config(root: Path, fsid: str, mon_port: int, s3_port: int) -> str:
    """One node: no replication, an in-memory object store, cephx keys from one keyring, no disk warnings
    (a full CI disk must not stop the monitor)."""
    return f"""[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
keyring = {root}/keyring
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
osd pool default pg num = 8
osd pool default pgp num = 8
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 0
mon data avail crit = 0
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 536870912
ms bind ipv6 = false
run dir = {root}/run
log file = {root}/log/$name.log
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
mon data = {root}/mon/$name
osd data = {root}/osd/$cluster-$id
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{s3_port}
rgw data = {root}/rgw
"""


KEYS = (
    ("mon.", ("mon", "allow *")),
    ("client.admin", ("mon", "allow *", "osd", "allow *", "mgr", "allow *")),
    ("osd.0", ("mon", "allow profile osd", "osd", "allow *", "mgr", "allow profile osd")),
    ("client.rgw", ("mon", "allow rw", "osd", "allow rwx")),
)


class CephS3Server:
    """`start()` brings up monitor, OSD and gateway and makes one S3 user; `stop_gateway()` and
    `start_gateway()` take only the S3 endpoint away and back (the objects stay, in the OSD)."""

    def __init__(self, root: Path | None = None):
        if not ceph_installed():
            raise RuntimeError("Ceph is not installed (Debian packages ceph-mon ceph-osd radosgw)")
        self.root = Path(root or tempfile.mkdtemp(prefix="unlearnd-ceph-"))
        self.mon_port, self.s3_port = free_port(), free_port()
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.access_key, self.secret_key = ACCESS_KEY, SECRET_KEY
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """What an S3 client (s3fs, boto) reads to reach this server instead of AWS."""
        return {
            "AWS_ENDPOINT_URL_S3": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def _tool(self, *args: str) -> str:
        conf = ["-c", str(self.root / "ceph.conf")] if args[0] not in ("ceph-authtool", "monmaptool") else []
        done = subprocess.run([args[0], *conf, *args[1:]], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed: {done.stderr[-2000:]}\n{self.log()}")
        return done.stdout

    def _daemon(self, name: str, *args: str) -> None:
        with open(self.root / "log" / f"{name}.out", "ab") as log:  # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen(
                [args[0], "-f", "-c", str(self.root / "ceph.conf"), *args[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start(self, timeout_s: float = 120) -> CephS3Server:
        """Everything up, or everything stopped again and the error raised (no daemon left behind)."""
        try:
            return self._start(timeout_s)
        except BaseException:
            self.cleanup()
            raise

    def _start(self, timeout_s: float) -> CephS3Server:
        for folder in ("run", "log", "mon", "osd/ceph-0", "rgw"):
            (self.root / folder).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        (self.root / "ceph.conf").write_text(_config(self.root, fsid, self.mon_port, self.s3_port))
        keyring = str(self.root / "keyring")
        for entity, caps in KEYS:
            create = ["--create-keyring"] if entity == "mon." else []
            pairs = [arg for i in range(0, len(caps), 2) for arg in ("--cap", caps[i], caps[i + 1])]
            self._tool("ceph-authtool", keyring, *create, "--gen-key", "-n", entity, *pairs)
        monmap = str(self.root / "monmap")
        self._tool("monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v2:127.0.0.1:{self.mon_port}]", monmap)
        self._tool("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring)
        self._daemon("mon", "ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        self._tool("ceph", "--connect-timeout", "60", "osd", "new", osd_uuid)
        self._tool("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self._daemon("osd", "ceph-osd", "-i", "0")
        self.start_gateway(timeout_s)
        self._tool(
            "radosgw-admin", "user", "create", "--uid=unlearnd", "--display-name=unlearnd",
            f"--access-key={self.access_key}", f"--secret={self.secret_key}",
        )  # fmt: skip
        return self

    def start_gateway(self, timeout_s: float = 120) -> None:
        self._daemon("rgw", "radosgw", "-n", "client.rgw")
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.procs["rgw"].poll() is not None:
                raise RuntimeError(f"radosgw exited with {self.procs['rgw'].returncode}\n{self.log()}")
            try:
                httpx.get(self.endpoint, timeout=2)  # anonymous: any answer means it serves S3
                return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError(f"radosgw did not answer in {timeout_s}s\n{self.log()}")

    def stop_gateway(self) -> None:
        self._kill("rgw")

    def _kill(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def log(self) -> str:
        tails = []
        for path in sorted((self.root / "log").glob("*")):
            tails.append(f"--- {path.name}\n" + path.read_text(errors="replace")[-1500:])
        return "\n".join(tails)

    def cleanup(self) -> None:
        for name in ("rgw", "osd", "mon"):
            self._kill(name)
        shutil.rmtree(self.root, ignore_errors=True)
