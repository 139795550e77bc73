"""Every attack by name, in the order the suite runs them: round one, then round two."""

from __future__ import annotations

from . import artifacts, bodies, connections, grpc_attacks, streams, uploads
from .attack import Attack

ATTACKS: dict[str, Attack] = {
    a.name: a
    for a in (
        uploads.BIG_UPLOADS,
        uploads.ICC_BOMB,
        bodies.JSON_KEY_FLOOD,
        connections.SLOWLORIS,
        connections.CONN_CAP,
        streams.STREAM_FLOOD,
        artifacts.TAMPERED_ARTIFACT,
        # round two: two workers, client keys and gRPC on
        connections.HEADER_FLOOD,
        connections.PIPELINE_UNREAD,
        grpc_attacks.GRPC_BIG_NOKEY,
        grpc_attacks.GRPC_BIG_INVALID,
        grpc_attacks.GRPC_FLOOD,
        grpc_attacks.GRPC_STREAMS_UNREAD,
        bodies.V2_BODIES,
        uploads.BROKEN_UPLOAD_MIX,
    )
}
