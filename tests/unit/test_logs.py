"""inferstream.logs: the JSON fields, request and trace ids, payload redaction, raw stdout/stderr as JSON, hooks.

What changes process-wide state (the JSON install, a worker's logging set-up) runs
in a subprocess, so this process keeps its own logging.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import faust
import pytest
from aiokafka.protocol.produce import ProduceRequest_v7
from aiormq.abc import ChannelFrame
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from inferstream import logs
from inferstream.settings import Settings
from schemas.records import InferenceRequest

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a secret prompt"


def record(msg: Any, *args: Any, name: str = "test", level: int = logging.INFO, **kw: Any) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args or None, kw.get("exc_info"))


def formatted(rec: logging.LogRecord) -> dict[str, Any]:
    logs.redact_payloads(rec)
    out: dict[str, Any] = json.loads(logs.JsonFormatter().format(rec))
    return out


def test_a_line_has_time_level_logger_message_and_nothing_unknown() -> None:
    line = formatted(record("queued %d", 3, name="streams.admission", level=logging.WARNING))
    assert line.keys() == {"time", "level", "logger", "message"}
    assert line["level"] == "WARNING" and line["logger"] == "streams.admission" and line["message"] == "queued 3"
    assert line["time"].endswith("+00:00") and "T" in line["time"]


def test_request_id_is_there_inside_bind_request_id_only() -> None:
    with logs.bind_request_id("req_1"):
        assert formatted(record("x"))["request_id"] == "req_1"
        with logs.bind_request_id("req_2"):
            assert logs.current_request_id() == "req_2"
        assert formatted(record("x"))["request_id"] == "req_1"
    assert "request_id" not in formatted(record("x"))


async def test_a_task_started_in_the_block_keeps_its_request_id() -> None:
    async def later() -> str | None:
        await asyncio.sleep(0)
        return logs.current_request_id()

    with logs.bind_request_id("req_task"):
        task = asyncio.create_task(later())
    assert await task == "req_task"


async def test_set_request_id_lasts_for_its_task_only() -> None:
    async def handler() -> str | None:
        logs.set_request_id("req_view")
        await asyncio.sleep(0)
        return logs.current_request_id()

    assert await asyncio.create_task(handler()) == "req_view"
    assert logs.current_request_id() is None


def test_trace_and_span_ids_come_from_the_current_span() -> None:
    context = SpanContext(trace_id=0x1234, span_id=0xABC, is_remote=False, trace_flags=TraceFlags(1))
    with trace.use_span(NonRecordingSpan(context)):
        line = formatted(record("x"))
    assert line["trace_id"] == f"{0x1234:032x}" and line["span_id"] == f"{0xABC:016x}"
    assert "trace_id" not in formatted(record("x"))


def test_an_exception_is_one_string_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        line = formatted(record("failed", exc_info=sys.exc_info()))
    assert line["message"] == "failed"
    assert line["exception"].startswith("Traceback") and line["exception"].endswith("ValueError: boom")


@pytest.mark.parametrize(
    "payload",
    [
        PROMPT.encode(),
        bytearray(PROMPT.encode()),
        InferenceRequest(
            request_id="r", user_id="u", task="generate", model="m", input=[PROMPT],
            estimated_tokens=1, created_at=0.0, quota_day="2026-12-01",
        ),  # fmt: skip
        ChannelFrame(payload=PROMPT.encode(), should_close=False),
        ProduceRequest_v7(transactional_id=None, required_acks=1, timeout=1, topics=[("t", [(0, PROMPT.encode())])]),
        [PROMPT.encode(), b"other"],
    ],
    ids=["bytes", "bytearray", "record", "amqp-frame", "kafka-produce", "list-of-bytes"],
)
def test_arguments_that_carry_bodies_are_redacted(payload: Any) -> None:
    line = formatted(record("Sending %s to %s", payload, "topic"))
    assert PROMPT not in json.dumps(line)
    assert line["message"].startswith("Sending <") and "redacted> to topic" in line["message"]


def test_other_arguments_a_dict_of_arguments_and_a_payload_as_message() -> None:
    assert formatted(record("%s %d %r %s", "id", 3, None, [1, 2]))["message"] == "id 3 None [1, 2]"
    rec = record("body %(body)s of %(id)s", {"body": PROMPT.encode(), "id": "r"})
    assert formatted(rec)["message"] == "body <bytes redacted> of r"
    assert formatted(record(PROMPT.encode()))["message"] == "<bytes redacted>"


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["faust", "-A", "streams", "worker", "-l", "info"], "worker"),
        (["/x/faust/__main__.py", "--json", "-L", "uvloop", "--app=streams", "worker"], "worker"),
        (["faust", "-A", "streams", "keys", "create", "--user", "worker"], "keys"),
        (["faust", "--app", "worker", "routes", "check"], "routes"),
        (["faust", "-A", "streams"], None),
    ],
)
def test_the_faust_subcommand_is_found_past_the_root_options(argv: list[str], command: str | None) -> None:
    assert logs.faust_command(argv) == command


def test_configure_refuses_an_unknown_format_and_leaves_other_commands_alone() -> None:
    with pytest.raises(SystemExit, match="INFERSTREAM_LOG_FORMAT='yaml'"):
        logs.configure(Settings(log_format="yaml"), ["faust", "-A", "streams", "worker"])
    stdout = sys.stdout
    logs.configure(Settings(log_format="json"), ["faust", "-A", "streams", "keys", "create"])
    logs.configure(Settings(log_format="text"), ["faust", "-A", "streams", "worker"])
    assert sys.stdout is stdout and sys.excepthook is sys.__excepthook__


def test_the_worker_class_follows_the_format() -> None:
    assert logs.use_worker_logging(faust.App("t-logs-json"), Settings(log_format="json")).conf.Worker is logs.JsonWorker
    assert logs.use_worker_logging(faust.App("t-logs-text"), Settings()).conf.Worker is logs.TextWorker


def lines_of(*writes: str) -> list[dict[str, Any]]:
    out = io.StringIO()
    stream = logs.JsonLines(logs._Raw(out, out), out, "stderr", logging.ERROR)
    for w in writes:
        stream.write(w)
    stream.flush()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_raw_writes_become_objects_one_per_write_and_blank_lines_vanish() -> None:
    got = lines_of("banner\n| a | b |\n", "\n", "next", " line\n")
    assert [o["message"] for o in got] == ["banner\n| a | b |", "next line"]
    assert {o["logger"] for o in got} == {"stderr"} and {o["level"] for o in got} == {"ERROR"}


def test_a_traceback_printed_line_by_line_is_one_object_with_the_exception() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise ValueError("outer") from exc
    except ValueError:
        out = io.StringIO()
        import traceback

        traceback.print_exc(file=out)
    got = lines_of("before\n", *out.getvalue().splitlines(keepends=True), "after\n")
    assert [o["message"] for o in got] == ["before", "ValueError: outer", "after"]
    assert "KeyError: 'inner'" in got[1]["exception"] and "direct cause" in got[1]["exception"]


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def objects(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_a_json_process_writes_only_json_and_an_uncaught_exception_is_one_object() -> None:
    done = run_python(
        """
        import logging, threading, warnings
        from inferstream import logs
        logs.install_json()
        print("hello")
        warnings.warn("careful")
        logging.getLogger("aiokafka").warning("value=%s", b"a secret prompt")
        logging.getLogger("bad").warning("%d", "not a number")
        t = threading.Thread(target=lambda: 1 / 0, name="side"); t.start(); t.join()
        raise RuntimeError("the end")
        """
    )
    assert done.returncode == 1
    out, err = objects(done.stdout), objects(done.stderr)
    assert [o["message"] for o in out] == ["hello"]
    by_logger = {o["logger"]: o for o in err}
    assert "careful" in by_logger["py.warnings"]["message"]
    assert by_logger["aiokafka"]["message"] == "value=<bytes redacted>"
    # A broken call is one object naming the logger and the template, not its arguments.
    broken = by_logger["inferstream.logs"]
    assert broken["message"] == "could not format a line of bad ('%d')" and "TypeError" in broken["exception"]
    uncaught = [o for o in err if o["logger"] == "uncaught"]
    assert [o["message"] for o in uncaught] == ["uncaught exception in thread side", "uncaught exception"]
    assert uncaught[0]["exception"].endswith("ZeroDivisionError: division by zero")
    assert uncaught[1]["level"] == "CRITICAL" and uncaught[1]["exception"].endswith("RuntimeError: the end")


WORKER_SETUP = """
import asyncio, logging, sys
import faust
from inferstream import logs
from inferstream.settings import Settings
settings = Settings(log_format=sys.argv[1])
logs.configure(settings, ["faust", "-A", "streams", "worker"])
app = logs.use_worker_logging(faust.App("t-logs"), settings)
worker = app.conf.Worker(app, loglevel="debug", loop=asyncio.new_event_loop())
worker._setup_logging()  # what mode's worker does first when it starts
logging.getLogger("aiokafka.producer").debug("Sending (value=%s)", b"a secret prompt")
print("printed while the worker runs")
"""


def test_the_json_worker_keeps_json_once_mode_has_set_up_its_logging() -> None:
    done = run_python(WORKER_SETUP, "json")
    assert done.returncode == 0, done.stderr
    err = objects(done.stderr)
    assert {"logger": "aiokafka.producer", "level": "DEBUG", "message": "Sending (value=<bytes redacted>)"}.items() <= err[0].items()
    assert "printed while the worker runs" in err[1]["message"] and done.stdout == ""


def test_the_text_worker_keeps_mode_s_format_and_redacts_too() -> None:
    done = run_python(WORKER_SETUP, "text")
    assert done.returncode == 0, done.stderr
    assert "[DEBUG] Sending (value=<bytes redacted>)" in done.stderr and PROMPT not in done.stderr
    assert not done.stderr.lstrip().startswith("{")
