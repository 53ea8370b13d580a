"""The embedded S3 API server of the local default: moto's server mode on 127.0.0.1.

A real HTTP S3 endpoint (multipart, checksums, listing) with the bucket created on start; it keeps
objects in memory, so a restart starts empty. Used by `make demo` and by the tests. The full stack
uses MinIO instead (docker-compose.yml); the task code is the same for both.

    python infra/s3_server.py start --port 9100 --bucket segmentation --pidfile .work/s3.pid
    python infra/s3_server.py stop --pidfile .work/s3.pid
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
# Credentials of the embedded server only; moto accepts any. Real ones come from the environment.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local-access-key", "AWS_SECRET_ACCESS_KEY": "local-secret-key"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def endpoint_url(port: int, host: str = HOST) -> str:
    return f"http://{host}:{port}"


def wait_until_up(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(endpoint_url(port) + "/", timeout=1).close()
            return
        except OSError as err:
            if time.monotonic() > deadline:
                raise RuntimeError(f"S3 server on port {port} did not answer in {timeout_s}s") from err
            time.sleep(0.1)


def start(port: int, log_path: Path | None = None) -> subprocess.Popen:
    """Start moto_server as a child process and wait until it answers HTTP."""
    moto = Path(sys.executable).with_name("moto_server")
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(
        [str(moto), "-H", HOST, "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        wait_until_up(port)
    except RuntimeError:
        proc.kill()
        raise
    return proc


def stop(proc_or_pid: subprocess.Popen | int) -> None:
    pid = proc_or_pid.pid if isinstance(proc_or_pid, subprocess.Popen) else proc_or_pid
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if isinstance(proc_or_pid, subprocess.Popen):
        try:
            proc_or_pid.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc_or_pid.kill()
            proc_or_pid.wait()


def create_bucket(port: int, bucket: str, host: str = HOST) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url(port, host),
        region_name="us-east-1",
        aws_access_key_id=LOCAL_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=LOCAL_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


def client_env(port: int, bucket: str, host: str = HOST) -> dict[str, str]:
    """Environment that points boto3 (and so tasks.store) at this server."""
    return {
        **LOCAL_CREDENTIALS,
        "AWS_ENDPOINT_URL": endpoint_url(port, host),
        "AWS_DEFAULT_REGION": "us-east-1",
        "SEGPIPE_BUCKET": bucket,
    }


def _main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--bucket", default="segmentation")
    parser.add_argument("--pidfile", type=Path, default=Path(".work/s3.pid"))
    parser.add_argument("--log", type=Path, default=Path(".work/s3.log"))
    args = parser.parse_args()
    if args.action == "stop":
        if args.pidfile.exists():
            stop(int(args.pidfile.read_text()))
            args.pidfile.unlink()
        return 0
    args.pidfile.parent.mkdir(parents=True, exist_ok=True)
    if args.pidfile.exists():
        stop(int(args.pidfile.read_text()))
    proc = start(args.port, args.log)
    create_bucket(args.port, args.bucket)
    args.pidfile.write_text(str(proc.pid))
    print(f"S3 API server on {endpoint_url(args.port)} (pid {proc.pid}), bucket {args.bucket}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
