"""AWS Signature Version 4 verification for the EC2 endpoint (Authorization header or pre-signed URL).

The expected signature is computed by botocore's own signer (``botocore.auth.SigV4Auth``) over the
request as received, with exactly the headers the client declares in SignedHeaders, and compared in
constant time. What is checked, in order, and the EC2 error code for each failure (docs/ec2-api.md
§1.3, §3.8):

- no Authorization header and no ``X-Amz-Algorithm`` query parameter: MissingAuthenticationToken;
- a malformed header / missing pre-signed parameters, a date that is not ISO 8601 basic format,
  ``host`` not signed, a declared header absent: IncompleteSignature;
- an access key that is not configured: AuthFailure;
- a credential scope with another date, region or service than ours: SignatureDoesNotMatch;
- X-Amz-Date further than ``max_clock_skew`` from our clock, or a pre-signed URL past its
  X-Amz-Expires: RequestExpired;
- a session token missing, unexpected or different from the configured one: InvalidClientTokenId;
- a signature that does not match: SignatureDoesNotMatch.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest, HTTPHeaders
from botocore.credentials import Credentials

from ..config import Credential
from .operations import ApiError

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "ec2"
TERMINATOR = "aws4_request"
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600
#: Query parameters of a pre-signed request (not operation parameters).
PRESIGN_PARAMETERS = frozenset({
    "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders",
    "X-Amz-Signature", "X-Amz-Security-Token",
})

Clock = Callable[[], float]


@dataclass(frozen=True)
class SignedRequest:
    """The parts of an HTTP request SigV4 covers, as received."""

    method: str
    raw_path: str  # percent-encoded as on the wire, without the query string
    query: Sequence[tuple[str, str]]  # decoded pairs in order
    headers: Sequence[tuple[str, str]]  # every header line, in order, duplicates kept
    body: bytes

    def header_values(self, name: str) -> list[str]:
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]

    def query_value(self, name: str) -> str | None:
        return next((value for key, value in self.query if key == name), None)


@dataclass(frozen=True)
class _Signature:
    """What the client claims: from the Authorization header or the X-Amz-* query parameters."""

    access_key_id: str
    scope_date: str
    scope_region: str
    scope_service: str
    scope_terminator: str
    signed_headers: list[str]
    signature: str
    amz_date: str
    session_token: str | None
    expires: int | None  # pre-signed only


class _DeclaredHeadersSigV4(SigV4Auth):  # type: ignore[misc]  # botocore is untyped
    """botocore's signer, restricted to the headers the client declared it signed."""

    def __init__(self, credentials: Any, region: str, declared: HTTPHeaders) -> None:
        super().__init__(credentials, SERVICE, region)
        self._declared = declared

    def headers_to_sign(self, request: Any) -> HTTPHeaders:
        return self._declared


class SigV4Verifier:
    """Checks requests against the configured credentials; ``verify`` returns the caller's Credential."""

    def __init__(self, credentials: Sequence[Credential], region: str, max_clock_skew: float,
                 clock: Clock = time.time) -> None:
        self._credentials = {credential.access_key_id: credential for credential in credentials}
        self._region = region
        self._max_clock_skew = max_clock_skew
        self._clock = clock

    def verify(self, request: SignedRequest) -> Credential:
        claimed = self._claimed_signature(request)
        credential = self._credentials.get(claimed.access_key_id)
        if credential is None:
            raise ApiError("AuthFailure", "AWS was not able to validate the provided access credentials")
        self._check_scope(claimed)
        self._check_time(claimed)
        self._check_session_token(claimed, credential)
        expected = self._expected_signature(request, claimed, credential)
        if not hmac.compare_digest(expected.encode(), claimed.signature.encode()):
            raise ApiError("SignatureDoesNotMatch",
                           "The request signature we calculated does not match the signature you provided. "
                           "Check your AWS Secret Access Key and signing method. "
                           "Consult the service documentation for details.")
        return credential

    # --- what the client claims ------------------------------------------------------------------------

    def _claimed_signature(self, request: SignedRequest) -> _Signature:
        authorization = request.header_values("Authorization")
        presigned = request.query_value("X-Amz-Algorithm") is not None
        if authorization and presigned:
            raise ApiError("IncompleteSignature", "Only one authentication mechanism is allowed: either the "
                                                  "Authorization header or the X-Amz-Algorithm query parameter")
        if presigned:
            return _from_query(request)
        if not authorization:
            raise ApiError("MissingAuthenticationToken", "Request is missing Authentication Token")
        if len(authorization) > 1:
            raise ApiError("IncompleteSignature", "The request carries more than one Authorization header")
        return _from_header(request, authorization[0])

    # --- the checks --------------------------------------------------------------------------------------

    def _check_scope(self, claimed: _Signature) -> None:
        if claimed.scope_date != claimed.amz_date[:8]:
            raise ApiError("SignatureDoesNotMatch",
                           f"Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
                           f"from HTTP: '{claimed.scope_date}' != '{claimed.amz_date[:8]}'")
        if claimed.scope_region != self._region:
            raise ApiError("SignatureDoesNotMatch",
                           f"Credential should be scoped to a valid region, not '{claimed.scope_region}'. "
                           f"This endpoint serves '{self._region}'.")
        if claimed.scope_service != SERVICE:
            raise ApiError("SignatureDoesNotMatch",
                           f"Credential should be scoped to correct service: '{SERVICE}'.")
        if claimed.scope_terminator != TERMINATOR:
            raise ApiError("SignatureDoesNotMatch",
                           f"Credential should be scoped with a valid terminator: '{TERMINATOR}', "
                           f"not '{claimed.scope_terminator}'.")

    def _check_time(self, claimed: _Signature) -> None:
        signed_at = datetime.strptime(claimed.amz_date, AMZ_DATE_FORMAT).replace(tzinfo=UTC).timestamp()
        now = self._clock()
        if claimed.expires is not None:
            if now > signed_at + claimed.expires:
                raise ApiError("RequestExpired", f"Request has expired: signed at {claimed.amz_date}, "
                                                 f"valid for {claimed.expires} seconds, now {_amz_date(now)}")
            if signed_at - now > self._max_clock_skew:
                raise ApiError("RequestExpired", f"Request is not yet valid: signed at {claimed.amz_date}, "
                                                 f"now {_amz_date(now)}")
            return
        if abs(now - signed_at) > self._max_clock_skew:
            raise ApiError("RequestExpired",
                           f"Request has expired: its X-Amz-Date {claimed.amz_date} is more than "
                           f"{self._max_clock_skew:g} seconds from the server time {_amz_date(now)}")

    @staticmethod
    def _check_session_token(claimed: _Signature, credential: Credential) -> None:
        expected = credential.session_token
        given = claimed.session_token or ""
        if not hmac.compare_digest(expected.encode(), given.encode()):
            raise ApiError("InvalidClientTokenId", "The security token included in the request is invalid.")

    def _expected_signature(self, request: SignedRequest, claimed: _Signature, credential: Credential) -> str:
        declared = HTTPHeaders()
        for name in claimed.signed_headers:
            values = request.header_values(name)
            if not values:
                raise ApiError("IncompleteSignature", f"The signed header '{name}' is not in the request")
            for value in values:
                declared[name] = value
        query = [(key, value) for key, value in request.query
                 if not (claimed.expires is not None and key == "X-Amz-Signature")]
        aws_request = AWSRequest(method=request.method, url=f"http://vmied{request.raw_path}",
                                 data=request.body, params=query)
        aws_request.context["timestamp"] = claimed.amz_date
        signer = _DeclaredHeadersSigV4(
            Credentials(credential.access_key_id, credential.secret_access_key, credential.session_token or None),
            self._region, declared)
        canonical_request = signer.canonical_request(aws_request)
        string_to_sign = signer.string_to_sign(aws_request, canonical_request)
        signature: str = signer.signature(string_to_sign, aws_request)
        return signature


def _amz_date(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime(AMZ_DATE_FORMAT)


def _from_header(request: SignedRequest, authorization: str) -> _Signature:
    algorithm, _, rest = authorization.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise ApiError("IncompleteSignature",
                       f"Unsupported authorization type '{algorithm}': only {ALGORITHM} is accepted")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, equals, value = part.strip().partition("=")
        if equals:
            fields[name] = value
    problems = [f"Authorization header requires '{name}' parameter."
                for name in ("Credential", "SignedHeaders", "Signature") if not fields.get(name)]
    amz_dates = request.header_values("X-Amz-Date")
    if not amz_dates:
        problems.append("Authorization header requires existence of a 'X-Amz-Date' header.")
    if problems:
        raise ApiError("IncompleteSignature", " ".join(problems) + f" Authorization={authorization[:300]}")
    tokens = request.header_values("X-Amz-Security-Token")
    signed_headers = fields["SignedHeaders"].split(";")
    if tokens and "x-amz-security-token" not in signed_headers:
        raise ApiError("IncompleteSignature", "The X-Amz-Security-Token header must be signed")
    return _claim(fields["Credential"], signed_headers, fields["Signature"], amz_dates[0],
                  tokens[0] if tokens else None, None)


def _from_query(request: SignedRequest) -> _Signature:
    algorithm = request.query_value("X-Amz-Algorithm")
    if algorithm != ALGORITHM:
        raise ApiError("IncompleteSignature",
                       f"Unsupported X-Amz-Algorithm '{algorithm}': only {ALGORITHM} is accepted")
    required = ("X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders", "X-Amz-Signature")
    missing = [name for name in required if not request.query_value(name)]
    if missing:
        raise ApiError("IncompleteSignature",
                       "AWS query-string parameters must include " + ", ".join(f"'{m}'" for m in missing))
    expires_text = request.query_value("X-Amz-Expires") or ""
    if not expires_text.isdigit() or not 1 <= int(expires_text) <= MAX_PRESIGN_EXPIRES:
        raise ApiError("IncompleteSignature",
                       f"X-Amz-Expires must be a number of seconds from 1 to {MAX_PRESIGN_EXPIRES}, "
                       f"not '{expires_text}'")
    return _claim(request.query_value("X-Amz-Credential") or "",
                  (request.query_value("X-Amz-SignedHeaders") or "").split(";"),
                  request.query_value("X-Amz-Signature") or "", request.query_value("X-Amz-Date") or "",
                  request.query_value("X-Amz-Security-Token"), int(expires_text))


def _claim(credential: str, signed_headers: list[str], signature: str, amz_date: str,
           session_token: str | None, expires: int | None) -> _Signature:
    parts = credential.split("/")
    if len(parts) != 5 or not all(parts):
        raise ApiError("IncompleteSignature",
                       "Credential must have exactly 5 slash-delimited elements, "
                       f"e.g. keyid/date/region/service/term, got '{credential[:200]}'")
    try:
        datetime.strptime(amz_date, AMZ_DATE_FORMAT)
    except ValueError:
        raise ApiError("IncompleteSignature",
                       f"X-Amz-Date must be in the ISO-8601 basic format YYYYMMDD'T'HHMMSS'Z', "
                       f"got '{amz_date[:40]}'") from None
    names = [name.strip().lower() for name in signed_headers]
    if "host" not in names:
        raise ApiError("IncompleteSignature", "'Host' must be a 'SignedHeader' in the AWS Authorization.")
    return _Signature(access_key_id=parts[0], scope_date=parts[1], scope_region=parts[2],
                      scope_service=parts[3], scope_terminator=parts[4], signed_headers=names,
                      signature=signature.strip(), amz_date=amz_date, session_token=session_token,
                      expires=expires)
