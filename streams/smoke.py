"""The smallest real path through the stack: a Kafka topic → a Faust agent → Redis.

``mirstream smoke`` and the foundation integration test run it to prove a broker and a Redis
server are wired correctly before anything heavier is started.
"""

from __future__ import annotations

import orjson
import redis.asyncio as aioredis

from state.keys import Keys
from streams.faust_app import make_faust_app
from streams.security import redis_async
from streams.settings import Settings

settings = Settings.from_env()
app = make_faust_app(settings, app_id=f"{settings.app_id}-smoke")
topic = app.topic(f"{settings.prefix}.smoke", partitions=settings.partitions)
keys = Keys(settings.prefix)
_redis: aioredis.Redis | None = None


@app.agent(topic)
async def copy_to_redis(stream):
    """Writes every message's value under its key, with the partition/offset it came from."""
    global _redis
    if _redis is None:
        _redis = redis_async(settings)
    async for event in stream.events():
        key = event.key.decode()
        record = {
            "value": orjson.loads(event.value),
            "partition": event.message.partition,
            "offset": event.message.offset,
        }
        await _redis.set(keys.smoke(key), orjson.dumps(record))
