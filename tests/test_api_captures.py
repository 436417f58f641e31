"""The requests the AWS CLI really sent (docs/ec2-captures), replayed byte for byte against the app.

Each captured request goes over a raw socket exactly as captured (request line, headers in order,
body), signed by the CLI with the capture secret at its own X-Amz-Date, which the injected clock
returns. Handlers registered here answer the canned responses of the capture; the app's answer,
read back by botocore's parser, must be what the CLI printed from the canned XML — and the DryRun
call must get the app's own 412 without reaching a handler.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict, deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from botocore.parsers import create_parser
from botocore.serialize import create_serializer

from tests.ec2_endpoint import Clock, ec2_server, make_config
from vmied.api import wire
from vmied.api.operations import ApiError, Handler, RequestContext

CAPTURES = Path(__file__).parent / "data" / "ec2-captures"
EXAMPLES = {"ex1.jsonl": "resp", "ex2.jsonl": "resp2", "ex3.jsonl": "resp3"}


def canned_responses(directory: Path) -> dict[str, deque[tuple[int, bytes]]]:
    """Per action, the canned (status, XML) answers in call order (``A.xml`` or ``A.1.xml``, ``A.2.xml``…)."""
    answers: dict[str, list[tuple[int, int, bytes]]] = defaultdict(list)
    for path in directory.glob("*.xml"):
        action, _, rest = path.name.partition(".")
        number = int(rest.split(".")[0]) if rest.count(".") == 1 else 1
        data = path.read_bytes()
        status = 200
        if data.startswith(b"STATUS "):
            first, _, data = data.partition(b"\n")
            status = int(first.split()[1])
        answers[action].append((number, status, data))
    return {action: deque((status, data) for _, status, data in sorted(found)) for action, found in answers.items()}


def parse(action: str, status: int, xml: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = create_parser("ec2").parse(
        {"body": xml, "headers": {}, "status_code": status}, wire.operation_model(action).output_shape)
    parsed.pop("ResponseMetadata", None)
    return parsed


def replaying_handlers(canned: dict[str, deque[tuple[int, bytes]]], seen: list[tuple[str, dict[str, Any]]]
                       ) -> dict[str, Handler]:
    """Handlers that answer the next canned response of their action (as a result dict or an ApiError)."""

    def handler_for(action: str) -> Handler:
        async def handler(ctx: RequestContext, params: dict[str, Any]) -> dict[str, Any]:
            seen.append((action, params))
            status, xml = canned[action].popleft()
            parsed = parse(action, status, xml)
            if status != 200:
                raise ApiError(parsed["Error"]["Code"], parsed["Error"]["Message"], status)
            return parsed

        return handler

    return {action: handler_for(action) for action in canned}


async def send_raw(port: int, capture: dict[str, Any]) -> tuple[int, bytes]:
    """Send the captured request byte for byte; the (status, body) of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"{capture['method']} {capture['path']} HTTP/1.1\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in capture["headers"].items()) + "\r\n"
    writer.write(head.encode("latin-1") + capture["body"].encode("utf-8"))
    await writer.drain()
    status_line = await reader.readline()
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers["content-length"]))
    writer.close()
    await writer.wait_closed()
    assert headers["content-type"] == wire.CONTENT_TYPE
    return int(status_line.split()[1]), body


@pytest.mark.parametrize("example", sorted(EXAMPLES))
async def test_captured_cli_session_replays(example: str) -> None:
    captures = [json.loads(line) for line in (CAPTURES / example).read_text().splitlines()]
    canned = canned_responses(CAPTURES / EXAMPLES[example])
    expected = {action: deque(answers) for action, answers in canned.items()}
    seen: list[tuple[str, dict[str, Any]]] = []
    clock = Clock()
    async with ec2_server(make_config(), replaying_handlers(canned, seen), clock) as server:
        for capture in captures:
            action = dict(capture["params"])["Action"]
            clock.now = datetime.strptime(capture["headers"]["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
                tzinfo=UTC).timestamp()
            status, body = await send_raw(server.port, capture)
            want_status, want_xml = expected[action].popleft()
            assert status == want_status, body
            assert parse(action, status, body) == parse(action, want_status, want_xml)
    # Every request but the DryRun one reached its handler, which got exactly what the CLI meant:
    # serializing the decoded parameters with botocore gives back the captured body's bytes (the CLI
    # appends the ClientToken it generates last, so compare the encoded key=value segments as a set).
    assert len(seen) == len(captures) - sum("DryRun=true" in c["body"] for c in captures)
    bodies = [c["body"] for c in captures if "DryRun=true" not in c["body"]]
    for (action, params), body in zip(seen, bodies, strict=True):
        request = create_serializer("ec2").serialize_to_request(params, wire.operation_model(action))
        assert sorted(urlencode(request["body"]).split("&")) == sorted(body.split("&"))
    # Only the DryRun answer is left over: the app gave it itself.
    assert [status for answers in canned.values() for status, _ in answers] == (
        [412] if "DryRun=true" in "".join(c["body"] for c in captures) else [])


async def test_a_capture_replayed_a_day_later_has_expired() -> None:
    capture = json.loads((CAPTURES / "ex1.jsonl").read_text().splitlines()[0])
    clock = Clock()
    clock.now = datetime.strptime(capture["headers"]["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=UTC).timestamp() + 86400
    async with ec2_server(make_config(), {}, clock) as server:
        status, body = await send_raw(server.port, capture)
    assert status == 400
    assert parse("ImportImage", status, body)["Error"]["Code"] == "RequestExpired"


async def test_a_capture_with_one_byte_changed_is_refused() -> None:
    capture = json.loads((CAPTURES / "ex1.jsonl").read_text().splitlines()[0])
    capture["body"] = capture["body"].replace("x86_64", "x86_65")
    clock = Clock()
    clock.now = datetime.strptime(capture["headers"]["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=UTC).timestamp()
    async with ec2_server(make_config(), {}, clock) as server:
        status, body = await send_raw(server.port, capture)
    assert status == 403
    assert parse("ImportImage", status, body)["Error"]["Code"] == "SignatureDoesNotMatch"
