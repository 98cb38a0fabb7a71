"""rejoin: real-time multi-user conversations with an Agents SDK agent.

The public surface is small; everything else lives in private modules or in
feature modules imported on demand (the Agents SDK is imported only by the
parts that run the agent).
"""

from __future__ import annotations

from ._lua import RedisClient
from .client import UpstashClient, store_client, upstash_client, upstash_client_from_env
from .errors import RejoinError
from .keys import SessionKeys, validate_session_id
from .redis_tcp import RedisSession, redis_client
from .session import UpstashSession

__all__ = [
    "RedisClient",
    "RedisSession",
    "RejoinError",
    "SessionKeys",
    "UpstashClient",
    "UpstashSession",
    "redis_client",
    "store_client",
    "upstash_client",
    "upstash_client_from_env",
    "validate_session_id",
]
