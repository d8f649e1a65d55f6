"""``inferstream``: the command line over :class:`AsyncClient` (submit, get, wait, events, token, cancel, list, quota, models).

Answers go to stdout as JSON (one event per line for ``events``); errors to stderr, one line.
Exit codes: 0 done, 1 the API refused (an error body), 2 usage, 3 the API could not be reached
or answered outside the contract, 4 ``--wait``/``wait`` timed out, 5 the request ended
``failed``, ``cancelled`` or ``expired``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click
import msgspec

from inferstream.client._async import API_KEY_ENV, BASE_URL_ENV, DEFAULT_BASE_URL, AsyncClient
from inferstream.client.errors import (
    ApiError,
    InferstreamClientError,
    ProtocolError,
    TransportError,
    WaitTimeout,
)
from inferstream.client.models import Event, RequestDoc

T = TypeVar("T")
EXIT_API_ERROR, EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_NOT_COMPLETED = 1, 3, 4, 5
_STATUSES = ("queued", "dispatched", "running", "completed", "failed", "cancelled", "expired")


@dataclass(frozen=True)
class Options:
    url: str
    key: str | None
    timeout: float
    pretty: bool


def _echo(value: Any, pretty: bool) -> None:
    data = msgspec.json.encode(value)
    click.echo((msgspec.json.format(data, indent=2) if pretty else data).decode())


def _fail(exc: InferstreamClientError) -> int:
    line = str(exc)
    if isinstance(exc, ApiError):
        extra = [f"{k}={v}" for k, v in exc.details.items() if not isinstance(v, dict | list)]
        if exc.retry_after is not None:
            extra.append(f"retry_after={exc.retry_after:g}s")
        if extra:
            line += f" ({', '.join(extra)})"
        if exc.status == 401:
            line += f"; pass --key or set {API_KEY_ENV}"
        code = EXIT_API_ERROR
    elif isinstance(exc, WaitTimeout):
        code = EXIT_TIMEOUT
    elif isinstance(exc, TransportError | ProtocolError):
        code = EXIT_UNREACHABLE
    else:
        code = EXIT_API_ERROR
    click.echo(f"inferstream: {line}", err=True)
    return code


def _run(opts: Options, call: Callable[[AsyncClient], Awaitable[T]]) -> T:
    async def main() -> T:
        async with AsyncClient(opts.url, opts.key, timeout=opts.timeout) as client:
            return await call(client)

    try:
        return asyncio.run(main())
    except InferstreamClientError as exc:
        sys.exit(_fail(exc))


def _finished(doc: RequestDoc, pretty: bool) -> None:
    _echo(doc, pretty)
    if doc.status != "completed":
        sys.exit(EXIT_NOT_COMPLETED)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 done, 1 the API refused (the error on stderr), 2 usage, 3 the API could "
    "not be reached, 4 a wait timed out, 5 the request ended failed, cancelled or expired.",
)
@click.option("--url", envvar=BASE_URL_ENV, default=DEFAULT_BASE_URL, show_default=True,
              help=f"The API's base URL (any worker) [env: {BASE_URL_ENV}].")  # fmt: skip
@click.option("--key", envvar=API_KEY_ENV, default=None, help=f"API key [env: {API_KEY_ENV}].")
@click.option(
    "--timeout", type=float, default=30.0, show_default=True, help="Seconds per HTTP call."
)
@click.option("--pretty", is_flag=True, help="Indent the JSON answers.")
@click.pass_context
def main(ctx: click.Context, url: str, key: str | None, timeout: float, pretty: bool) -> None:
    """The Inferstream API from the command line: answers are JSON on stdout."""
    ctx.obj = Options(url, key, timeout, pretty)


@main.command()
@click.option("--task", type=click.Choice(["generate", "embed"]), required=True)
@click.option("--input", "inputs", multiple=True, required=True,
              help="The text ('-' reads stdin); repeat it for a list of inputs.")  # fmt: skip
@click.option("--model", help="A route's model; default: the task's default route.")
@click.option("--priority", type=click.Choice(["low", "normal", "high"]))
@click.option("--max-tokens", type=int, help="params.max_tokens (generate).")
@click.option("--temperature", type=float, help="params.temperature (generate).")
@click.option("--deadline-s", type=int, help="Expire the request if not done in this many seconds.")
@click.option("--metadata", help="A JSON object, echoed in the request's document.")
@click.option("--callback-url", help="Webhook for the terminal status (public addresses only).")
@click.option(
    "--idempotency-key", help="Repeat a submission safely: the same key returns the first answer."
)
@click.option(
    "--wait", "wait_", is_flag=True, help="Follow the request and print its terminal document."
)
@click.option(
    "--wait-timeout", type=float, default=None, help="Give up waiting after this many seconds."
)
@click.pass_obj
def submit(
    opts: Options,
    task: str,
    inputs: tuple[str, ...],
    model: str | None,
    priority: str | None,
    max_tokens: int | None,
    temperature: float | None,
    deadline_s: int | None,
    metadata: str | None,
    callback_url: str | None,
    idempotency_key: str | None,
    wait_: bool,
    wait_timeout: float | None,
) -> None:
    """Submit work; prints the 202 answer (with --wait: the terminal document)."""
    texts = [sys.stdin.read() if text == "-" else text for text in inputs]
    params = {
        k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature)) if v is not None
    }
    meta: dict[str, Any] | None = None
    if metadata is not None:
        try:
            meta = msgspec.json.decode(metadata, type=dict[str, Any])
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise click.BadParameter(f"not a JSON object: {exc}", param_hint="--metadata") from None

    async def call(client: AsyncClient) -> Any:
        accepted = await client.submit(
            task,  # type: ignore[arg-type]  # click.Choice checked it
            texts[0] if len(texts) == 1 else texts,
            model=model,
            params=params or None,
            priority=priority,  # type: ignore[arg-type]
            deadline_s=deadline_s,
            metadata=meta,
            callback_url=callback_url,
            idempotency_key=idempotency_key,
        )
        if not wait_:
            return accepted
        return await client.wait(accepted.request_id, timeout=wait_timeout)

    answer = _run(opts, call)
    if isinstance(answer, RequestDoc):
        _finished(answer, opts.pretty)
    else:
        _echo(answer, opts.pretty)


@main.command()
@click.argument("request_id")
@click.pass_obj
def get(opts: Options, request_id: str) -> None:
    """Print a request's document."""
    _echo(_run(opts, lambda c: c.get(request_id)), opts.pretty)


@main.command()
@click.argument("request_id")
@click.option(
    "--timeout", "wait_timeout", type=float, default=None, help="Give up after this many seconds."
)
@click.pass_obj
def wait(opts: Options, request_id: str, wait_timeout: float | None) -> None:
    """Wait for a request's terminal status and print its document."""
    _finished(_run(opts, lambda c: c.wait(request_id, timeout=wait_timeout)), opts.pretty)


@main.command()
@click.argument("request_id")
@click.option("--last-event-id", type=int, default=None, help="Resume after this event id.")
@click.option("--token", default=None, help="A stream token (see `token`) instead of the API key.")
@click.pass_obj
def events(opts: Options, request_id: str, last_event_id: int | None, token: str | None) -> None:
    """Print a request's events, one JSON line each, until its terminal status (resuming after drops)."""

    async def call(client: AsyncClient) -> Event | None:
        last: Event | None = None
        async for event in client.events(request_id, last_event_id=last_event_id, token=token):
            last = event
            click.echo(msgspec.json.encode(event).decode())
        return last

    last = _run(opts, call)
    if last is not None and last.data.status != "completed":
        sys.exit(EXIT_NOT_COMPLETED)


@main.command()
@click.argument("request_id")
@click.pass_obj
def token(opts: Options, request_id: str) -> None:
    """Mint a short-lived token that opens the request's event stream without the API key."""
    _echo(_run(opts, lambda c: c.stream_token(request_id)), opts.pretty)


@main.command()
@click.argument("request_id")
@click.pass_obj
def cancel(opts: Options, request_id: str) -> None:
    """Cancel a request (exit 1 with a conflict if it is already terminal)."""
    doc = _run(opts, lambda c: c.cancel(request_id))
    # Encoding leaves out defaults; this one is the answer's point.
    _echo({**msgspec.to_builtins(doc), "cancel_requested": doc.cancel_requested}, opts.pretty)


@main.command(name="list")
@click.option("--status", type=click.Choice(_STATUSES))
@click.option("--limit", type=click.IntRange(1, 100))
@click.option("--after", help="The previous page's next_after.")
@click.pass_obj
def list_(opts: Options, status: str | None, limit: int | None, after: str | None) -> None:
    """Print a page of your requests, newest first."""
    page = _run(opts, lambda c: c.list_requests(status=status, limit=limit, after=after))  # type: ignore[arg-type]
    _echo(page, opts.pretty)


@main.command()
@click.pass_obj
def quota(opts: Options) -> None:
    """Print your quota for the current UTC day."""
    _echo(_run(opts, lambda c: c.quota()), opts.pretty)


@main.command()
@click.pass_obj
def models(opts: Options) -> None:
    """Print the routes (task, model) that accept submissions now."""
    _echo(_run(opts, lambda c: c.models()), opts.pretty)
