"""Redis access of the naive baseline that ``mirstream bench ingest`` measures the pipeline against.

The baseline keeps what a straightforward design would: every user's full history of raw float32 item
vectors, read whole and written back on every event.  Nothing in the pipeline uses these keys.
"""

from __future__ import annotations

import redis

from state.keys import Keys


class BaselineStore:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.r = client
        self.keys = Keys(prefix)

    def history(self, user: str) -> bytes:
        return self.r.get(self.keys.baseline_history(user)) or b""

    def save(self, user: str, history: bytes, interests: bytes) -> None:
        pipe = self.r.pipeline(transaction=True)
        pipe.set(self.keys.baseline_history(user), history)
        pipe.set(self.keys.baseline_interests(user), interests)
        pipe.execute()

    def memory_usage(self, user: str) -> int:
        return int(self.r.memory_usage(self.keys.baseline_history(user), samples=0) or 0)
