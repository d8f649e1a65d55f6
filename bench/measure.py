"""What the benchmarks measure besides their load: machine calibration, broker I/O, profiles, drain.

* :func:`calibrate`: CPU seconds of a fixed pure-Python loop in the calling
  process, printed beside the figures so that runs on machines (or moments) of
  different speed can be compared (``CALIBRATION_REFERENCE_S`` is the
  development machine's value; README "Benchmarks" explains it).
* :func:`tcp_bytes` and :func:`bytes_between`: bytes received and sent on
  every TCP connection to the broker's port, from the kernel's per-socket
  counters (``ss -ti``: ``bytes_received``, ``bytes_acked``). Received is
  every byte the broker's clients sent it: produce requests with their
  records, but also fetch, metadata, heartbeat and offset-commit requests;
  sent is every byte it answered (fetch responses carry the records again,
  once per consumer). ``/proc/PID/io`` cannot tell: its ``rchar``/``wchar``
  count ``read``/``write`` calls, and Tansu (Rust) uses ``recv``/``send`` on
  sockets (its ``rchar`` stayed 0 over 2,000 admissions). A connection that
  closes inside the window is not counted; the benchmarks' are long-lived.
* :class:`Profiles`: py-spy raw profiles of some processes for a window.
* :func:`wait_terminal` and :func:`statuses_of`: PostgreSQL's view of a run.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from tests.support.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
CALIBRATION_LOOP = 10_000_000
# The reference calibration: the loop as first measured on the 2-core development machine
# (2026-12-01; later runs there under the bench lock gave 0.62-0.76 s: its speed varies with
# what else runs). That machine is about 2x slower per core than the one issue 10's figures
# came from, whose own value is not known. Any constant serves to compare normalised runs.
CALIBRATION_REFERENCE_S = 0.84
TERMINAL = ("completed", "failed", "cancelled", "expired")


_LOOP = compile(
    f"s = 0\nfor i in range({CALIBRATION_LOOP}):\n    s += i\n", "<calibration>", "exec"
)


def worker_settings(items: list[str]) -> dict[str, str]:
    """``--worker-env NAME=VALUE`` arguments as ``start_worker`` overrides (``INFERSTREAM_`` is added there)."""
    return {name.lower(): value for name, value in (item.split("=", 1) for item in items)}


def calibrate() -> float:
    """CPU seconds of ``s = 0; for i in range(10_000_000): s += i`` at module level, in this process.

    At module level (global variables), as the reference was measured: the same
    loop inside a function, on locals, takes about a third of the time.
    """
    started = time.process_time()
    exec(_LOOP, {})
    return time.process_time() - started


def slowness(seconds: float) -> float:
    """How much slower than the reference machine a calibration says this one is (1.0: as fast)."""
    return seconds / CALIBRATION_REFERENCE_S


def calibration_line(seconds: float) -> str:
    return (
        f"machine calibration: {CALIBRATION_LOOP:,} additions (module level) in {seconds:.2f} s CPU; "
        f'x{slowness(seconds):.2f} the reference calibration ({CALIBRATION_REFERENCE_S} s, README "Benchmarks")'
    )


def tcp_bytes(port: int) -> dict[str, tuple[int, int]]:
    """Peer address -> (bytes received, bytes sent) of each established connection to local ``port``."""
    listing = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    out: dict[str, tuple[int, int]] = {}
    peer = ""
    for line in listing.splitlines():
        if line and not line[0].isspace():
            peer = line.split()[-1]  # Recv-Q Send-Q Local Peer
            continue
        got = re.search(r"\bbytes_received:(\d+)", line)
        sent = re.search(r"\bbytes_acked:(\d+)", line)
        if peer and (got or sent):
            out[peer] = (int(got.group(1)) if got else 0, int(sent.group(1)) if sent else 0)
    return out


def bytes_between(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> tuple[int, int]:
    """(received, sent) in between, summed over the connections open at the end."""
    received = sent = 0
    for peer, (got, put) in after.items():
        got0, put0 = before.get(peer, (0, 0))
        received, sent = received + got - got0, sent + put - put0
    return received, sent


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class Profiles:
    """``with Profiles(directory, {label: pid}):`` py-spy records each process for the block.

    Raw (collapsed-stack) output, 100 Hz, ``--nonblocking`` (the process is not
    paused to sample it), one file per label: ``DIRECTORY/<label>.txt``
    (summarise with ``python3 /tmp/agg.py FILE 40`` or any flamegraph tool).
    py-spy costs CPU itself: figures of a profiled run are not the benchmark's.
    A ``None`` directory records nothing.
    """

    def __init__(self, directory: Path | None, pids: dict[str, int]) -> None:
        self.directory = directory
        self.pids = pids
        self.procs: dict[Path, subprocess.Popen[bytes]] = {}

    def __enter__(self) -> Profiles:
        if self.directory is None:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        for label, pid in self.pids.items():
            out = self.directory / (re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-") + ".txt")
            command = [str(PY_SPY), "record", "--pid", str(pid), "--rate", "100"]
            command += ["--format", "raw", "--nonblocking", "-o", str(out)]
            self.procs[out] = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
        time.sleep(0.5)  # attached before the window starts
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for out, proc in self.procs.items():
            try:
                _, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
            if not out.exists():
                print(f"NOTE: no profile written to {out}: {err.decode(errors='replace')[-300:]}")
        if self.procs:
            print(
                f"profiles (py-spy raw, 100 Hz, measured window only): {sorted(map(str, self.procs))}"
            )


async def wait_terminal(pipeline: Pipeline, expected: int, deadline_s: float) -> float:
    """Poll PostgreSQL until ``expected`` rows of the namespace are terminal (or the deadline); when seen.

    A cheap count over the namespace's own table, so the polling itself costs PostgreSQL little.
    """
    pool = await pipeline.store.connect()
    query = (
        f'SELECT count(*) FROM "{pipeline.settings.db_schema}".requests'
        f" WHERE status IN {TERMINAL!r}"
    )
    deadline = time.monotonic() + deadline_s
    while True:
        terminal = int(await pool.fetchval(query))
        now = time.monotonic()
        if terminal >= expected or now > deadline:
            return now
        await asyncio.sleep(0.05)


async def statuses_of(pipeline: Pipeline, ids: list[str]) -> dict[str, int]:
    """How many of ``ids`` have a row in each status (a request id is the table's key: one row each)."""
    pool = await pipeline.store.connect()
    query = (
        f'SELECT status, count(*) AS n FROM "{pipeline.settings.db_schema}".requests'
        " WHERE request_id = ANY($1) GROUP BY status"
    )
    return {r["status"]: int(r["n"]) for r in await pool.fetch(query, ids)}
