"""The EC2 endpoint: one aiohttp handler for POST and GET (on ``/``, or whatever path the client's
endpoint URL has).

Each request goes through, in order: the body size cap, SigV4 (header or pre-signed query),
``Action`` and ``Version``, decoding against botocore's model, the access key's policy for the
action on every resource the request names, the DryRun short-circuit (412 DryRunOperation), the
registered handler, and encoding. Every answer carries a fresh request id (UUID) in the XML and the
``x-amzn-RequestId`` header; every request writes one log line (logger ``vmied.api``, fields in
``extra``) and the API metrics.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .. import metrics
from ..config import Config, Credential
from ..errors import UsageError, VmiedError
from . import load_handlers, policy, wire
from .auth import PRESIGN_PARAMETERS, Clock, SignedRequest, SigV4Verifier
from .operations import OPERATION_NAMES, OPERATIONS, ApiError, Handler, RequestContext, missing_parameter

#: Largest request body accepted. The biggest legitimate request (ImportImage with 21 disks and tags)
#: is a few KiB, so this leaves a wide margin while bounding what one request can make us parse.
MAX_BODY_BYTES = 1 << 20
DRY_RUN_MESSAGE = "Request would have succeeded, but DryRun flag is set."
INTERNAL_ERROR_MESSAGE = "An internal error has occurred"

StatusPage = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger("vmied.api")


@dataclass
class _Outcome:
    """What the log line and the metrics say about one request."""

    action: str = "unknown"
    code: str = "OK"
    access_key_id: str = ""
    failure: Exception | None = None


def make_ec2_app(config: Config, service: Any, *, clock: Clock = time.time,
                 operations: Mapping[str, Handler] | None = None,
                 status_page: StatusPage | None = None) -> web.Application:
    """The EC2 query endpoint (POST and GET).

    ``operations`` defaults to the registry the handler modules fill (imported here); ``clock``
    (seconds since the epoch) is what SigV4 dates are checked against; ``status_page`` answers a
    plain ``GET /`` (no query string, no Authorization header) so the status page can share the path.
    Any path is accepted (the CLI signs the path of its ``--endpoint-url``, e.g. ``/vmie``); routes the
    daemon serves itself (``/metrics``...) are its middleware's business, before this handler.
    Raises UsageError if an access key's policy cannot be evaluated.
    """
    check_policies(config)
    if operations is None:
        load_handlers()
        operations = OPERATIONS
    for action in OPERATION_NAMES:
        wire.operation_model(action)  # load botocore's model now, not during the first request
    endpoint = _Endpoint(config, service, clock, operations, status_page)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[EC2_ENDPOINT] = endpoint
    for method in ("POST", "GET"):
        app.router.add_route(method, "/{path:.*}", endpoint.handle)
    return app


def reconfigure_ec2_app(app: web.Application, config: Config) -> None:
    """Use ``config``'s credentials, policies, region and clock skew from the next request on (SIGHUP).

    Raises UsageError, changing nothing, if a policy cannot be evaluated.
    """
    check_policies(config)
    app[EC2_ENDPOINT].configure(config)


def check_policies(config: Config) -> None:
    """Raise UsageError naming the access key whose policy vmied cannot evaluate."""
    for index, credential in enumerate(config.credentials):
        try:
            policy.validate_policy(credential.policy)
        except policy.PolicyError as exc:
            raise UsageError(f"credentials[{index}] ({credential.access_key_id}): policy: {exc}") from None


class _Endpoint:
    def __init__(self, config: Config, service: Any, clock: Clock, operations: Mapping[str, Handler],
                 status_page: StatusPage | None) -> None:
        self._service = service
        self._operations = operations
        self._status_page = status_page
        self._clock = clock
        self._in_flight = 0
        self.configure(config)

    def configure(self, config: Config) -> None:
        self._config = config
        self._verifier = SigV4Verifier(config.credentials, config.server.region,
                                       config.server.max_clock_skew, self._clock)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if (self._status_page is not None and request.method == "GET" and request.path == "/"
                and not request.query_string and "Authorization" not in request.headers):
            return await self._status_page(request)
        request_id = str(uuid.uuid4())
        started = time.monotonic()
        outcome = _Outcome()
        try:
            if self._in_flight >= self._config.server.max_requests:
                raise ApiError("RequestLimitExceeded", "Request limit exceeded.")
            self._in_flight += 1
            try:
                body = await self._answer(request, request_id, outcome)
            finally:
                self._in_flight -= 1
            status = 200
        except ApiError as error:
            outcome.code, status = error.code, error.status
            body = wire.encode_error(error.code, error.message, request_id)
        except Exception as failure:
            # A bug, not a refusal: its traceback goes into the request's log line, never to the client.
            outcome.failure = failure
            outcome.code, status = "InternalError", 500
            body = wire.encode_error("InternalError", INTERNAL_ERROR_MESSAGE, request_id)
        elapsed = time.monotonic() - started
        self._record(request, request_id, outcome, status, elapsed)
        return web.Response(body=body, status=status, headers={
            "Content-Type": wire.CONTENT_TYPE, "x-amzn-RequestId": request_id})

    async def _answer(self, request: web.Request, request_id: str, outcome: _Outcome) -> bytes:
        body = await _read_body(request)
        query = wire.parse_form(request.query_string)
        signed = SignedRequest(method=request.method, raw_path=request.raw_path.split("?", 1)[0], query=query,
                               headers=list(request.headers.items()), body=body)
        credential = self._verifier.verify(signed)
        outcome.access_key_id = credential.access_key_id
        presigned = any(key == "X-Amz-Algorithm" for key, _ in query)
        pairs = [(k, v) for k, v in query if not (presigned and k in PRESIGN_PARAMETERS)]
        if request.method == "POST" and body:
            pairs += wire.parse_form(body)
        action, pairs = _action_and_version(pairs)
        outcome.action = action
        params = wire.decode_request(action, pairs)
        ctx = RequestContext(request_id=request_id, action=action, access_key_id=credential.access_key_id,
                             account_id=credential.account_id or self._config.server.account_id,
                             region=self._config.server.region, service=self._service,
                             policy=credential.policy)
        _authorize(ctx, params, credential)
        if params.get("DryRun") is True:
            raise ApiError("DryRunOperation", DRY_RUN_MESSAGE)
        handler = self._operations.get(action)
        if handler is None:
            raise ApiError("UnsupportedOperation", f"The action {action} is not available on this endpoint yet.")
        try:
            result = await handler(ctx, params)
        except VmiedError as error:
            # A deliberate refusal from a lower layer (bad image, unusable location...): the client's
            # problem, said plainly, not a server fault to be retried.
            raise ApiError("InvalidParameter", error.message) from error
        return wire.encode_response(action, result, request_id)

    def _record(self, request: web.Request, request_id: str, outcome: _Outcome, status: int,
                elapsed: float) -> None:
        action_label = metrics.bounded(outcome.action, OPERATION_NAMES)
        metrics.API_REQUESTS.labels(action=action_label, code=outcome.code).inc()
        metrics.API_LATENCY.labels(action=action_label).observe(elapsed)
        level = logging.ERROR if outcome.failure is not None else logging.INFO
        log.log(level, "%s %s %d %.1fms", outcome.action, outcome.code, status, elapsed * 1000,
                exc_info=outcome.failure, extra={
            "request_id": request_id, "action": outcome.action, "code": outcome.code, "status": status,
            "access_key_id": outcome.access_key_id, "duration_ms": round(elapsed * 1000, 3),
            "remote": request.remote or "", "method": request.method,
        })


#: The app's endpoint object (what ``reconfigure_ec2_app`` updates).
EC2_ENDPOINT = web.AppKey("vmied.ec2_endpoint", _Endpoint)


async def _read_body(request: web.Request) -> bytes:
    too_large = ApiError("RequestEntityTooLarge", f"The request body is larger than {MAX_BODY_BYTES} bytes")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None


def _action_and_version(pairs: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]]]:
    """The Action (checked), the Version (checked) and the operation's own parameters."""
    actions = [value for key, value in pairs if key == "Action"]
    versions = [value for key, value in pairs if key == "Version"]
    if not actions or not actions[0]:
        raise ApiError("MissingAction", "The request must contain the parameter Action")
    if len(actions) > 1 or len(versions) > 1:
        raise ApiError("InvalidParameterValue", "Action and Version must be given once")
    action = actions[0]
    if action not in OPERATION_NAMES:
        raise ApiError("InvalidAction", f"The action {action[:100]} is not valid for this web service.")
    if not versions:
        raise missing_parameter("Version")
    if versions[0] != wire.API_VERSION:
        raise ApiError("NoSuchVersion",
                       f"The requested version ({versions[0][:40]}) of service AmazonEC2 does not exist; "
                       f"this endpoint speaks {wire.API_VERSION}")
    return action, [(key, value) for key, value in pairs if key not in ("Action", "Version")]


def _authorize(ctx: RequestContext, params: Mapping[str, Any], credential: Credential) -> None:
    """The policy check for the action on every resource the request names (before DryRun, as EC2 does)."""
    if credential.policy is None:
        return
    for resource in policy.request_resources(ctx.action, params, ctx.region, ctx.account_id):
        ctx.authorize(resource)
