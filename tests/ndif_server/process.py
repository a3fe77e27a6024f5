"""Starting and stopping the test server from the tests, within a time bound."""

import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nnsight
import tornado
import torch
import transformers

SERVE = Path(__file__).with_name("serve.py")


def site_folders() -> list[str]:
    """The folders the server imports torch, transformers, nnsight and tornado from (this interpreter's)."""
    return sorted({str(Path(module.__file__).parent.parent) for module in (torch, transformers, nnsight, tornado)})


class ServerProcess:
    """The server in a subprocess on 127.0.0.1; `models` maps a repo id to a folder (`FOLDER@SECONDS`: slow)."""

    def __init__(self, models: dict[str, str], api_key: str, max_bytes: int = 4_000_000,
                 time_limit: float = 60.0, startup_s: float = 120.0):
        command = [sys.executable, "-I", "-S", str(SERVE), "--api-key", api_key, "--max-bytes", str(max_bytes),
                   "--time-limit", str(time_limit)]
        for folder in site_folders():
            command += ["--site", folder]
        for name, folder in models.items():
            command += ["--model", f"{name}={folder}"]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="ndif-server-", suffix=".log", delete=False)
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env=os.environ | {"HF_HUB_OFFLINE": "1"})
        self.url = f"http://127.0.0.1:{self._wait_for_port(startup_s)}"

    def _wait_for_port(self, startup_s: float) -> int:
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline and self.process.poll() is None:
            ready, _, _ = select.select([self.process.stdout], [], [], 1.0)
            if ready:
                line = self.process.stdout.readline()
                if line.startswith("READY "):
                    return int(line.split()[1])
        self.stop()
        raise RuntimeError(f"the NDIF test server did not start within {startup_s:g} s:\n{self.errors()}")

    def errors(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()[-4000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process.stdout.close()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
