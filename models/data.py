"""Datasets the project can use offline: MovieLens-100K (real, from an installed wheel) and a seeded
multi-scenario simulator with planted structure.  Nothing is downloaded at run time.

A ``Dataset`` is columnar: events sorted by (user, time, item) with per-user offsets, plus item texts
(and, for the simulator, given item vectors).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ML100K_HINT = "MovieLens-100K ships inside recbole's wheel: pip install --no-deps recbole==1.2.1"


@dataclass
class Dataset:
    name: str
    scenarios: tuple[str, ...]
    actions: tuple[str, ...]
    item_ids: np.ndarray  # (n_items,) external ids
    item_text: list[str]
    item_category: np.ndarray  # (n_items,) a coarse label, for the diversity figure
    user_ids: np.ndarray  # (n_users,) external ids
    user: np.ndarray  # (n_events,) user index, sorted
    item: np.ndarray  # item index
    scenario: np.ndarray
    action: np.ndarray
    ts: np.ndarray  # float64 seconds
    offsets: np.ndarray  # (n_users + 1,) events of user u are [offsets[u], offsets[u+1])
    item_vectors: np.ndarray | None = None  # given content vectors (simulator)
    query: list[str] | None = None  # search query text per event ('' elsewhere)
    event_ids: list[str] | None = None  # per event, from a user's file (``models.schema``); None: derived

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user_slice(self, u: int) -> slice:
        return slice(int(self.offsets[u]), int(self.offsets[u + 1]))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _finish(
    name, scenarios, actions, item_ids, item_text, item_category, user, item, scenario, action, ts, **extra
) -> Dataset:
    """Sorts events by (user, ts, item) — a stable tie-break for equal timestamps — and builds offsets."""
    order = np.lexsort((item, ts, user))
    user, item, scenario, action, ts = user[order], item[order], scenario[order], action[order], ts[order]
    for column in ("query", "event_ids"):
        if extra.get(column) is not None:
            extra[column] = [extra[column][i] for i in order]
    uniq, user = np.unique(user, return_inverse=True)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(user, minlength=len(uniq)))])
    return Dataset(
        name,
        tuple(scenarios),
        tuple(actions),
        np.asarray(item_ids),
        list(item_text),
        np.asarray(item_category),
        uniq,
        user.astype(np.int64),
        item.astype(np.int64),
        scenario.astype(np.int64),
        action.astype(np.int64),
        ts.astype(np.float64),
        offsets,
        **extra,
    )


# --------------------------------------------------------------------------- MovieLens-100K


def ml100k_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(ML100K_HINT)
    d = Path(spec.submodule_search_locations[0]) / "dataset_example" / "ml-100k"
    if not (d / "ml-100k.inter").exists():
        raise FileNotFoundError(f"{d} has no ml-100k.inter; {ML100K_HINT}")
    return d


def load_ml100k(directory: Path | None = None) -> Dataset:
    """943 users, 1,682 movies, 100,000 ratings. Scenario: one ('feed'); action: the rating (1..5)."""
    d = directory or ml100k_dir()
    inter = np.loadtxt(d / "ml-100k.inter", skiprows=1, dtype=np.int64)  # user, item, rating, ts
    lines = (d / "ml-100k.item").read_text(encoding="latin-1").splitlines()[1:]
    raw_ids, texts, genres = [], [], []
    for line in lines:
        item_id, title, year, classes = ([*line.split("\t"), "", "", ""])[:4]
        raw_ids.append(int(item_id))
        texts.append(f"{title} ({year}) {classes.replace(' ', ', ')}".strip())
        genres.append(classes.split(" ")[0] if classes else "unknown")
    raw_ids = np.asarray(raw_ids)
    index = {rid: i for i, rid in enumerate(raw_ids.tolist())}
    _, category = np.unique(np.asarray(genres), return_inverse=True)
    item = np.asarray([index[i] for i in inter[:, 1].tolist()])
    return _finish(
        "ml-100k",
        ["feed"],
        [f"rating{r}" for r in range(1, 6)],
        raw_ids,
        texts,
        category,
        inter[:, 0],
        item,
        np.zeros(len(inter), np.int64),
        inter[:, 2] - 1,
        inter[:, 3].astype(float),
    )


# --------------------------------------------------------------------------- simulator

_WORDS = (
    "hiking ramen skincare jazz python sneakers pottery tennis anime baking camping vinyl yoga chess surfing coffee "
    "gardening robotics makeup football travel knitting poetry cycling"
).split()


def simulate(
    users: int = 300,
    items: int = 800,
    clusters: int = 20,
    dim: int = 64,
    seed: int = 0,
    events_per_user: tuple[int, int] = (60, 160),
    counts: np.ndarray | None = None,
) -> Dataset:
    """Seeded multi-scenario log with planted structure.

    Items belong to clusters (vector = cluster centre + noise; title = cluster words + an id).  Each user
    has three latent interests: two *browse* interests that drive feed clicks, and one *intent* interest
    that drives search and ad clicks.  So a user's ads future is visible in their search past (cross-
    scenario signal a single-scenario model cannot see), and a feed-only view misses the intent interest.
    Actions: click, like, skip (skips come from clusters the user does not care about).
    ``counts`` gives each user's number of events instead (e.g. ``zipf_counts``); they are then spread over
    the same 30 days for every user, so a user with more events is that much more active.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    cluster = rng.integers(0, clusters, items)
    vectors = centres[cluster] + 0.45 * rng.normal(size=(items, dim))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    words = [(_WORDS[c % len(_WORDS)], _WORDS[(3 * c + 1) % len(_WORDS)]) for c in range(clusters)]
    text = [f"{words[c][0]} {words[c][1]} note {i}" for i, c in enumerate(cluster.tolist())]
    by_cluster = [np.flatnonzero(cluster == c) for c in range(clusters)]
    cols: dict[str, list] = {k: [] for k in ("user", "item", "scenario", "action", "ts", "query")}
    for u in range(users):
        browse, intent = rng.choice(clusters, 2, replace=False), rng.integers(0, clusters)
        if counts is None:
            n, gap = int(rng.integers(*events_per_user)), 3600.0
            t = 1.7e9 + rng.uniform(0, 86400 * 30)
        else:
            n = int(counts[u])
            gap = 86400 * 30 / max(n, 1)
            t = 1.7e9 + rng.uniform(0, gap)
        for _ in range(n):
            t += rng.exponential(gap)
            r = rng.random()
            scen, action = (0, 0) if r < 0.6 else ((1, 0) if r < 0.8 else (2, 0))
            if scen == 0:
                c = rng.choice(browse) if rng.random() < 0.85 else rng.integers(0, clusters)
                if rng.random() < 0.1:
                    c, action = rng.integers(0, clusters), 2  # skip of something random
                elif rng.random() < 0.2:
                    action = 1
            else:
                c = intent if rng.random() < 0.85 else rng.choice(browse)
            it = int(rng.choice(by_cluster[c]))
            cols["user"].append(u)
            cols["item"].append(it)
            cols["scenario"].append(scen)
            cols["action"].append(action)
            cols["ts"].append(t)
            cols["query"].append(" ".join(words[c]) if scen == 1 else "")
    arr = {k: np.asarray(v) for k, v in cols.items() if k != "query"}
    return _finish(
        f"sim-{seed}",
        ["feed", "search", "ads"],
        ["click", "like", "skip"],
        np.asarray([f"n{i}" for i in range(items)]),
        text,
        cluster,
        arr["user"],
        arr["item"],
        arr["scenario"],
        arr["action"],
        arr["ts"],
        item_vectors=vectors,
        query=cols["query"],
    )


def zipf_counts(users: int, mean_events: float, exponent: float = 1.0) -> np.ndarray:
    """Events per user when activity follows Zipf's law: the user of rank r has ∝ r^-exponent events
    (at least one), ``mean_events`` on average."""
    weight = np.arange(1, users + 1, dtype=np.float64) ** -exponent
    return np.maximum(1, np.round(weight / weight.sum() * mean_events * users)).astype(np.int64)


# --------------------------------------------------------------------------- a user's own files


def load_files(
    events: str | Path | list,
    items: str | Path | list | None,
    rejects=None,
    scenarios: tuple[str, ...] | None = None,
    actions: tuple[str, ...] | None = None,
) -> Dataset:
    """A dataset from a team's event and item files (``models.files``; schema: ``models.schema``).

    Scenarios and actions: every one found in the events (sorted), or, given a model's, those only (an
    event of another is rejected with the known list).  Items: given vectors when every item has one,
    else the texts go through the item tower; no item file (``None``, a replay of events only): the items
    the events name, without text or vector.  Bad rows go to ``rejects`` (a ``models.files.Rejects``)."""
    import hashlib

    from models.files import Rejects, read_events, read_items

    rejects = rejects if rejects is not None else Rejects()
    ids: dict[str, int] = {}
    texts, vectors, categories = [], [], []
    for chunk in read_items(items, rejects) if items is not None else ():
        for line, it in chunk:
            if it.item_id in ids:
                rejects.add(str(items), line, f"duplicate item_id {it.item_id!r}: kept its first row")
                continue
            ids[it.item_id] = len(ids)
            texts.append(it.text or "")
            vectors.append(it.vector)
            categories.append(it.category)
    if not ids and items is not None:
        raise ValueError(f"{items}: no valid item ({rejects.summary()})")
    has_vec = [v is not None for v in vectors]
    if any(has_vec) and not all(has_vec):
        raise ValueError(
            f"{items}: {sum(has_vec)} of {len(ids)} items have a vector: give every item a vector, or none "
            "(then every item's text goes through the item tower)"
        )
    if items is not None and not any(has_vec) and not all(texts):
        raise ValueError(f"{items}: items without vectors need a text each")
    cols: dict[str, list] = {k: [] for k in ("user", "item", "scenario", "action", "ts", "query", "event_id")}
    for chunk in read_events(events, rejects, scenarios, actions, items=ids if items is not None else None):
        for _, e in chunk:
            if e.item_id not in ids:  # events only: the catalogue is what they name
                ids[e.item_id] = len(ids)
                texts.append("")
                vectors.append(None)
                categories.append("")
            cols["user"].append(e.user_id)
            cols["item"].append(ids[e.item_id])
            cols["scenario"].append(e.scenario)
            cols["action"].append(e.action)
            cols["ts"].append(e.ts)
            cols["query"].append(e.query)
            cols["event_id"].append(e.event_id)
    if not cols["ts"]:
        raise ValueError(f"{events}: no valid event ({rejects.summary()})")
    scen_names = tuple(scenarios) if scenarios is not None else tuple(sorted(set(cols["scenario"])))
    act_names = tuple(actions) if actions is not None else tuple(sorted(set(cols["action"])))
    s_index, a_index = {s: i for i, s in enumerate(scen_names)}, {a: i for i, a in enumerate(act_names)}
    _, category = np.unique(np.asarray(categories, dtype=object).astype(str), return_inverse=True)
    digest = hashlib.blake2b("\x1f".join([*ids, *texts]).encode(), digest_size=4).hexdigest()
    return _finish(
        f"files-{Path(str(_first(items if items is not None else events))).name.split('.')[0]}-{digest}",
        scen_names,
        act_names,
        np.asarray(list(ids), dtype=object).astype(str),
        texts,
        category,
        np.asarray(cols["user"], dtype=object).astype(str),
        np.asarray(cols["item"], dtype=np.int64),
        np.asarray([s_index[s] for s in cols["scenario"]], dtype=np.int64),
        np.asarray([a_index[a] for a in cols["action"]], dtype=np.int64),
        np.asarray(cols["ts"], dtype=np.float64),
        item_vectors=np.stack(vectors).astype(np.float32) if items is not None and all(has_vec) else None,
        query=cols["query"],
        event_ids=cols["event_id"],
    )


def _first(paths: str | Path | list) -> str | Path:
    return paths[0] if isinstance(paths, list) else paths


def load(name: str, seed: int = 0) -> Dataset:
    if name in ("ml-100k", "ml100k", "movielens"):
        return load_ml100k()
    if name.startswith("sim"):
        return simulate(seed=seed)
    raise ValueError(f"unknown dataset {name!r}: use 'ml-100k' or 'sim'")
