"""Redis side: the key schema, every Lua script, and the read API for downstream services."""
