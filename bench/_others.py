"""The senders the broadcast benchmark compares rejoin's against (benchmark-only code).

- :class:`Boto3Sender` is ``ApiGatewaySender`` as it was before issue 10: a
  boto3 ``apigatewaymanagementapi`` client (one attempt, 64 pooled
  connections) called from a pool of 64 threads. Kept here so every run
  measures the old path next to the new one.
- :class:`HttpxSender` signs exactly as rejoin does (``rejoin._sigv4``) but
  sends with ``httpx.AsyncClient`` (100 keep-alive connections): the client
  the Lambda layer already has, and the reason rejoin does not use it here.

Both raise :class:`~rejoin.errors.SendError` for any failure (no mapping:
the benchmark only posts to open connections).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote, urlsplit

from rejoin.errors import SendError

__all__ = ["Boto3Sender", "HttpxSender"]

BOTO3_THREADS = 64


class Boto3Sender:
    """The pre-issue-10 AWS path: boto3's client on a thread pool."""

    def __init__(self, endpoint_url: str, region: str) -> None:
        import boto3
        from botocore.config import Config

        config = Config(
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=2,
            read_timeout=5,
            max_pool_connections=BOTO3_THREADS,
        )
        self._client: Any = boto3.client(
            "apigatewaymanagementapi", endpoint_url=endpoint_url, region_name=region, config=config
        )
        self._executor = ThreadPoolExecutor(BOTO3_THREADS, thread_name_prefix="bench-boto3")

    def _post(self, connection_id: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.post_to_connection(ConnectionId=connection_id, Data=data)
        except (BotoCoreError, ClientError) as exc:
            raise SendError(f"PostToConnection for {connection_id} failed: {exc}") from exc

    async def post(self, connection_id: str, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._post, connection_id, data)

    async def exists(self, connection_id: str) -> bool:  # pragma: no cover - not benchmarked
        raise NotImplementedError

    async def close(self, connection_id: str) -> None:  # pragma: no cover - not benchmarked
        raise NotImplementedError

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


class HttpxSender:
    """rejoin's SigV4 signing, sent with ``httpx.AsyncClient``."""

    def __init__(self, endpoint_url: str, region: str, max_connections: int = 100) -> None:
        import httpx

        from rejoin._sigv4 import CredentialSource, Signer

        parts = urlsplit(endpoint_url)
        self._url = endpoint_url.rstrip("/")
        self._host = parts.netloc
        self._base_path = parts.path.rstrip("/")
        self._signer = Signer(region, "execute-api")
        self._credentials = CredentialSource()
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._client = httpx.AsyncClient(limits=limits, timeout=5.0)

    async def post(self, connection_id: str, data: bytes) -> None:
        import httpx

        path = f"{self._base_path}/@connections/{quote(connection_id, safe='')}"
        credentials = await self._credentials.get()
        digest = hashlib.sha256(data).hexdigest()
        headers = self._signer.sign("POST", self._host, path, digest, credentials, time.time())
        url = f"{self._url.removesuffix(self._base_path)}{path}"
        try:
            response = await self._client.post(url, content=data, headers=headers)
        except httpx.HTTPError as exc:
            raise SendError(f"PostToConnection for {connection_id} failed: {exc}") from exc
        if response.status_code != 200:
            raise SendError(f"PostToConnection for {connection_id}: HTTP {response.status_code}")

    async def exists(self, connection_id: str) -> bool:  # pragma: no cover - not benchmarked
        raise NotImplementedError

    async def close(self, connection_id: str) -> None:  # pragma: no cover - not benchmarked
        raise NotImplementedError

    async def aclose(self) -> None:
        await self._client.aclose()
