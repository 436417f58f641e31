"""The EC2 app on a real 127.0.0.1 socket for the API tests, with handlers the test registers itself.

Not a mock of a vmied part: the app, SigV4, the codec and the policy code are the real ones; only the
handlers behind them are the test's own (the real ones need the tasks service and a store).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import boto3
import botocore.session
from aiohttp.test_utils import TestServer
from botocore.config import Config as BotoConfig

from vmied.api.app import make_ec2_app
from vmied.api.operations import Handler
from vmied.config import Config, Credential, ServerConfig

ACCESS_KEY = "AKIDEXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
REGION = "us-east-1"
ACCOUNT = "123456789012"


def make_config(*credentials: Credential, region: str = REGION, max_clock_skew: float = 900.0) -> Config:
    if not credentials:
        credentials = (Credential(access_key_id=ACCESS_KEY, secret_access_key=SECRET_KEY),)
    server = dataclasses.replace(ServerConfig(), region=region, account_id=ACCOUNT, max_clock_skew=max_clock_skew)
    return Config(server=server, credentials=list(credentials))


class Clock:
    """An injectable clock that tests set (seconds since the epoch); None follows the real time."""

    def __init__(self) -> None:
        self.now: float | None = None

    def __call__(self) -> float:
        return time.time() if self.now is None else self.now


@asynccontextmanager
async def ec2_server(config: Config, operations: Mapping[str, Handler], clock: Callable[[], float] | None = None,
                     **options: Any) -> AsyncIterator[TestServer]:
    kwargs: dict[str, Any] = {"operations": operations, **options}
    if clock is not None:
        kwargs["clock"] = clock
    server = TestServer(make_ec2_app(config, service=None, **kwargs), host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


def endpoint_url(server: TestServer) -> str:
    return f"http://127.0.0.1:{server.port}"


#: One botocore session for every client, so the EC2 model is loaded once per test run.
_BOTOCORE = botocore.session.get_session()


def boto3_client(server: TestServer, *, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY,
                 session_token: str | None = None, region: str = REGION, path: str = "", **config: Any) -> Any:
    """A real boto3 EC2 client for the server: one attempt (no retries hide a wrong status)."""
    return boto3.session.Session(botocore_session=_BOTOCORE).client(
        "ec2", endpoint_url=endpoint_url(server) + path, region_name=region, aws_access_key_id=access_key,
        aws_secret_access_key=secret_key, aws_session_token=session_token,
        config=BotoConfig(retries={"max_attempts": 1, "mode": "standard"}, **config))


async def call(client: Any, method: str, **params: Any) -> Any:
    """A blocking boto3 call made off the event loop that serves the app."""
    return await asyncio.to_thread(getattr(client, method), **params)


def echo_handler(result: Mapping[str, Any] | None = None) -> Handler:
    """A handler that records the decoded parameters and answers ``result``."""

    async def handler(ctx: Any, params: dict[str, Any]) -> dict[str, Any]:
        handler.calls.append((ctx, params))  # type: ignore[attr-defined]
        return dict(result or {})

    handler.calls = []  # type: ignore[attr-defined]
    return handler
