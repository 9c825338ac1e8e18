"""What only the command line needs on top of pipelines/submission.py: a job's log, streamed as it is written."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from pipelines.submission import SubmitError


def follow_logs(ray_client, job_id: str) -> Iterator[str]:
    """Log chunks as the driver writes them, until the job ends."""
    agen = ray_client.tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(agen.__anext__())
            except StopAsyncIteration:
                return
    except Exception as exc:
        raise SubmitError(f"{job_id}: lost the log stream: {exc}") from None
    finally:
        loop.run_until_complete(agen.aclose())
        loop.close()
