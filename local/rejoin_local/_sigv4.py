"""Checking an AWS Signature V4 request, for the local ``@connections`` API.

API Gateway's management API accepts only requests signed by an IAM
principal allowed ``execute-api:ManageConnections``. The local gateway does
the same with one local credential: a request is accepted when it is signed
(as boto3 signs it) with the local admin key as the secret access key, under
any access key id. The canonical request is rebuilt with botocore's own
signer, so what boto3 signs is what is checked here.
"""

from __future__ import annotations

import hmac
import re
from datetime import UTC, datetime
from typing import Any

__all__ = ["MAX_SKEW_SECONDS", "SignatureProblem", "verify"]

MAX_SKEW_SECONDS = 15 * 60
"""How far a request's X-Amz-Date may be from now (AWS allows 15 minutes)."""

_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<akid>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/,\s]+)/"
    r"(?P<service>[^/,\s]+)/aws4_request,\s*SignedHeaders=(?P<signed>[a-z0-9;_.-]+),\s*"
    r"Signature=(?P<signature>[0-9a-f]{64})$"
)


class SignatureProblem(Exception):
    """The request is not signed with the expected key; the message says why."""


def verify(
    *,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    secret_key: str,
    now: float,
) -> None:
    """Check a SigV4 ``Authorization`` header against ``secret_key``.

    Args:
        method: the HTTP method.
        url: the URL as sent, path still percent-encoded (``scheme://host/path?query``).
        headers: the request headers, names in lower case.
        body: the request body.
        secret_key: the secret access key the signature must be made with.
        now: seconds since the epoch (the clock).

    Raises:
        SignatureProblem: no valid signature made with ``secret_key``.
    """
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    match = _AUTH.match(headers.get("authorization", "").strip())
    if match is None:
        raise SignatureProblem("missing or malformed AWS4-HMAC-SHA256 authorization")
    stamp = headers.get("x-amz-date", "")
    try:
        signed_at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise SignatureProblem("missing or malformed X-Amz-Date") from None
    if abs(now - signed_at) > MAX_SKEW_SECONDS or stamp[:8] != match["date"]:
        raise SignatureProblem("the signature's date is not now")
    signed = match["signed"].split(";")
    if "host" not in signed:
        raise SignatureProblem("the host header is not signed")
    missing = [name for name in signed if name not in headers]
    if missing:
        raise SignatureProblem(f"signed header(s) not sent: {', '.join(missing)}")
    request: Any = AWSRequest(
        method=method, url=url, data=body, headers={name: headers[name] for name in signed}
    )
    request.context["timestamp"] = stamp
    signer = SigV4Auth(
        Credentials(match["akid"], secret_key, headers.get("x-amz-security-token")),
        match["service"],
        match["region"],
    )
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, match["signature"]):
        raise SignatureProblem("the signature does not match")
