"""The Redis key schema: every key this project writes is named here and nowhere else.

All keys of one user share the hash tag ``{u:<id>}`` and all keys of one item ``{i:<id>}``, so every
per-user (or per-item) atomic step touches a single Redis Cluster slot.

| key                              | type   | holds                                                       | size          |
|----------------------------------|--------|-------------------------------------------------------------|---------------|
| ``<p>:{u:<id>}:s``               | hash   | fields named in ``state.users``: ``ver`` (bumped by every   | ~0.3 KB       |
|                                  |        | write), ``seq``, ``last_ts``, ``kts``, ``refined_seq``,     | (a listpack)  |
|                                  |        | ``w:<topic>:<partition>``                                   |               |
|                                  |        | (highest applied offset: the idempotency watermark),        |               |
|                                  |        | ``cb`` (codebook of the history), ``gen`` (state id),       |               |
|                                  |        | ``o:``/``p:<origin>`` (parked events applied / parked; at   |               |
|                                  |        | most ``MARKS_CAP`` = 256, counted in ``nm``, older half     |               |
|                                  |        | dropped past it)                                            |               |
| ``<p>:{u:<id>}:c``               | string | the coarse state (``state.users.encode_coarse``: float64    | ~1.3 KB       |
|                                  |        | head + float32 sums); its own key so the state hash, all    |               |
|                                  |        | small fields, stays a listpack (``coarse`` in ``:s`` before)|               |
| ``<p>:{u:<id>}:h``               | string | recent history, compact records (``state.history``: codes,  | ~cap × 8 B    |
|                                  |        | α, one tag byte, a minute delta); appended, rewritten whole |               |
|                                  |        | trimmed to the cap once past cap + cap // 64 records (at    |               |
|                                  |        | least 1: ``streams.planner.trim_slack``)                    |               |
| ``<p>:{u:<id>}:v``               | hash   | ``vec:<scenario>`` (K×d float16; float32 from before still  | S × K × d × 2 |
|                                  |        | reads), ``version``, ``seq``, ``updated_at``, ``event_ts``, |               |
|                                  |        | ``k``, ``d``                                                |               |
| ``<p>:{u:<id>}:v@<version>``     | hash   | the same, of a version while another one holds ``:v`` (a    | S × K × d × 2 |
|                                  |        | roll-out; TTL ``version_ttl_s``); absent otherwise          | or none       |
| ``<p>:{i:<id>}``                 | hash   | ``code:<codebook id>`` (codes + α bytes; two during a       | ~0.3 KB       |
|                                  |        | codebook switch), ``ret`` (float32 retrieval vector),       |               |
|                                  |        | ``version``, ``updated_at``, ``title``; with a trend model  |               |
|                                  |        | ``tc``/``tt`` (decayed event count at a time, ``state.trend``)|             |
|                                  |        | and ``tm:<topic>:<partition>`` (highest offset counted)     |               |
| ``<p>:{i:<id>}:parked``          | list   | events waiting for this item to arrive                      | bounded       |
| ``<p>:items``                    | set    | every known item id (the search index is built from it)     |               |
| ``<p>:parked``                   | zset   | item id → time its first event was parked                   |               |
| ``<p>:dirty:{p<n>}``             | zset   | users of partition n awaiting refinement → when first marked| ≤ users       |
|                                  |        | (ms): served oldest first                                   |               |
| ``<p>:dirty-seq:{p<n>}``         | hash   | the same users → the ``seq`` their refinement must reach     | ≤ users       |
| ``<p>:quarantine``               | hash   | user → JSON {partition, seq, reason, at}: refinement failed |               |
| ``<p>:origin-key``               | string | 32 random bytes signing re-produced parked events (``_sig``) | 32 B         |
| ``<p>:trend``                    | string | τ (seconds) of the items' trend counts, set by the worker   | ~0.1 KB       |
| ``<p>:codebook:<id>``            | string | a codebook any worker can load to decode codes of that id   | ~1.8 MB       |
| ``<p>:codebook:<id>:recoded``    | string | set once every item has a code of that codebook             |               |
| ``<p>:backfill:<run>``          | set    | buckets a batch backfill run finished (resume; 7-day TTL)   | small         |
| ``<p>:smoke:<key>``              | string | ``mirstream smoke`` only: a message copied by the agent     | ~0.1 KB       |
| ``<p>:{u:<id>}:raw``             | string | naive bench baseline only: full raw float32 history         | events × ~4d B|
| ``<p>:{u:<id>}:rawv``            | string | naive bench baseline only: its coarse interests             | M × d × 4     |

No item key has a TTL.  A user's keys (``:s``, ``:c``, ``:h``, ``:v``) expire ``user_ttl_s`` after its last event
when that setting is on (default off; keep it above the topics' retention so no redelivered event
outlives the watermarks that skip it); ``:v@<version>`` expires ``version_ttl_s`` after its last write (its
vectors were moved there when another version's write took ``:v``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str

    def pattern(self) -> str:
        """A ``SCAN MATCH`` pattern for every key of this prefix (each starts ``<prefix>:``)."""
        return f"{self.prefix}:*"

    def _user(self, user: str) -> str:
        """What every key of a user starts with: the prefix and the user's hash tag (one cluster slot)."""
        return f"{self.prefix}:{{u:{user}}}:"

    def user_state(self, user: str) -> str:
        return self._user(user) + "s"

    def user_coarse(self, user: str) -> str:
        return self._user(user) + "c"

    def user_history(self, user: str) -> str:
        return self._user(user) + "h"

    def user_row(self, user: str) -> list[str]:
        """KEYS of ``READ_USER`` and ``APPLY_USER``: state hash, history, coarse state (one hash tag), the
        user's prefix built once."""
        base = self._user(user)
        return [base + "s", base + "h", base + "c"]

    def user_vectors(self, user: str) -> str:
        return self._user(user) + "v"

    def baseline_history(self, user: str) -> str:
        return self._user(user) + "raw"

    def baseline_interests(self, user: str) -> str:
        return self._user(user) + "rawv"

    def user_vectors_at(self, user: str, version: str) -> str:
        return f"{self._user(user)}v@{version}"

    def item(self, item: str) -> str:
        return f"{self.prefix}:{{i:{item}}}"

    def parked(self, item: str) -> str:
        return f"{self.prefix}:{{i:{item}}}:parked"

    @property
    def origin_key(self) -> str:
        return f"{self.prefix}:origin-key"

    @property
    def trend(self) -> str:
        return f"{self.prefix}:trend"

    def codebook(self, codebook_id: str) -> str:
        return f"{self.prefix}:codebook:{codebook_id}"

    def codebook_recoded(self, codebook_id: str) -> str:
        return f"{self.prefix}:codebook:{codebook_id}:recoded"

    def backfill(self, run: str) -> str:
        return f"{self.prefix}:backfill:{run}"

    def smoke(self, key: str) -> str:
        return f"{self.prefix}:smoke:{key}"

    @staticmethod
    def item_code(codebook_id: str) -> str:
        """The item-hash field holding the item's codes in one codebook."""
        return f"code:{codebook_id}"

    @property
    def items(self) -> str:
        return f"{self.prefix}:items"

    @property
    def parked_index(self) -> str:
        return f"{self.prefix}:parked"

    @property
    def quarantine(self) -> str:
        return f"{self.prefix}:quarantine"

    def dirty(self, partition: int) -> str:
        return f"{self.prefix}:dirty:{{p{partition}}}"

    def dirty_seq(self, partition: int) -> str:
        return f"{self.prefix}:dirty-seq:{{p{partition}}}"
