"""``mirstream`` command line: one entry point, Faust/Kafka-style sub-commands.

mirstream worker            run a Faust worker (the streaming pipeline)
mirstream topics            create/check the topics
mirstream smoke             prove Kafka → Faust agent → Redis works on this stack
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

from streams.settings import Settings


def _add_connection_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("connection (flags override MIRSTREAM_* / KAFKA_BOOTSTRAP_SERVERS / REDIS_URL)")
    g.add_argument("--bootstrap-servers", help="Kafka bootstrap servers host:port[,host:port]")
    g.add_argument("--redis-url", help="Redis URL, e.g. redis://127.0.0.1:6379/0")
    g.add_argument("--prefix", help="prefix of topics and Redis keys")
    g.add_argument("--partitions", type=int, help="partitions per topic")
    s = p.add_argument_group("security (the password only from MIRSTREAM_KAFKA_SASL_PASSWORD / the Redis URL)")
    s.add_argument("--kafka-security-protocol", choices=["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"])
    s.add_argument("--kafka-sasl-mechanism", choices=["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
    s.add_argument("--kafka-sasl-username")
    s.add_argument("--kafka-ssl-ca-file", help="CA bundle (PEM) of the brokers' certificates")
    s.add_argument("--redis-ca-file", help="CA bundle (PEM) for rediss:// URLs")


def _add_file_flags(p: argparse.ArgumentParser, items: bool = True) -> None:
    """A user's own data (schema: models.schema; JSONL, CSV or Parquet, .gz accepted)."""
    g = p.add_argument_group("your own data (README: Bring your own data)")
    g.add_argument("--events", help="event file: user_id, item_id, scenario, action, ts [, query, event_id]")
    if items:
        g.add_argument("--items", help="item file: item_id and text and/or vector [, category]")
    g.add_argument("--rejects", help="write bad rows here (JSONL: file, line, reason, row); default: count only")


def _settings(args: argparse.Namespace, **extra: object) -> Settings:
    """The settings of a command that talks to Kafka and Redis, checked first: refused credentials or
    certificates raise ``AuthFailure`` (one line from ``main``) instead of retrying."""
    from streams.authcheck import preflight

    settings = Settings.from_env(
        bootstrap_servers=args.bootstrap_servers,
        redis_url=args.redis_url,
        prefix=args.prefix,
        partitions=args.partitions,
        kafka_security_protocol=args.kafka_security_protocol,
        kafka_sasl_mechanism=args.kafka_sasl_mechanism,
        kafka_sasl_username=args.kafka_sasl_username,
        kafka_ssl_ca_file=args.kafka_ssl_ca_file,
        redis_ca_file=args.redis_ca_file,
        **extra,
    )
    preflight(settings)
    return settings


#: Set for a worker before torch loads OpenMP (which reads it once): an OpenMP thread waiting at a barrier
#: sleeps instead of spinning.  The refiner's threads share two cores with the agents, the broker and Redis;
#: spinning took their time (``bench freshness``, 2,000 users at 1,000 events/s: 91.4 / 93.5 % of events
#: within 1 s against 86.8 / 78.0 %, alternating).  An ``OMP_WAIT_POLICY`` already set wins.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def cmd_worker(args: argparse.Namespace) -> int:
    for name, value in WORKER_ENV.items():
        os.environ.setdefault(name, value)
    from streams.security import describe
    from streams.workerproc import settings_env

    settings = _settings(
        args, web_port=args.web_port, web_bind=args.web_bind, checkpoint=getattr(args, "checkpoint", None)
    )
    print(f"mirstream worker: {describe(settings)}", file=sys.stderr)
    if args.app == "smoke":
        os.environ.update(settings_env(settings))  # the smoke app reads Settings.from_env() on import
        from streams.smoke import app
    elif args.app == "noop":  # bench ingest's ceiling: the pipeline's Faust shape, agents that only parse
        from streams.ceilings import build_noop_app

        app = build_noop_app(settings)
    else:
        from streams.pipeline import build_app
        from streams.refinement import event_loop_threads
        from streams.topics import ensure_topics

        ensure_topics(settings)
        event_loop_threads()
        app = build_app(settings)
    gc.freeze()  # what start-up built (torch, the model, the app) lives as long as the process: out of GC passes
    sys.argv = [f"mirstream-{args.app}", "worker", "--loglevel", args.loglevel]
    app.main()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from streams.demo import run_demo

    return run_demo(_settings(args, checkpoint=args.checkpoint), users=args.users, hold=args.hold)


def cmd_topics(args: argparse.Namespace) -> int:
    from streams.topics import all_topics, ensure_topics

    settings = _settings(args)
    counts = ensure_topics(settings, all_topics(settings))
    for name, n in sorted(counts.items()):
        print(f"{name}\t{n} partitions")
    return 0


def cmd_smoke(args: argparse.Namespace) -> int:
    import orjson
    from kafka import KafkaProducer

    from state.keys import Keys
    from streams.security import kafka_python_config, redis_sync
    from streams.topics import ensure_topics
    from streams.workerproc import WorkerProcess

    settings = _settings(args, web_port=0)
    topic = f"{settings.prefix}.smoke"
    ensure_topics(settings, [topic])
    r, smoke = redis_sync(settings), Keys(settings.prefix).smoke
    run = f"{time.time_ns():x}"
    keys = [f"{run}-{i}" for i in range(args.messages)]
    r.delete(*(smoke(k) for k in keys))
    with WorkerProcess(settings, app="smoke"):
        producer = KafkaProducer(**kafka_python_config(settings))
        t0 = time.monotonic()
        for i, key in enumerate(keys):
            producer.send(topic, key=key.encode(), value=orjson.dumps({"n": i, "run": run}))
        producer.flush()
        producer.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and r.exists(*(smoke(k) for k in keys)) < len(keys):
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
    got = [r.get(smoke(k)) for k in keys]
    print(f"{'key':<24} {'partition':>9} {'offset':>7}  value")
    for key, raw in zip(keys, got, strict=False):
        rec = orjson.loads(raw) if raw else None
        if rec:
            print(f"{key:<24} {rec['partition']:>9} {rec['offset']:>7}  {orjson.dumps(rec['value']).decode()}")
    arrived = sum(raw is not None for raw in got)
    print(f"{arrived}/{len(keys)} messages went Kafka → Faust agent → Redis in {elapsed:.2f}s")
    return 0 if arrived == len(keys) else 1


def cmd_replay(args: argparse.Namespace) -> int:
    from models.data import load
    from streams.replay import expected_seq, plan, send_events, send_items, wait_for_vectors
    from streams.topics import ensure_topics

    settings = _settings(args)
    if args.events:
        from models.data import load_files
        from models.files import Rejects

        with Rejects(args.rejects) as rejects:  # an event of a scenario without a topic is rejected
            ds = load_files(args.events, args.items, rejects, scenarios=settings.scenarios)
        if rejects.total:
            print(rejects.summary(), file=sys.stderr)
    else:
        ds = load(args.dataset)
    ensure_topics(settings)
    p = plan(ds, args.max_users, args.max_events)
    if not args.no_items and (not args.events or args.items):
        send_items(settings, ds, p.items)
    rate = send_events(settings, ds, p.events, rate=args.rate, speedup=args.speedup)
    print(f"sent {len(p.events)} events of {len(expected_seq(ds, p.events))} users at {rate:.0f} events/s")
    if args.wait:
        behind = wait_for_vectors(settings, expected_seq(ds, p.events), timeout=args.wait)
        print(
            f"{len(behind)} users still behind after {args.wait:.0f}s" if behind else "every user's vectors are fresh"
        )
        return 1 if behind else 0
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from models.files import Rejects
    from streams.backfill import run_backfill

    settings = _settings(args, checkpoint=args.checkpoint)
    with Rejects(args.rejects) as rejects:
        report = run_backfill(
            settings,
            [args.events],
            [args.items] if args.items else None,
            until=args.until,
            rejects=rejects,
            buckets=args.buckets,
            users_per_batch=args.users_per_batch,
            refine_batch=args.refine_batch,
        )
    print(report.line())
    print(rejects.summary())
    return 0


def cmd_quarantine(args: argparse.Namespace) -> int:
    import asyncio

    from state.store import StreamStore
    from streams.security import redis_async

    settings = _settings(args)

    async def run() -> int:
        store = StreamStore(redis_async(settings), settings.prefix)
        try:
            entries = await store.quarantined()
            for user, entry in sorted(entries.items()):
                print(f"{user}\tseq {entry['seq']}\tpartition {entry['partition']}\t{entry['reason']}")
            if args.retry:
                print(f"marked {await store.retry_quarantined()} users dirty again", file=sys.stderr)
            return len(entries)
        finally:
            await store.close()

    n = asyncio.run(run())
    print(f"{n} quarantined users", file=sys.stderr)
    return 0


def cmd_lookup(args: argparse.Namespace) -> int:
    import orjson

    from streams.security import interest_reader

    settings = _settings(args)
    found = interest_reader(settings).interests(args.user, args.model_version)
    if found is None:
        at = f" of model version {args.model_version!r}" if args.model_version else ""
        print(f"no interest vectors{at} for user {args.user!r} yet", file=sys.stderr)
        return 1
    body = found.to_json()
    if not args.full:
        body["vectors"] = {s: [[round(x, 4) for x in v[:6]] + ["..."] for v in vs] for s, vs in body["vectors"].items()}
    print(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from streams.search import ItemSearch

    settings = _settings(args)
    search = ItemSearch(settings)
    hits = search.for_user(args.user, scenario=args.scenario, k=args.k)
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>3}  {hit.score:.4f}  interest {hit.interest}  {hit.item_id}  {hit.title}")
    return 0 if hits else 1


def cmd_recode(args: argparse.Namespace) -> int:
    import asyncio

    from tqdm import tqdm

    from models.user_model import Checkpoint
    from state.store import StreamStore
    from streams.security import redis_async
    from streams.switch import Codebooks, recode_items

    settings = _settings(args, checkpoint=args.checkpoint)
    ckpt = Checkpoint.load(settings.checkpoint)

    async def run() -> int:
        store = StreamStore(redis_async(settings), settings.prefix)
        codebooks = Codebooks(store, ckpt.codebook)
        await codebooks.publish()
        if args.force:
            await store.mark_recoded(codebooks.own_id, done=False)
        total = await store.item_count()
        with tqdm(total=total, desc=f"items → codebook {codebooks.own_id}", unit="item") as bar:
            done = await recode_items(store, codebooks, progress=bar.update)
        await store.close()
        return done

    done = asyncio.run(run())
    print(f"re-encoded {done} items into codebook {ckpt.codebook_id} (checkpoint version {ckpt.version})")
    return 0


BENCH_PARTS = (
    "codebook",
    "coarse",
    "refiner",
    "planner",
    "items",
    "ingest",
    "freshness",
    "memory",
    "soak",
    "quality",
    "temporal",
    "backfill",
)


def cmd_bench(args: argparse.Namespace) -> int:
    from streams import bench as online

    parts = BENCH_PARTS if args.part == "all" else (args.part,)
    settings = _settings(args, checkpoint=args.checkpoint)
    try:
        _bench_parts(args, parts, settings)
    finally:
        if not args.keep:
            try:
                topics, keys = online.drop_runs(settings)
            except Exception as exc:  # a failed clean-up must not hide the bench's own error
                print(f"bench: could not delete the runs' topics and keys: {exc!r}", file=sys.stderr)
            else:
                if topics or keys:
                    print(f"\nbench: deleted the runs' {topics} topics and {keys:,} Redis keys (--keep keeps them)")
    return 0


def _bench_parts(args: argparse.Namespace, parts: tuple[str, ...], settings: Settings) -> None:
    from models import bench as offline
    from streams import bench as online

    users = args.users or 100
    for part in parts:
        print(f"\n## bench {part}\n", flush=True)
        if part == "codebook":
            offline.bench_codebook(args.dataset or "ml-100k", out=args.out)
        elif part == "coarse":
            offline.bench_coarse(out=args.out)
        elif part == "refiner":
            offline.bench_refiner(backbones=tuple(args.backbones), out=args.out)
        elif part == "planner":
            from streams.bench_planner import bench_planner

            bench_planner(online.ensure_checkpoint(settings), users=args.users or 250, out=args.out)
        elif part == "items":
            online.bench_items(items=args.items, sample=args.sample, repeats=args.repeat, out=args.out)
        elif part == "ingest":
            online.bench_ingest(
                settings, users=users, repeats=args.repeat, naive_seconds=args.naive_seconds, out=args.out
            )
        elif part == "freshness":
            online.bench_freshness(settings, users=users, rates=tuple(args.rates), zipf=args.zipf, out=args.out)
        elif part == "memory":
            online.bench_memory(settings, soak_events=args.soak_events, out=args.out)
        elif part == "soak":
            from streams.soak import bench_soak

            bench_soak(settings, users=args.users or 100_000, out=args.out)
        elif part == "quality":
            offline.bench_quality(args.dataset or "sim", out=args.out)
        elif part == "temporal":  # the README's headline table (global time split, three seeds)
            from models.temporal_run import run_temporal

            dataset = args.dataset or "ml-100k"
            run_temporal(dataset=dataset, out=f"{args.out}/temporal-{dataset}")
        elif part == "backfill":
            from streams.bench_backfill import bench_backfill

            bench_backfill(
                settings,
                users=args.users or 100_000,
                events_per_user=args.events_per_user,
                stream_users=args.stream_users,
                out=args.out,
            )


def cmd_train(args: argparse.Namespace) -> int:
    from models.train import TrainConfig, run_train

    overrides = {
        k: getattr(args, k)
        for k in (
            "dataset",
            "steps",
            "backbone",
            "backbone_layers",
            "interests",
            "max_users",
            "seed",
            "item_backbone",
            "item_layers",
            "item_dtype",
            "served_weight",
            "dmil_weight",
            "log_q",
            "log_q_strength",
            "id_embeddings",
            "trend",
            "trend_tau_days",
            "trend_gain",
            "serve_tau_days",
            "sampler",
            "horizon_days",
            "cut_quantile",
            "events",
            "items",
            "rejects",
        )
        if getattr(args, k) is not None
    }
    run_train(TrainConfig(**overrides), args.out, progress=not args.quiet)
    if args.evaluate and args.cut_quantile is not None:
        print("trained on a time cut: score it with `mirstream evaluate --protocol temporal` (leave-last skipped)")
    elif args.evaluate:
        from models.evaluate import run_evaluate

        run_evaluate(args.out, progress=not args.quiet)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.events or args.items:  # a user's files: the leave-last protocol with a checkpoint trained on them
        if not (args.events and args.items):
            print("evaluate on files needs both --events and --items", file=sys.stderr)
            return 2
        from models.evaluate import run_evaluate

        run_evaluate(
            args.checkpoint or "runs/demo",
            variants=args.variants,
            events=args.events,
            items=args.items,
            rejects=args.rejects,
        )
        return 0
    # Without a checkpoint the headline protocol runs (it trains every method on the pre-cut data itself).
    protocol = args.protocol or ("leave-last" if args.checkpoint else "temporal")
    if protocol == "temporal":
        from models.temporal_run import MODELS, merge_reports, run_temporal

        if args.through_stream:
            from streams.through_stream import run_through_stream

            run_through_stream(
                _settings(args),
                dataset=args.dataset or "ml-100k",
                model=(args.models or [None])[0],
                seed=args.seeds[0],
                choices_from=args.choices_from,
                out=args.out or "runs/through-stream",
                threads=args.threads,
                checkpoint=args.checkpoint,
            )
            return 0
        if args.merge:
            print(merge_reports(args.merge, args.out or "runs/temporal")["test"].keys())
            return 0
        if args.merge_validation:
            from models.temporal_run import markdown_validation, merge_validation

            merged = merge_validation(args.merge_validation, args.out or "runs/temporal-valid")
            print(markdown_validation(merged))
            print(f"choices: {merged['choices']}")
            return 0

        models = tuple(args.models) if args.models else ("full", "hybrid", "hybrid_k1")
        unknown = [m for m in models if m not in MODELS]
        if unknown:
            print(f"unknown model(s) {unknown}: choose from {sorted(MODELS)}", file=sys.stderr)
            return 2
        from models.train import TrainConfig

        item_text = {k: getattr(args, k) for k in ("item_layers", "item_dtype") if getattr(args, k) is not None}
        run_temporal(
            dataset=args.dataset or "ml-100k",
            base=TrainConfig(item_tower_epochs=1, **item_text),
            seeds=tuple(args.seeds),
            models=models,
            steps_grid=tuple(args.steps),
            out=args.out or "runs/temporal",
            threads=args.threads,
            validation_only=args.validation_only,
            sasrec=not args.no_sasrec,
            reuse=args.choices_from,
            trend_gains=tuple(args.trend_gains),
            serve_taus=tuple(args.serve_taus),
            validation_seed=args.validation_seed,
        )
        return 0
    from models.evaluate import run_evaluate

    run_evaluate(args.checkpoint or "runs/demo", variants=args.variants, progress=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirstream", description="Fresh multi-interest user vectors from Kafka to Redis."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="run a Faust worker")
    _add_connection_flags(p)
    p.add_argument("--app", choices=["pipeline", "smoke", "noop"], default="pipeline")
    p.add_argument("--web-port", type=int, help="Faust web port (metrics, lookups, /ui pages); 0 disables")
    p.add_argument("--web-bind", help="address the web server binds to (default 127.0.0.1; others need a token)")
    p.add_argument("--checkpoint", help="model checkpoint folder (default runs/demo)")
    p.add_argument("-l", "--loglevel", default="info", choices=["crit", "error", "warn", "info", "debug"])
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("topics", help="create the topics (same partition count for every scenario)")
    _add_connection_flags(p)
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("demo", help="the README's main job: train a small model, stream a replay, show fresh vectors")
    _add_connection_flags(p)
    p.add_argument("--users", type=int, default=40, help="users of the simulator to replay")
    p.add_argument("--hold", type=float, default=0, help="keep the worker (and its /ui pages) up this many seconds")
    p.add_argument("--checkpoint", help="model folder (trained there first when missing; default runs/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("smoke", help="send messages through Kafka → a Faust agent → Redis and print them")
    _add_connection_flags(p)
    p.add_argument("--messages", type=int, default=8)
    p.set_defaults(func=cmd_smoke)
    p = sub.add_parser("replay", help="produce a dataset's items and events into the topics, in time order")
    _add_connection_flags(p)
    p.add_argument("--dataset", default="sim", help="sim (default, three scenarios) or ml-100k")
    p.add_argument("--max-users", type=int)
    p.add_argument("--max-events", type=int)
    p.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    p.add_argument("--speedup", type=float, help="keep the events' own timing, N times faster than real time")
    p.add_argument("--no-items", action="store_true", help="do not send the items first")
    _add_file_flags(p)
    p.add_argument("--wait", type=float, default=0, help="then wait up to N s until every user's vectors are fresh")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser(
        "backfill",
        help="fill Redis from event files in batch: the state the stream would write; hands over to the stream",
    )
    _add_connection_flags(p)
    _add_file_flags(p)
    p.add_argument("--checkpoint", help="model folder (default runs/demo): the one the workers will run")
    p.add_argument("--until", type=float, help="the cut: only events with ts <= UNTIL (seconds)")
    p.add_argument("--buckets", type=int, default=16, help="spill files by user hash (memory: one bucket at a time)")
    p.add_argument("--users-per-batch", type=int, default=1024, help="users per plan/apply round")
    p.add_argument("--refine-batch", type=int, default=256, help="users per refiner call")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("lookup", help="print a user's interest vectors and their freshness")
    _add_connection_flags(p)
    p.add_argument("user")
    p.add_argument("--full", action="store_true", help="print whole vectors")
    p.add_argument("--model-version", help="the vectors one model version wrote (default: the latest)")
    p.set_defaults(func=cmd_lookup)

    p = sub.add_parser("quarantine", help="users whose refinement failed on their data, with the reason")
    _add_connection_flags(p)
    p.add_argument("--retry", action="store_true", help="mark them dirty again (after the data was fixed)")
    p.set_defaults(func=cmd_quarantine)

    p = sub.add_parser(
        "recode", help="after a codebook change: give every stored item a code of this checkpoint's codebook"
    )
    _add_connection_flags(p)
    p.add_argument("--checkpoint", help="model folder (default runs/demo)")
    p.add_argument("--force", action="store_true", help="scan again even if a worker already finished the pass")
    p.set_defaults(func=cmd_recode)

    p = sub.add_parser("search", help="top items for a user: faiss top-k per interest, merged by max score")
    _add_connection_flags(p)
    p.add_argument("user")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--scenario", help="use this scenario's vectors (default: all)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser(
        "bench",
        help="measured figures with their baselines: " + ", ".join(BENCH_PARTS) + " or all",
        description="Offline parts (codebook, coarse, refiner, planner, items, quality, temporal) need no services; "
        "ingest, freshness and memory run real workers against the Kafka + Redis given (deploy/stack.py up starts "
        "local ones).",
    )
    _add_connection_flags(p)
    p.add_argument("part", choices=[*BENCH_PARTS, "all"])
    p.add_argument(
        "--users",
        type=int,
        help="ingest, freshness: simulator users to replay (about 110 events each; default 100); "
        "soak: distinct users (default 100,000); backfill: synthetic users (default 100,000); "
        "planner: users in a planned batch (default 250)",
    )
    p.add_argument("--events-per-user", type=int, default=50, help="backfill: events per synthetic user")
    p.add_argument(
        "--stream-users", type=int, default=2_000, help="backfill: users whose events the stream side runs (0: all)"
    )
    p.add_argument("--rates", type=float, nargs="*", default=[200, 1000, 5000], help="offered rates for freshness")
    p.add_argument(
        "--zipf", type=float, default=0.0, help="freshness: user activity by Zipf's law with this exponent (0: even)"
    )
    p.add_argument(
        "--items", type=int, default=1682, help="items: catalogue texts (ML-100K titles, synthetic past 1,682)"
    )
    p.add_argument("--sample", type=int, default=128, help="items: texts both paths encode, alternated, for the ratio")
    p.add_argument("--repeat", type=int, default=3, help="items, ingest: repeats (medians are reported)")
    p.add_argument("--soak-events", type=int, default=100_000, help="events of the memory soak")
    p.add_argument("--naive-seconds", type=float, default=900.0, help="ingest: stop the naive baseline after this long")
    p.add_argument(
        "--keep", action="store_true", help="keep the runs' topics and Redis keys (deleted at the end by default)"
    )
    p.add_argument(
        "--backbones",
        nargs="*",
        default=["tiny", "smollm2:4", "smollm2"],
        help="refiner backbones to compare (name or name:first_n_layers)",
    )
    p.add_argument("--dataset", help="codebook, temporal: ml-100k (default) or sim; quality: sim (default) or ml-100k")
    p.add_argument("--checkpoint", help="model folder (default runs/demo; trained on the simulator when missing)")
    p.add_argument("--out", default="bench", help="folder for the JSON results")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("train", help="train item tower → codebook → coarse + refiner; writes a checkpoint")
    p.add_argument("--dataset", help="ml-100k (default) or sim (multi-scenario simulator)")
    p.add_argument("--out", default="runs/demo", help="checkpoint folder (default: runs/demo)")
    p.add_argument("--steps", type=int, help="optimiser steps of the user model (default 300)")
    p.add_argument("--backbone", help="refiner backbone: tiny (default), smollm2, or a local folder")
    p.add_argument("--backbone-layers", type=int, help="keep only the first N layers of the refiner backbone")
    p.add_argument("--item-backbone", help="item tower LLM for text datasets (default smollm2)")
    p.add_argument("--item-layers", type=int, help="item tower LLM: its first N layers (default: TrainConfig's)")
    p.add_argument("--item-dtype", choices=["float32", "bfloat16"], help="item tower LLM run type")
    p.add_argument("--interests", type=int, help="K interest vectors per scenario")
    p.add_argument("--max-users", type=int, help="train on the first N users only")
    p.add_argument(
        "--served-weight", type=float, help="weight of the loss on the served (max-over-interests) score (default 1)"
    )
    p.add_argument("--dmil-weight", type=float, help="weight of the DMIL matched-interest loss (default 1)")
    p.add_argument(
        "--log-q",
        action=argparse.BooleanOptionalAction,
        help="correct the candidates' logits for popularity sampling (default on)",
    )
    p.add_argument(
        "--id-embeddings",
        action=argparse.BooleanOptionalAction,
        help="learned item-ID embeddings fused with the content vector (items seen in training; default off)",
    )
    p.add_argument(
        "--trend",
        action=argparse.BooleanOptionalAction,
        help="one more served dimension: a learned weight on the item's log(1 + decayed count) (default off)",
    )
    p.add_argument(
        "--log-q-strength", type=float, help="factor on the logQ correction in training (default 1: all of it)"
    )
    p.add_argument("--trend-tau-days", type=float, help="time constant of the decayed item counts (default 30)")
    p.add_argument("--trend-gain", type=float, help="serve this factor × the learned trend weight (default 1)")
    p.add_argument("--serve-tau-days", type=float, help="serve the trend read with this τ (default: the training τ)")
    p.add_argument("--sampler", choices=["random", "global"], help="training samples: random cuts or global times")
    p.add_argument("--horizon-days", type=float, help="global sampler: how far ahead targets are taken (default 21)")
    p.add_argument(
        "--cut-quantile", type=float, help="train only on events before this time quantile (temporal protocol: 0.9)"
    )
    p.add_argument("--seed", type=int)
    _add_file_flags(p)
    p.add_argument("--evaluate", action="store_true", help="run `evaluate` on the new checkpoint afterwards")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate",
        help="quality against baselines: --protocol temporal (global time split, trains every method itself) "
        "or leave-last (the checkpoint, last W events per user held out)",
    )
    p.add_argument("checkpoint", nargs="?", help="leave-last protocol: the checkpoint to score")
    p.add_argument(
        "--protocol",
        choices=["temporal", "leave-last"],
        help="temporal (default without a checkpoint): train before the 0.9 time quantile, choose on the 0.8 "
        "cut, score what comes after; leave-last (default with one): the checkpoint's last-W-out split",
    )
    p.add_argument("--dataset", help="temporal: ml-100k (default) or sim")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="temporal: seeds of the test runs")
    p.add_argument("--models", nargs="*", help="temporal: user models (default: full hybrid hybrid_k1)")
    p.add_argument("--steps", type=int, nargs="*", default=[300], help="temporal: steps grid chosen on validation")
    p.add_argument("--threads", type=int, default=2, help="temporal: torch threads")
    p.add_argument(
        "--trend-gains",
        type=float,
        nargs="*",
        default=[0.5, 1.0, 2.0, 4.0],
        help="temporal: factors on the learned trend weight tried at serving on validation (default 0.5 1 2 4)",
    )
    p.add_argument(
        "--serve-taus",
        type=float,
        nargs="*",
        default=[7.0, 14.0, 30.0],
        help="temporal: trend time constants (days) tried at serving on validation besides the training one "
        "(default 7 14 30)",
    )
    p.add_argument("--validation-only", action="store_true", help="temporal: the validation cut only (ablations)")
    p.add_argument(
        "--validation-seed",
        type=int,
        default=0,
        help="temporal: seed of the validation phase's item tower and user models (default 0; a second one "
        "repeats the validation choices' runs to average them)",
    )
    p.add_argument("--no-sasrec", action="store_true", help="temporal: leave the SASRec-style baseline out")
    p.add_argument("--item-layers", type=int, help="temporal: the item tower LLM's first N layers")
    p.add_argument("--item-dtype", choices=["float32", "bfloat16"], help="temporal: the item tower LLM's run type")
    p.add_argument(
        "--choices-from", help="temporal: an earlier run's temporal.json: reuse its validation choices, test only"
    )
    p.add_argument(
        "--through-stream",
        action="store_true",
        help="temporal: train one model (first of --models, default the chosen hybrid variant; first seed) before "
        "the cut, replay "
        "the pre-cut events through a real worker and score the vectors read back from Redis against the "
        "offline figure (needs Kafka and Redis: see the connection flags)",
    )
    p.add_argument("--merge", nargs="*", help="temporal: merge the per-seed results of runs with the same choices")
    p.add_argument(
        "--merge-validation",
        nargs="*",
        help="temporal: --validation-only runs' temporal.json (several --validation-seed values, and runs of "
        "one seed holding different models): average each model over the seeds and make the choices on the "
        "averages; the result is a --choices-from file",
    )
    p.add_argument("--out", help="temporal: folder for temporal.json / temporal.md (default runs/temporal)")
    p.add_argument(
        "--variants",
        nargs="*",
        help="subset of: sasrec comirec no_coarse raw_vectors k1 single_scenario shared_queries (default: all)",
    )
    _add_connection_flags(p)
    _add_file_flags(p)
    p.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from streams.retry import EXIT_FATAL
    from streams.security import AuthFailure

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AuthFailure as exc:  # refused credentials or certificates: one line, no traceback, no retry
        print(f"mirstream {args.command}: {exc}", file=sys.stderr)
        return EXIT_FATAL
    except ValueError as exc:
        if str(exc).startswith(("MIRSTREAM_", "kafka_", "redis_")):  # a bad setting (Settings.validate)
            print(f"mirstream {args.command}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
