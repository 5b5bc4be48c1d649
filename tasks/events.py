"""The `posttrain.dataset.updated` event: emitted when a data source's content changes.

The fingerprints seen last are kept in `<artifacts_root>/fingerprints/<pipeline>.json`. Data
preparation compares the current ones (posttrain.stages.source_fingerprint: file bytes, or a hub
id pinned by revision) with them; a difference emits ONE event for the pipeline naming the
changed sources, which triggers the retraining deployment (`posttrain serve`). The first run of a
pipeline has nothing to compare with and emits nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from posttrain.config import PipelineConfig
from posttrain.stages import data as data_stage

EVENT = "posttrain.dataset.updated"


def resource(pipeline_name: str) -> dict[str, str]:
    return {"prefect.resource.id": f"posttrain.dataset.{pipeline_name}",
            "prefect.resource.name": pipeline_name, "posttrain.pipeline": pipeline_name}


def emit_dataset_updated(pipeline_name: str, payload: dict | None = None):
    """Emit the event (to PREFECT_API_URL, or the flow's server); returns the Event or None."""
    from prefect.events import emit_event

    return emit_event(EVENT, resource=resource(pipeline_name), payload=payload or {})


class NotDelivered(RuntimeError):
    """The event did not reach the Prefect server (down, unreachable, or refusing the client)."""


def deliver_dataset_updated(pipeline_name: str, payload: dict | None = None,
                            *, timeout: float = 20.0):
    """Send the event to PREFECT_API_URL and wait until the server confirms it (a websocket
    ping answered after the event: everything sent before it arrived); the Event. Raises
    NotDelivered naming the server and the reason, unlike emit_event's background worker,
    which drops an event it cannot send with only a log line."""
    import anyio
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.settings import PREFECT_API_URL

    event = Event(event=EVENT, resource=resource(pipeline_name), payload=payload or {})

    async def send() -> None:
        with anyio.fail_after(timeout):
            async with get_events_client(reconnection_attempts=1, checkpoint_every=1) as client:
                await client.emit(event)  # checkpoint_every=1: returns after the ping's pong

    try:
        anyio.run(send)
    except Exception as e:
        reason = "no answer in time" if isinstance(e, TimeoutError) else f"{e}".strip()
        raise NotDelivered(f"the event was not delivered to {PREFECT_API_URL.value()}: "
                           f"{type(e).__name__}: {reason}") from e
    return event


def current_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    return {kind: data_stage.source_fingerprint(src)
            for kind, src in data_stage.sources(cfg).items()}


def note_fingerprints(cfg: PipelineConfig, *, emit: bool) -> list[str]:
    """Record the sources' fingerprints; return the kinds whose fingerprint changed since the
    last record (none on a first record), emitting the event for them when `emit`."""
    path = Path(cfg.artifacts_root) / "fingerprints" / f"{cfg.name}.json"
    now = current_fingerprints(cfg)
    before = json.loads(path.read_text()) if path.is_file() else None
    changed = [] if before is None else sorted(
        k for k in now if k in before and before[k] != now[k])
    if before != now:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(now, indent=2, sort_keys=True))
        tmp.replace(path)  # atomic: concurrent flows never read half a file
    if changed and emit:
        emit_dataset_updated(cfg.name, {"changed": changed, "fingerprints": now,
                                        "source": "data preparation"})
    return changed
