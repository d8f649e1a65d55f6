"""Worker logs: ``INFERSTREAM_LOG_FORMAT=json`` makes every line ``faust -A streams worker`` writes one JSON object.

Each object has ``time`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``;
``request_id`` (bound with :func:`bind_request_id` where one request is handled),
``trace_id`` and ``span_id`` (the current OpenTelemetry span) when known; and
``exception`` (the whole traceback, one string) when there is one. ``text``, the
default, keeps mode's terminal format and costs nothing extra.

What it covers, in a worker process (``json``): the records of every logger
(ours, Faust's, mode's, aiokafka's, aio-pika's, ...), Python warnings, raw writes
to stdout and stderr (Faust's banner, ``print``, a refusal message; a traceback
printed line by line stays one object), and uncaught exceptions of the main
thread, other threads and ``__del__`` (one object each). Other ``faust -A streams``
commands keep plain stdout: what they print (a new API key) is output, not a log.

Keys, digests and prompts stay out of every line in both formats:
:func:`redact_payloads` is the one place that scrubs what libraries log at DEBUG
(aiokafka logs produced values and whole produce/fetch structs, aiormq logs
outgoing AMQP frames with their bodies), applied to every handler of the worker.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import io
import logging
import sys
import threading
import types
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import IO, Any, TypeVar

import faust
from opentelemetry import trace
from pythonjsonlogger.orjson import OrjsonFormatter

from inferstream.settings import Settings

FORMATS = ("text", "json")
AppT = TypeVar("AppT", bound=faust.App)

_REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("inferstream_request_id", default=None)


@contextlib.contextmanager
def bind_request_id(request_id: str) -> Iterator[None]:
    """Lines logged in the block (and in tasks it starts) carry ``request_id``."""
    token = _REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        _REQUEST_ID.reset(token)


def set_request_id(request_id: str) -> None:
    """For the rest of the current task: where one task handles one request (an HTTP view, an AMQP delivery)."""
    _REQUEST_ID.set(request_id)


def current_request_id() -> str | None:
    return _REQUEST_ID.get()


# ---- redaction ----------------------------------------------------------------
# Argument types whose text holds message bodies (prompts, outputs) or keys:
# (module, class name prefix), matched along the argument's MRO.
_PAYLOAD_TYPES: tuple[tuple[str, str], ...] = (
    ("faust.models.record", "Record"),  # our records: input, output, user
    ("faust.events", "Event"),
    ("faust.types.tuples", "Message"),
    ("aiokafka.structs", "ConsumerRecord"),
    ("aiokafka.protocol.produce", "Produce"),  # "Request to ...: %s" with the record batches
    ("aiokafka.protocol.fetch", "Fetch"),  # "Response from ...: %s" with the records fetched
    ("aiormq.abc", "ChannelFrame"),  # "Prepare to send %r": the marshalled frames, bodies included
    ("aiormq.abc", "DeliveredMessage"),
)
_PLAIN = (str, int, float, bool, type(None))


def _is_payload(value: object) -> bool:
    if isinstance(value, bytes | bytearray | memoryview):
        return True
    for cls in type(value).__mro__:
        module = cls.__module__
        if any(module == m and cls.__name__.startswith(p) for m, p in _PAYLOAD_TYPES):
            return True
    return False


def _scrub(value: object) -> object:
    if isinstance(value, _PLAIN):
        return value
    if _is_payload(value):
        return f"<{type(value).__name__} redacted>"
    if isinstance(value, list | tuple | set | frozenset) and any(_is_payload(v) for v in value):
        return f"<{type(value).__name__} of {len(value)} redacted>"
    return value


def redact_payloads(record: logging.LogRecord) -> bool:
    """The one place payloads leave log lines: arguments that carry bodies become ``<Type redacted>``.

    A filter on every handler of a worker (both formats); it never drops a line.
    Our own code logs ids, counts and error types, never bodies (an audit, and
    tests/e2e/test_logs.py greps a DEBUG run for a key, its digest and a prompt).
    """
    args = record.args
    if isinstance(args, tuple) and args:
        record.args = tuple(_scrub(a) for a in args)
    elif isinstance(args, dict) and args:
        record.args = {k: _scrub(v) for k, v in args.items()}
    if not isinstance(record.msg, str) and _is_payload(record.msg):
        record.msg = f"<{type(record.msg).__name__} redacted>"
    return True


# ---- JSON ---------------------------------------------------------------------
class JsonFormatter(OrjsonFormatter):
    """One JSON object: time, level, logger, message, request_id/trace_id/span_id when known, exception."""

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.message
        request_id = getattr(record, "request_id", None) or _REQUEST_ID.get()
        if request_id:
            log_data["request_id"] = request_id
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            log_data["trace_id"] = trace.format_trace_id(span.trace_id)
            log_data["span_id"] = trace.format_span_id(span.span_id)
        if message_dict.get("exc_info"):
            log_data["exception"] = message_dict["exc_info"]
        if message_dict.get("stack_info"):
            log_data["stack"] = message_dict["stack_info"]


class JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler writing JSON objects; its own failures are one object too, not a printed traceback."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())
        self.addFilter(redact_payloads)

    def handleError(self, record: logging.LogRecord) -> None:
        failure = logging.LogRecord(
            "inferstream.logs", logging.ERROR, __file__, 0, "could not format a line of %s (%r)",
            (record.name, record.msg), sys.exc_info(),
        )  # fmt: skip
        self.stream.write(self.format(failure) + self.terminator)


class _Raw:
    """The real stdout/stderr, and the one formatter for what does not come through a logger."""

    def __init__(self, out: IO[str], err: IO[str]) -> None:
        self.out, self.err = out, err
        self.formatter = JsonFormatter()
        self.lock = threading.Lock()

    def emit(
        self, stream: IO[str], name: str, level: int, message: str, *, exc_info: Any = None, exc_text: str = ""
    ) -> None:
        record = logging.LogRecord(name, level, "", 0, message, None, exc_info)
        record.exc_text = exc_text or None
        line = self.formatter.format(record)
        with self.lock:
            stream.write(line + "\n")
            stream.flush()


_TRACEBACK = "Traceback (most recent call last):"
_CHAINED = (_TRACEBACK, "During handling of the above exception", "The above exception was the direct cause")


class JsonLines(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a JSON worker: what is written raw becomes JSON objects.

    Lines of one ``write`` are one object; indented lines that follow (a traceback
    printed frame by frame) join it, and so does the line that ends a traceback.
    An object is written when the next one starts, on ``flush`` and at exit.
    """

    def __init__(self, raw: _Raw, stream: IO[str], name: str, level: int) -> None:
        super().__init__()
        self._raw, self._stream, self._name, self._level = raw, stream, name, level
        self._partial = ""
        self._pending: list[str] = []

    def write(self, s: str) -> int:
        lines = (self._partial + s).split("\n")
        self._partial = lines.pop()
        for i, line in enumerate(lines):
            if i == 0 and not self._joins(line):
                self._emit()
            if line.strip() or self._pending:
                self._pending.append(line)
        return len(s)

    def _joins(self, line: str) -> bool:
        if line[:1] in (" ", "\t"):
            return True
        if not self._pending or not self._pending[0].startswith(_TRACEBACK):
            return False
        # A traceback's last line, and what chains one exception to the next.
        return not line or line.startswith(_CHAINED) or self._pending[-1][:1] in (" ", "\t")

    def _emit(self) -> None:
        text = "\n".join(self._pending).strip("\n")
        self._pending = []
        if not text:
            return
        lines = text.splitlines()
        if text.startswith(_TRACEBACK) or any(line.startswith('  File "') for line in lines):
            message = lines[-1] if text.startswith(_TRACEBACK) else lines[0]
            self._raw.emit(self._stream, self._name, self._level, message, exc_text=text)
        else:
            self._raw.emit(self._stream, self._name, self._level, text)

    def flush(self) -> None:
        if self._partial:
            self._pending.append(self._partial)
            self._partial = ""
        self._emit()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"


# ---- set-up -------------------------------------------------------------------
def configure(settings: Settings, argv: Sequence[str] | None = None) -> None:
    """Before the app is built: a JSON worker writes JSON from its first line on (``text``: nothing to do)."""
    if settings.log_format not in FORMATS:
        raise SystemExit(f"INFERSTREAM_LOG_FORMAT={settings.log_format!r} is not one of {', '.join(FORMATS)}")
    if settings.log_format == "json" and faust_command(sys.argv if argv is None else argv) == "worker":
        install_json()


def use_worker_logging(app: AppT, settings: Settings) -> AppT:
    """The worker's own logging set-up (``faust worker -l``) keeps the format and the redaction."""
    # The setting is typed as the type of the worker class Faust was given; any subclass is what it takes.
    app.conf.Worker = JsonWorker if settings.log_format == "json" else TextWorker  # type: ignore[assignment]
    return app


_ROOT_OPTIONS_WITH_VALUE = frozenset({"-A", "--app", "-W", "--workdir", "--datadir", "-L", "--loop"})


def faust_command(argv: Sequence[str]) -> str | None:
    """The subcommand of ``faust [root options] COMMAND ...`` (how Faust itself finds ``-A`` before parsing)."""
    args = iter(argv[1:])
    for arg in args:
        if arg in _ROOT_OPTIONS_WITH_VALUE:
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def install_json() -> None:
    """Process-wide: the root logger, stdout, stderr, warnings and the uncaught-exception hooks write JSON."""
    global _RAW
    if _RAW is not None:
        return
    _RAW = raw = _Raw(sys.stdout, sys.stderr)
    root = logging.getLogger()
    root.handlers.clear()
    root.addHandler(JsonHandler(raw.err))
    logging.captureWarnings(True)
    # mode restores sys.__stdout__/__stderr__ when its worker stops: those become the JSON streams too.
    sys.stdout = sys.__stdout__ = JsonLines(raw, raw.out, "stdout", logging.INFO)  # type: ignore[assignment,misc]
    sys.stderr = sys.__stderr__ = JsonLines(raw, raw.err, "stderr", logging.ERROR)  # type: ignore[assignment,misc]
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisablehook
    atexit.register(_flush_streams)


_RAW: _Raw | None = None


def _uncaught(message: str, exc_info: tuple[Any, Any, types.TracebackType | None]) -> None:
    assert _RAW is not None
    _RAW.emit(_RAW.err, "uncaught", logging.CRITICAL, message, exc_info=exc_info)


def _excepthook(kind: type[BaseException], exc: BaseException, tb: types.TracebackType | None) -> None:
    _uncaught("uncaught exception", (kind, exc, tb))


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    name = args.thread.name if args.thread else "?"
    _uncaught(f"uncaught exception in thread {name}", (args.exc_type, args.exc_value, args.exc_traceback))


def _unraisablehook(u: sys.UnraisableHookArgs) -> None:
    _uncaught(f"{u.err_msg or 'Exception ignored in'}: {u.object!r}", (u.exc_type, u.exc_value, u.exc_traceback))


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(ValueError, OSError):
            stream.flush()


def _handlers() -> Iterator[logging.Handler]:
    yield from logging.getLogger().handlers
    for logger in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            yield from logger.handlers


class TextWorker(faust.Worker):
    """Faust's worker with mode's text lines, every handler filtered by :func:`redact_payloads`."""

    def _repr_name(self) -> str:
        return "Worker"  # its lines read "[^Worker]: Ready" as before, whichever subclass runs

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        for handler in _handlers():
            if redact_payloads not in handler.filters:
                handler.addFilter(redact_payloads)


class JsonWorker(TextWorker):
    """Faust's worker once mode has set up logging: its handlers write JSON to the real streams; no spinner."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spinner = None  # it draws on stdout; INFO says "Ready" instead

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        super().on_setup_root_logger(logger, level)
        formatter = JsonFormatter()
        for handler in _handlers():
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                stream = handler.stream
                if isinstance(stream, JsonLines):
                    handler.setStream(stream._stream)  # mode's handler took sys.stderr: write past it
            handler.setFormatter(formatter)
