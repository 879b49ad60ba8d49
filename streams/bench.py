"""``mirstream bench ingest|freshness|memory``: the real worker against real Kafka + Redis.

Each run uses a fresh topic/key prefix and a worker child process.  ``ingest``: events/s with
refinement off and on (produced as fast as possible, clock stopped when Redis reflects every event)
and the naive baseline (``streams.naive``) on the same events.  ``freshness``: p50/p95/p99 of
event sent → vectors written that reflect it, per event, at fixed offered rates (``streams.latency``),
beside the worker's own histogram (one observation per refinement, from its newest event; bucket upper
bounds).  ``memory``: Redis bytes per user at a 1,000-event history, codes vs the raw
float32 history, per user past the cap (1,500 events streamed, cap 1,000), and worker RSS / Redis memory
over a 100k-event soak.  Prints markdown, writes JSON.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from models.bench import print_table, write_rows
from models.data import Dataset, load, simulate, zipf_counts
from models.train import TrainConfig, run_train
from models.user_model import Checkpoint
from state.baseline import BaselineStore
from state.keys import Keys
from state.store import drop_prefix, user_memory
from streams import latency
from streams.ceilings import EVENTS_ENV, Span, raw_consumer, wait_ceiling
from streams.naive import run_naive
from streams.replay import (
    ReplayPlan,
    expected_seq,
    plan,
    send_events,
    send_items,
    wait_for_items,
    wait_for_vectors,
)
from streams.security import interest_reader, redis_sync
from streams.settings import Settings
from streams.topics import delete_run_topics, ensure_topics
from streams.workerproc import WorkerProcess


def _buckets(metrics_text: str, name: str) -> list[tuple[float, float]]:
    """A Prometheus histogram's cumulative buckets: (upper bound, count), in order."""
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    return buckets


def histogram_quantiles(metrics_text: str, name: str, qs: tuple[float, ...]) -> dict[float, float]:
    """Quantiles from a Prometheus histogram's cumulative buckets (upper bound of the bucket reached)."""
    buckets = _buckets(metrics_text, name)
    total = buckets[-1][1] if buckets else 0
    return {q: next((le for le, c in buckets if c >= q * total), float("nan")) if total else float("nan") for q in qs}


def histogram_share(metrics_text: str, name: str, bound: float) -> float:
    """The share of observations at or below ``bound`` (a bucket bound, so exact): "p99 <= 1 s" holds
    when the share within 1 s is at least 0.99, and the share says how far from it a run is."""
    buckets = _buckets(metrics_text, name)
    total = buckets[-1][1] if buckets else 0
    return next((c / total for le, c in buckets if le == bound), float("nan")) if total else float("nan")


def ensure_checkpoint(settings: Settings) -> Checkpoint:
    """The benches replay the simulator: train the demo's small model on it when no checkpoint exists."""
    if not (Path(settings.checkpoint) / "model.json").exists():
        print(f"== training a small model on the multi-scenario simulator → {settings.checkpoint}")
        run_train(TrainConfig(dataset="sim", steps=150), settings.checkpoint)
    return Checkpoint.load(settings.checkpoint)


#: Every run (prefix + app id) a bench made in this process: ``drop_runs`` deletes their topics and keys.
_runs: list[Settings] = []


def _fresh_prefix(settings: Settings, tag: str, **changes: object) -> Settings:
    run = f"bench{tag}{int(time.time() * 1000) % 10**8}"
    s = settings.with_(prefix=run, app_id=f"mirstream-{run}", **changes)
    _runs.append(s)
    return s


def drop_runs(settings: Settings) -> tuple[int, int]:
    """Deletes the Kafka topics and Redis keys of every run the benches of this process made (``mirstream
    bench`` does at its end unless ``--keep``): a broker that runs the benches again and again would keep
    every run's topics (one development broker reached 73 GB).  Returns (topics, keys) deleted."""
    runs, _runs[:] = list(_runs), []
    if not runs:
        return 0, 0
    topics = delete_run_topics(settings, runs)  # the no-op app's id starts with its run's: its topic goes too
    client = redis_sync(settings)
    try:
        keys = sum(drop_prefix(client, r.prefix) for r in runs)
    finally:
        client.close()
    return len(topics), keys


def sim_users(users: int) -> Dataset:
    """The simulator's log, or for more than its 300 users a larger one with the same catalogue."""
    return load("sim") if users <= 300 else simulate(users=users)


def run_worker(
    settings: Settings,
    ds: Dataset,
    p: ReplayPlan,
    rate: float | None,
    refine: bool,
    tag: str,
    rss_samples: int = 0,
    workers: int = 1,
) -> tuple[dict, Settings]:
    """One worker run over the plan's events on a fresh prefix; the row and the settings it used."""
    s = _fresh_prefix(settings, tag, refine=refine)
    expected = expected_seq(ds, p.events)
    ensure_topics(s)
    rss: list[int] = []
    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(WorkerProcess(s, log=Path(settings.datadir) / f"{s.prefix}.log"))
        for i in range(1, workers):  # more members of the same consumer group share the partitions
            more = s.with_(web_port=s.web_port + i, datadir=str(Path(s.datadir) / f"{s.prefix}-{i}"))
            stack.enter_context(WorkerProcess(more, log=Path(settings.datadir) / f"{s.prefix}-{i}.log"))
        send_items(s, ds, p.items, progress=False)
        wait_for_items(s, len(p.items))  # time events only, not the catalogue
        t0 = time.perf_counter()
        offered, sent = [], 0
        sent_at: list[float] = []
        for chunk in np.array_split(p.events, max(1, rss_samples)):  # RSS once each slice is absorbed
            offered.append(send_events(s, ds, chunk, rate=rate, progress=False, sent_at=sent_at))
            sent += len(chunk)
            if rss_samples:
                wait_for_vectors(s, expected_seq(ds, p.events[:sent]), timeout=900, progress=False, applied_only=True)
                rss.append(worker.rss_bytes())
        behind = wait_for_vectors(s, expected, timeout=900, progress=False, applied_only=not refine)
        wall = time.perf_counter() - t0
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{s.web_port}/metrics").read().decode()
        if not rss_samples:
            rss.append(worker.rss_bytes())
        per_event = {}
        if refine and rate:  # paced: what each event waited (read while the worker's topic is there)
            sent_by_user = latency.group(ds.user_ids.astype(str)[ds.user[p.events]], np.asarray(sent_at))
            refinements = latency.read_refinements(s)
            per_event = latency.summary(latency.event_latencies(sent_by_user, refinements))
            per_event["refinements"] = sum(len(v) for v in refinements.values())
    q = histogram_quantiles(metrics_text, "mirstream_freshness_seconds", (0.5, 0.95, 0.99))
    row = {
        "events": len(p.events),
        "users": len(expected),
        "refine": refine,
        "offered_rate": rate,
        "achieved_offer": float(np.median(offered)),
        "wall_s": wall,
        "events_per_s": len(p.events) / wall,
        "complete": not behind,
        "freshness_p50_s": q[0.5],
        "freshness_p95_s": q[0.95],
        "freshness_p99_s": q[0.99],
        "within_1s": histogram_share(metrics_text, "mirstream_freshness_seconds", 1.0),
        **{f"event_{k}": v for k, v in per_event.items()},
        "worker_rss_bytes": rss,
    }
    return row, s


def run_naive_baseline(
    settings: Settings,
    ckpt: Checkpoint,
    ds: Dataset,
    p: ReplayPlan,
    prefix: str | None = None,
    timeout: float = 900.0,
) -> dict:
    """The naive pipeline over the same events (on ``prefix``'s topics when given, else freshly produced)."""
    if prefix is None:
        s = _fresh_prefix(settings, "naive")
        ensure_topics(s)
        send_events(s, ds, p.events, progress=False)
    else:
        s = settings.with_(prefix=prefix)
    assert ds.item_vectors is not None, "the naive baseline replays the simulator (given item vectors)"
    vectors = {str(ds.item_ids[j]): ds.item_vectors[j] for j in p.items.tolist()}
    return run_naive(s, ckpt, vectors, len(p.events), timeout=timeout)


# ---------------------------------------------------------------------------------------------- parts
def watch_pipeline(
    settings: Settings,
    expected: dict[str, int],
    refine: bool,
    timeout: float = 900.0,
    cpu: Callable[[], float] | None = None,
) -> dict:
    """Times a worker over pre-produced events from Redis, like ``ceilings.Span``: from the first poll that
    sees an applied event to the poll that sees every user complete (applied, or with ``refine`` its
    vectors written), over the events applied after that first poll.  Polls every 50 ms.  ``cpu``: the
    worker's CPU seconds now (``WorkerProcess.cpu_seconds``), for its CPU per event over the same span."""
    reader = interest_reader(settings)
    users, total = list(expected), sum(expected.values())
    span = Span()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        applied = [s or 0 for s in reader.seqs(users, applied=True)]
        now = time.perf_counter()
        done = sum(min(a, expected[u]) for u, a in zip(users, applied, strict=True))
        if done and not span.first_at:
            span.note(done, now, cpu() if cpu else float("nan"))
        if refine:
            seqs = reader.seqs(users)
            complete = all((s or 0) >= expected[u] for u, s in zip(users, seqs, strict=True))
        else:
            complete = done >= total
        if complete:
            span.note(total - span.events, now, cpu() if cpu else float("nan"))
            return span.row(total)
        time.sleep(0.05)
    return {**span.row(total), "complete": False}


def _prepared_run(settings: Settings, ds: Dataset, p: ReplayPlan, tag: str, refine: bool) -> Settings:
    """A fresh prefix whose catalogue is already stored (by a worker that is stopped again before any event
    exists, so the timed worker never parks an event for an item still on its way)."""
    s = _fresh_prefix(settings, tag, refine=refine)
    ensure_topics(s)
    send_items(s, ds, p.items, progress=False)
    with WorkerProcess(s, log=Path(settings.datadir) / f"{s.prefix}-items.log"):
        if not wait_for_items(s, len(p.items)):
            raise RuntimeError(f"the catalogue of {s.prefix} was not stored in time")
    return s


def bench_ingest(
    settings: Settings, users: int = 100, repeats: int = 1, naive_seconds: float = 900.0, out: str = "bench"
) -> list[dict]:
    """Events/s over the same pre-produced events (nothing produces while a reader is timed), in one run:
    the raw aiokafka ceiling, the no-op Faust ceiling (``streams.ceilings``), the pipeline with
    refinement off and on, and the naive per-event recompute baseline; ``repeats`` rounds, medians.
    The naive baseline stops after ``naive_seconds``: its rate is that of the events it got through, the
    earliest of each user (short histories, so its fastest part: the ratios against it are conservative)."""
    ckpt = ensure_checkpoint(settings)
    ds = sim_users(users)
    p = plan(ds, max_users=users)
    expected = expected_seq(ds, p.events)
    n = len(p.events)
    names = {
        "raw": "raw aiokafka consumer: getmany + orjson (ceiling of the client)",
        "noop": (
            f"no-op Faust agents: the pipeline's batches ({settings.batch_size}, "
            f"{settings.batch_wait_ms}–{settings.batch_wait_max_ms} ms) + orjson"
        ),
        "off": "pipeline, refinement off",
        "on": "pipeline, refinement on",
        "naive": "naive: per event fetch raw history, recompute, write",
    }
    rounds: list[dict[str, dict]] = []
    for r in range(repeats):
        print(f"== round {r + 1}/{repeats}: catalogue, then {n:,} events pre-produced", flush=True)
        off_s, on_s = (
            _prepared_run(settings, ds, p, f"{tag}{r}", refine) for tag, refine in (("off", False), ("on", True))
        )
        for s in (off_s, on_s):  # the same events, in the same order, to each run's topics
            send_events(s, ds, p.events, progress=False)
        got: dict[str, dict] = {"raw": raw_consumer(off_s, n)}
        noop_s = off_s.with_(app_id=f"{off_s.app_id}-noop")
        with WorkerProcess(
            noop_s, app="noop", log=Path(settings.datadir) / f"{off_s.prefix}-noop.log", extra_env={EVENTS_ENV: str(n)}
        ):
            got["noop"] = wait_ceiling(noop_s) or {"events_per_s": float("nan"), "complete": False}
        for key, s, refine in (("off", off_s, False), ("on", on_s, True)):
            with WorkerProcess(s, log=Path(settings.datadir) / f"{s.prefix}.log") as worker:
                got[key] = watch_pipeline(s, expected, refine, cpu=worker.cpu_seconds)
        got["naive"] = run_naive_baseline(settings, ckpt, ds, p, prefix=off_s.prefix, timeout=naive_seconds)
        rounds.append(got)
        print("   " + ", ".join(f"{k} {v['events_per_s']:,.0f}" for k, v in got.items()) + " events/s", flush=True)
    rows = []
    for key, name in names.items():
        rates = [g[key]["events_per_s"] for g in rounds]
        cpus = [g[key].get("cpu_us_per_event", float("nan")) for g in rounds]
        rows.append(
            {
                "run": name,
                "key": key,
                "events": n,
                "users": len(expected),
                "events_per_s": float(np.median(rates)),
                "rounds": rates,
                "cpu_us_per_event": float(np.median(cpus)),
                "cpu_rounds": cpus,
                "complete": all(g[key]["complete"] for g in rounds),
            }
        )
    write_rows(out, "ingest", rows)
    by = {r["key"]: r["events_per_s"] or float("nan") for r in rows}  # 0: one batch held everything
    print(
        f"\ningest: simulator, {n:,} events of {len(expected)} users, {settings.partitions} partitions per topic, "
        f"pre-produced; one reader at a time; median of {repeats} round(s)\n"
    )
    cpu = {r["key"]: r["cpu_us_per_event"] for r in rows}
    print_table(
        ["run", "events/s", "vs no-op Faust", "CPU µs/event", "vs no-op Faust, by CPU", "complete"],
        "lrrrrl",
        [
            [
                r["run"],
                f"{r['events_per_s']:,.0f}",
                f"{r['events_per_s'] / by['noop']:.2f}",
                "" if np.isnan(cpu[r["key"]]) else f"{cpu[r['key']]:.1f}",
                "" if np.isnan(cpu[r["key"]]) else f"{cpu['noop'] / cpu[r['key']]:.2f}",
                str(r["complete"]),
            ]
            for r in rows
        ],
    )
    print(
        "\nCPU: the reader's CPU time (every thread; the pipeline's refiner process included) over the timed span, "
        "per event: steadier than events/s when other jobs share the cores"
    )
    print(
        f"\nno-op Faust / raw aiokafka: {by['noop'] / by['raw']:.3f}; "
        f"pipeline off / naive: {by['off'] / by['naive']:.1f}x; on / naive: {by['on'] / by['naive']:.1f}x; "
        f"off / on: {by['off'] / by['on']:.2f}x"
    )
    return rows


def bench_freshness(
    settings: Settings,
    users: int = 100,
    rates: tuple[float, ...] = (200, 1000, 5000),
    zipf: float = 0.0,
    out: str = "bench",
) -> list[dict]:
    """Freshness (event sent → vectors written that reflect it) at fixed offered rates, refinement on.
    The simulator's users are evenly active; with ``zipf`` > 0 the same number of events (about 110 a
    user) is spread over the users by Zipf's law with that exponent, as real traffic is (a few very active
    users, a long tail)."""
    ensure_checkpoint(settings)
    ds = simulate(users=users, counts=zipf_counts(users, 110, zipf)) if zipf > 0 else sim_users(users)
    p = plan(ds, max_users=users)
    users = len(np.unique(ds.user[p.events]))
    rows = []
    for rate in rates:
        row, _ = run_worker(settings, ds, p, rate, True, f"r{rate:.0f}")
        rows.append({"run": f"{rate:.0f} ev/s offered", **row})
    write_rows(out, "freshness", rows)
    spread = f"Zipf activity, exponent {zipf:g}" if zipf > 0 else "evenly active"
    nan = float("nan")  # no per-event figures for an unpaced run (``--rates 0``)
    print(f"freshness: simulator, {len(p.events):,} events of {users} users ({spread}), refinement on, one worker\n")
    print(
        "per event: sent → vectors written that reflect it (every event, exact); per refinement: the worker's\n"
        "histogram, from the newest event each refinement reflects (bucket upper bounds)\n"
    )
    print_table(
        [
            "offered ev/s",
            "achieved offer",
            "absorbed ev/s",
            "per event p50 / p95 / p99 (s)",
            "per event ≤ 1 s",
            "per refinement p50 / p95 / p99 (s)",
            "per refinement ≤ 1 s",
            "refinements",
            "worker RSS (MiB)",
            "complete",
        ],
        "rrrrrrrrrl",
        [
            [
                f"{r['offered_rate']:.0f}",
                f"{r['achieved_offer']:.0f}",
                f"{r['events_per_s']:.0f}",
                " / ".join(f"{r.get(f'event_{q}_s', nan):.2f}" for q in ("p50", "p95", "p99")),
                f"{100 * r.get('event_within_1s', nan):.1f} %",
                " / ".join(f"≤{r[f'freshness_{q}_s']:g}" for q in ("p50", "p95", "p99")),
                f"{100 * r['within_1s']:.1f} %",
                f"{r['event_refinements']:,}" if "event_refinements" in r else "–",
                f"{max(r['worker_rss_bytes']) / 2**20:,.0f}",
                str(r["complete"]),
            ]
            for r in rows
        ],
    )
    ok = [r["offered_rate"] for r in rows if r["complete"] and r.get("event_p99_s", nan) <= 1.0]
    print(f"\nhighest offered rate with p99 ≤ 1 s per event: {max(ok):.0f} ev/s" if ok else "\nno rate kept p99 ≤ 1 s")
    return rows


def bench_memory(
    settings: Settings,
    users: int = 10,
    history: int = 1000,
    soak_events: int = 100_000,
    out: str = "bench",
    past_cap: int = 1500,
) -> list[dict]:
    """Redis bytes per user at a full history (codes vs raw float32), per user past the history cap
    (``past_cap`` events streamed with the cap at ``history``: the steady state, trimmed histories and all),
    and a soak's worker RSS / Redis memory."""
    ckpt = ensure_checkpoint(settings)
    ds = simulate(users=users, events_per_user=(history, history + 1))
    p = plan(ds)
    long_row, s = run_worker(settings, ds, p, None, True, "mem")
    naive = run_naive_baseline(settings, ckpt, ds, p, prefix=s.prefix)
    r = redis_sync(settings)
    per_user = [user_memory(r, s.prefix, str(u), ckpt.version) for u in ds.user_ids]
    raw = [BaselineStore(r, s.prefix).memory_usage(str(u)) for u in ds.user_ids]
    ours = {k: float(np.median([m[k] for m in per_user])) for k in per_user[0]}
    rows: list[dict] = [{"what": f"pipeline user, {history} events: {k}", "bytes": v} for k, v in ours.items()]
    rows.append({"what": f"pipeline user, {history} events: total", "bytes": sum(ours.values())})
    rows.append({"what": f"naive user, {history} events: raw float32 history", "bytes": float(np.median(raw))})

    # Past the cap: the history holds between cap and cap + trim_slack(cap) records (streams.planner).
    far = simulate(users=users, events_per_user=(past_cap, past_cap + 1))
    _, fs = run_worker(settings.with_(history_cap=history), far, plan(far), None, True, "memcap")
    past = [user_memory(r, fs.prefix, str(u), ckpt.version) for u in far.user_ids]
    beyond = {k: float(np.median([m[k] for m in past])) for k in past[0]}
    what = f"pipeline user, {past_cap} events, cap {history}"
    rows += [{"what": f"{what}: {k}", "bytes": v} for k, v in beyond.items()]
    rows.append({"what": f"{what}: total", "bytes": sum(beyond.values())})
    rows.append({"what": f"{what}: largest total", "bytes": float(max(sum(m.values()) for m in past))})
    lengths = [r.strlen(Keys(fs.prefix).user_history(str(u))) for u in far.user_ids]
    rows.append({"what": f"{what}: history value, largest (STRLEN)", "bytes": float(max(lengths))})
    rows.append(
        {
            "what": f"{users} users × {history} events: pipeline events/s (refinement on)",
            "bytes": None,
            "value": long_row["events_per_s"],
        }
    )
    rows.append(
        {"what": f"{users} users × {history} events: naive events/s", "bytes": None, "value": naive["events_per_s"]}
    )

    # Soak: many users with long histories, a history cap below them, refinement on.
    per = max(1, soak_events // 200)
    soak = simulate(users=200, events_per_user=(per, per + 1))
    sp = plan(soak)
    before = int(r.info("memory")["used_memory"])
    soak_row, ss = run_worker(settings.with_(history_cap=200), soak, sp, None, True, "soak", rss_samples=4)
    after = int(r.info("memory")["used_memory"])
    soak_users = [user_memory(r, ss.prefix, str(u)) for u in soak.user_ids]
    rows.append(
        {
            "what": f"soak: {len(sp.events):,} events, 200 users, cap 200: events/s",
            "bytes": None,
            "value": soak_row["events_per_s"],
            "complete": soak_row["complete"],
        }
    )
    rows.append(
        {
            "what": "soak: worker RSS after each quarter (MB)",
            "bytes": None,
            "value": [round(b / 2**20, 1) for b in soak_row["worker_rss_bytes"]],
        }
    )
    rows.append({"what": "soak: Redis used_memory growth", "bytes": after - before})
    rows.append(
        {
            "what": "soak: median user history bytes (cap 200)",
            "bytes": float(np.median([m["history"] for m in soak_users])),
        }
    )
    write_rows(out, "memory", rows)

    def shown(x: dict) -> str:
        v = x.get("value")
        return f"{x['bytes']:,.0f}" if x["bytes"] is not None else (f"{v:,.0f}" if isinstance(v, float) else str(v))

    print_table(["measure", "bytes / value"], "lr", [[x["what"], shown(x)] for x in rows])
    print(
        f"\nhistory, codes vs raw float32: {np.median(raw) / max(ours['history'], 1):.1f}x smaller; "
        f"whole user vs raw history alone: {np.median(raw) / max(sum(ours.values()), 1):.1f}x smaller"
    )
    return rows


def item_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` catalogue texts: MovieLens-100K's titles (title, year, genres), then synthetic ones made by
    pairing a title with another title's genres when more are asked for (same length distribution)."""
    texts = list(load("ml-100k").item_text)
    rng = np.random.default_rng(seed)
    while len(texts) < n:
        a, b = rng.integers(0, 1682, size=2)
        title, genres = texts[a].split(")")[0] + ")", texts[b].split(")", 1)[-1]
        texts.append(f"{title}{genres} #{len(texts)}")
    return texts[:n]


def bench_items(
    items: int = 1682, sample: int = 128, repeats: int = 3, spec: str = "smollm2", out: str = "bench"
) -> list[dict]:
    """Items/s through the item tower's LLM, every configuration alternated on the same ``sample`` texts
    ``repeats`` times (medians; the machine's load moves between repeats, not between the rows of one):
    the reference path (``TextEncoder.encode_reference``: batches of 32 in arrival order, every layer,
    float32: the path before), the fast path (``encode``: length-sorted batches, dedup, text-hash cache)
    with every layer in float32 (the previous default tower) and in bfloat16, with the default tower's
    layers (``TrainConfig.item_layers``) in float32 and in its run type (the default), and the default on
    one torch thread.  Then the default over the whole catalogue cold, and again warm (every text cached:
    a re-sent catalogue), ``repeats`` times, on torch's thread count and on one thread.  Each bfloat16
    state is compared with the float32 state of the same depth (cosine), which the parity test bounds."""
    from models.item_tower import TextEncoder

    cfg = TrainConfig()
    texts = item_texts(items)
    full = TextEncoder(spec)
    depth = full.model.config.num_hidden_layers
    cut = cfg.item_layers or depth
    default = TextEncoder(spec, layers=cfg.item_layers, dtype=cfg.item_dtype)
    runs = [
        ("before: reference path (batches of 32 in arrival order)", full, full.encode_reference, None),
        ("fast path (the previous default)", full, full.encode, None),
        ("fast path", (b := TextEncoder(spec, dtype="bfloat16")), b.encode, 1),
        ("fast path", (c := TextEncoder(spec, layers=cut)), c.encode, None),
        ("fast path (the default)", default, default.encode, 3),
        ("fast path (the default), 1 torch thread", default, default.encode, 3),
    ]
    threads = torch.get_num_threads()
    rng = np.random.default_rng(1)
    picked = [texts[i] for i in rng.choice(len(texts), size=min(sample, len(texts)), replace=False)]
    for _, enc, _, _ in runs:
        enc.encode(picked[:8], use_cache=False)  # warm-up (allocator, kernels)
    seconds: list[list[float]] = [[] for _ in runs]
    states: list[np.ndarray] = [np.empty(0)] * len(runs)
    for _ in range(repeats):
        for r, (label, _, fn, _) in enumerate(runs):
            torch.set_num_threads(1 if "1 torch thread" in label else threads)
            kwargs = {} if fn.__name__ == "encode_reference" else {"use_cache": False}
            t0 = time.perf_counter()
            states[r] = fn(picked, **kwargs)
            seconds[r].append(time.perf_counter() - t0)
    torch.set_num_threads(threads)
    worst = float((np.abs(states[0] - states[1]) / np.abs(states[0]).max(axis=1, keepdims=True)).max())

    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        """The smallest per-text cosine between two configurations' states."""
        a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
        return float((a * b).sum(1).min())

    ids = full.token_ids(texts)
    real = sum(len(x) for x in ids)
    ref_run = sum(len(ids[i : i + 32]) * max(map(len, ids[i : i + 32])) for i in range(0, len(ids), 32))
    by_len = sorted(ids, key=len)
    fast_run = sum(len(by_len[i : i + 64]) * len(by_len[min(i + 63, len(by_len) - 1)]) for i in range(0, len(ids), 64))
    n = len(picked)
    rows = []
    for r, (label, enc, _fn, same_depth_fp32) in enumerate(runs):
        rows.append(
            {
                "run": label,
                "layers": enc.model.config.num_hidden_layers,
                "dtype": enc.dtype,
                "texts": n,
                "items_per_s": n / float(np.median(seconds[r])),
                "seconds": seconds[r],
                "tokens_run_per_token": (ref_run if r == 0 else fast_run) / real,
                "min_state_cosine_vs_float32": None
                if same_depth_fp32 is None
                else cosine(states[r], states[same_depth_fp32]),
            }
        )
    for n_threads in (threads, 1):  # the catalogue on torch's thread count, then on one thread
        torch.set_num_threads(n_threads)
        cold, warm = [], []
        for _ in range(repeats):
            default.cache.clear()
            t0 = time.perf_counter()
            default.encode(texts)
            cold.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            default.encode(texts)
            warm.append(time.perf_counter() - t0)
        on = f"{n_threads} torch thread{'s' if n_threads > 1 else ''}"
        for label, took in (
            (f"fast path (the default), the whole catalogue ({len(texts):,} texts), cold cache, {on}", cold),
            (f"fast path (the default), the same catalogue again (every text cached), {on}", warm),
        ):
            rows.append(
                {
                    "run": label,
                    "layers": cut,
                    "dtype": default.dtype,
                    "texts": len(texts),
                    "items_per_s": len(texts) / float(np.median(took)),
                    "seconds": took,
                }
            )
    torch.set_num_threads(threads)
    write_rows(out, "items", rows)
    print(
        f"items: {spec} item tower ({depth} layers; the default tower: the first {cut}, {cfg.item_dtype}), "
        f"MovieLens-100K titles (+ synthetic past 1,682), {len(texts):,} texts, median "
        f"{int(np.median([len(x) for x in ids]))} tokens (EOS included, max {full.max_tokens}); the first six "
        f"rows alternated {repeats}x on the same {n} texts, the catalogue rows {repeats}x (medians), torch "
        f"threads {threads}\n"
    )
    base = rows[0]["items_per_s"]
    print_table(
        ["run", "layers", "dtype", "items/s", "× before", "LLM tokens per real token", "min state cosine vs float32"],
        "lrlrrrr",
        [
            [
                r["run"],
                str(r["layers"]),
                r["dtype"],
                f"{r['items_per_s']:,.1f}",
                f"{r['items_per_s'] / base:,.1f}",
                f"{r['tokens_run_per_token']:.2f}" if "tokens_run_per_token" in r else "—",
                f"{r['min_state_cosine_vs_float32']:.5f}" if r.get("min_state_cosine_vs_float32") else "—",
            ]
            for r in rows
        ],
    )
    print(
        f"\nlargest difference of a fast-path state from the reference's (every layer, float32), relative to "
        f"its largest entry: {worst:.1e}; seconds per repeat: "
        + "; ".join(f"{r['layers']} layers {r['dtype']}: {[round(x, 1) for x in r['seconds']]}" for r in rows)
    )
    return rows
