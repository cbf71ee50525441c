"""Remote devices through a TVM RPC tracker (``--rpc-tracker HOST:PORT --rpc-key KEY``).

Tuning candidates and latency runs go to a device registered under KEY; the library is built
here (cross-compiled for the device's target) and uploaded. Before anything is tuned the
tracker is asked, with a short socket timeout, whether it answers and has a free device with
that key: TVM's own client retries for a minute and then waits in the queue forever.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import Any

from spa.errors import UsageError
from spa.kernels.errors import RPCError, first_line

__all__ = ["Remote", "parse_tracker"]

CONNECT_TIMEOUT_S = 5.0


def parse_tracker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--rpc-tracker {text!r}: expected HOST:PORT")
    return host, int(port)


@dataclasses.dataclass
class Remote:
    host: str
    port: int
    key: str
    session_timeout_s: int = 120

    @classmethod
    def from_options(cls, tracker: str | None, key: str | None) -> Remote | None:
        if tracker is None and key is None:
            return None
        if tracker is None or not key:
            raise UsageError("--rpc-tracker and --rpc-key go together")
        host, port = parse_tracker(tracker)
        return cls(host, port, key)

    @property
    def where(self) -> str:
        return f"RPC tracker {self.host}:{self.port}"

    def check(self) -> dict[str, Any]:
        """Fail fast: the tracker answers and has a free device with the key."""
        try:
            with socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S):
                pass
        except OSError as e:
            raise RPCError(f"{self.where} is unreachable ({e.strerror or e})") from None
        from tvm import rpc

        try:
            summary = rpc.connect_tracker(self.host, self.port).summary()
        except Exception as e:  # noqa: BLE001 - not a tracker on that port
            raise RPCError(f"{self.where} does not answer as a TVM tracker ({first_line(e)})") from None
        queue = summary.get("queue_info", {})
        info = queue.get(self.key)
        if not info or info.get("free", 0) < 1:
            keys = ", ".join(f"{k} (free {v.get('free', 0)})" for k, v in sorted(queue.items())) or "none"
            raise RPCError(f"{self.where} has no free device with key '{self.key}' (keys: {keys})")
        return info

    def session(self):
        from tvm import rpc

        try:
            return rpc.connect_tracker(self.host, self.port).request(self.key, priority=1, session_timeout=self.session_timeout_s, max_retry=2)
        except Exception as e:  # noqa: BLE001
            raise RPCError(f"{self.where}: could not get a device with key '{self.key}' ({first_line(e)})") from None

    def runner(self):
        """MetaSchedule's runner measuring on the tracker's devices."""
        import tvm.s_tir.meta_schedule as ms

        config = ms.runner.RPCConfig(tracker_host=self.host, tracker_port=self.port, tracker_key=self.key, session_timeout_sec=self.session_timeout_s)
        evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=0)
        return ms.runner.RPCRunner(config, evaluator_config=evaluator, max_workers=1)
