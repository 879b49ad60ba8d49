"""The read-only pages in a real browser (headless Chromium driven by Selenium) against a real worker on
real Kafka + Redis: the user page, its live update, the stream page, and the three pages that explain why
there is nothing to show (unknown user, no vectors yet, Redis unreachable).

Chromium and chromedriver come from Debian's ``chromium`` / ``chromium-driver`` packages (``deploy/install.sh``
installs them when apt is usable); without them these tests are skipped, with that reason.
``MIRSTREAM_UI_SCREENSHOTS=docs`` also saves the README's screenshots there.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import orjson
import pytest
from kafka import KafkaProducer

from models.data import load
from models.metrics import item_index
from state.store import InterestReader
from streams.replay import expected_seq, plan, send_events, send_items, wait_for_vectors
from streams.settings import Settings
from streams.topics import ensure_topics
from streams.workerproc import WorkerProcess

pytestmark = pytest.mark.integration
USERS = 3
TOKEN = "ui-test-token"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver", "/usr/lib/chromium/chromedriver")


def _which(names: tuple[str, ...]) -> str | None:
    return next((p for p in (shutil.which(n) for n in names) if p), None)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    binary, driver = _which(BROWSERS), _which(DRIVERS)
    if not binary or not driver:
        pytest.skip(
            "no Chromium + chromedriver on this machine (Debian: apt-get install chromium chromium-driver, which "
            "deploy/install.sh does when apt is usable)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100"):
        opts.add_argument(arg)
    d = webdriver.Chrome(options=opts, service=Service(driver))
    try:
        yield d
    finally:
        d.quit()


def _settings(kafka: str, redis: str, ckpt: Path, datadir: Path, **kw) -> Settings:
    from conftest import free_port

    tag = f"ui{int(time.time() * 1000) % 10**9}"
    return Settings(
        bootstrap_servers=kafka,
        redis_url=redis,
        prefix=tag,
        app_id=f"{tag}-app",
        datadir=str(datadir),
        web_port=free_port(),
        checkpoint=str(ckpt),
        partitions=3,
        refine_wait_ms=50,
        refine_debounce_ms=0,
        batch_wait_ms=20,
        **kw,
    )


@pytest.fixture(scope="module")
def ds():
    return load("sim")


@pytest.fixture(scope="module")
def worker(kafka_bootstrap, redis_url, sim_checkpoint, tmp_path_factory, ds) -> Iterator:
    """One worker with a token (on loopback, where it is optional: the browser must pass it anyway) and three
    users' events replayed until their vectors are fresh."""
    tmp = tmp_path_factory.mktemp("ui")
    settings = _settings(kafka_bootstrap, redis_url, sim_checkpoint, tmp / "faust", web_token=TOKEN)
    p = plan(ds, max_users=USERS)
    ensure_topics(settings)
    with WorkerProcess(settings, log=tmp / "worker.log") as w:
        send_items(settings, ds, p.items, progress=False)
        send_events(settings, ds, p.events, progress=False)
        assert wait_for_vectors(settings, expected_seq(ds, p.events), timeout=120, progress=False) == {}
        yield settings, w


def _base(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.web_port}"


def _wait(driver, condition, timeout: float = 60.0, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(condition, message=what)


#: What the page shows, read in one script call: the page re-renders as data arrives, so element handles
#: kept across polls would go stale.
READ = """
const q = (sel, root) => Array.from((root || document).querySelectorAll(sel));
const text = (id) => { const e = document.getElementById(id); return e ? e.innerText : null; };
const cells = (r) => q("td", r).map((td) => td.innerText);
return {
  status: document.getElementById("main").dataset.status || null,
  scenarios: Object.fromEntries(q(".scenario").map((c) => [c.dataset.scenario,
    q(".interest", c).map((i) => q("tr.hit", i).map(cells))])),
  recent: q("#recent tr.event").map(cells),
  coarse: q("#coarse .card").map((c) => q("tr.hit", c).length),
  seq: text("seq"), freshness: text("freshness"), notice: text("notice"),
  rate_now: text("rate-now"), deadletters_total: text("deadletters-total"), deadletters: text("deadletters"),
  charts: Object.fromEntries(q("svg.chart").map((s) => [s.parentNode.id, q("path", s).length])),
};
"""


def _read(driver) -> dict:
    return driver.execute_script(READ)


def _status(driver, status: str):
    return lambda d: _read(d)["status"] == status


def _screenshot(driver, name: str) -> None:
    out = os.environ.get("MIRSTREAM_UI_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(out) / name))


def _login(driver, settings: Settings) -> None:
    """``?token=`` once: the answer sets the cookie every later page and request carries."""
    driver.get(f"{_base(settings)}/ui?token={TOKEN}")


def test_token_guards_pages_but_not_metrics(worker):
    settings, _ = worker
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{_base(settings)}/ui/api/users/0")
    assert err.value.code == 401 and b"token" in err.value.read()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{_base(settings)}/users/0/interests")
    assert err.value.code == 401
    req = urllib.request.Request(f"{_base(settings)}/users/0/interests", headers={"Authorization": f"Bearer {TOKEN}"})
    assert orjson.loads(urllib.request.urlopen(req).read())["user_id"] == "0"
    assert urllib.request.urlopen(f"{_base(settings)}/metrics").status == 200


def test_user_page_shows_nearest_items_and_updates_live(worker, browser, ds):
    settings, _ = worker
    reader = InterestReader(settings.redis_url, settings.prefix)
    _login(browser, settings)
    browser.get(f"{_base(settings)}/ui/users/0")
    _wait(browser, _status(browser, "ok"), what="user page never showed vectors")

    # Each scenario's card lists, for each interest vector, the catalogue's nearest items: the top one is
    # what faiss over the items' stored retrieval vectors gives for that vector.
    ids, vectors = reader.item_vectors()
    index = item_index(vectors)
    found = reader.interests("0")
    titles = dict(zip(ids, reader.item_titles(ids), strict=True))
    page = _read(browser)
    assert sorted(page["scenarios"]) == sorted(settings.scenarios)
    for scenario, interests in page["scenarios"].items():
        assert len(interests) == found.vectors[scenario].shape[0]
        _, best = index.search(np.ascontiguousarray(found.vectors[scenario]), 1)
        for hits, j in zip(interests, best[:, 0], strict=True):
            assert hits[0][0] == ids[j] and hits[0][1] == titles[ids[j]]
    assert "after the last event reached Kafka" in page["freshness"] and found.version in page["freshness"]
    assert page["seq"] == str(found.seq) and page["recent"]
    assert page["coarse"] and all(n > 0 for n in page["coarse"])  # each coarse interest's heaviest events
    _screenshot(browser, "ui-user.png")

    # A new event for the user: the page follows without a reload (a marker set on the page survives).
    browser.execute_script("window.__sameDocument = true")
    seen = {row[3] for row in page["recent"]}
    item = next(i for i in ids if i not in seen)
    last_ts = float(ds.ts[ds.user_slice(0)].max())
    body = {"event_id": "ui-live-1", "user_id": "0", "item_id": item, "scenario": "ads", "action": "click"}
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    producer.send(settings.events_topic("ads"), key=b"0", value=orjson.dumps({**body, "ts": last_ts + 60}))
    producer.flush()
    producer.close()
    _wait(browser, lambda d: _read(d)["seq"] == str(found.seq + 1), what="the page did not follow the new event")
    top = _read(browser)["recent"][0]
    assert top[1:] == ["ads", "click", item, titles[item]]
    assert browser.execute_script("return window.__sameDocument === true")


def test_stream_page_shows_events_per_second_and_dead_letters(worker, browser, ds):
    settings, _ = worker
    _login(browser, settings)
    _wait(browser, lambda d: _read(d)["rate_now"] is not None, what="stream page did not render")
    # More users' events at a steady pace while the page watches, and one malformed message.
    p = plan(ds, max_users=USERS + 3)
    more = p.events[np.isin(ds.user[p.events], np.arange(USERS, USERS + 3))]
    sender = threading.Thread(target=send_events, args=(settings, ds, more), kwargs={"rate": 60, "progress": False})
    sender.start()
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    producer.send(settings.events_topic("feed"), key=b"9", value=b"not json")
    producer.flush()
    producer.close()
    try:
        _wait(browser, lambda d: float(_read(d)["rate_now"]) > 0, what="events/s never above 0 while events flowed")
        _wait(browser, lambda d: _read(d)["deadletters_total"] == "1", what="the dead letter was not counted")
        # every chart draws its series once samples of it exist (freshness needs a refinement in the window)
        _wait(browser, lambda d: all(n > 0 for n in _read(d)["charts"].values()), what="a chart drew no line")
        page = _read(browser)
        assert "malformed JSON" in page["deadletters"]
        assert sorted(page["charts"]) == ["chart-events", "chart-fresh", "chart-lag", "chart-queue"]
    finally:
        sender.join()
    if os.environ.get("MIRSTREAM_UI_SCREENSHOTS"):  # a minute of samples makes a readable picture
        _wait(browser, lambda d: int(d.execute_script("return document.getElementById('main').dataset.samples")) >= 30)
    _screenshot(browser, "ui-stream.png")


def test_unknown_user_page(worker, browser):
    settings, _ = worker
    _login(browser, settings)
    browser.get(f"{_base(settings)}/ui/users/nobody-here")
    _wait(browser, _status(browser, "unknown"), what="no unknown-user page")
    assert "Unknown user" in _read(browser)["notice"]


def test_no_vectors_yet_page(kafka_bootstrap, redis_url, sim_checkpoint, tmp_path, browser, ds):
    """A worker with refinement off applies events (state, history) and writes no vectors: the page says
    so and still lists the user's recent events."""
    settings = _settings(kafka_bootstrap, redis_url, sim_checkpoint, tmp_path / "faust", refine=False)
    p = plan(ds, max_users=1)
    ensure_topics(settings)
    with WorkerProcess(settings, log=tmp_path / "worker.log"):
        send_items(settings, ds, p.items, progress=False)
        send_events(settings, ds, p.events, progress=False)
        expected = expected_seq(ds, p.events)
        assert wait_for_vectors(settings, expected, timeout=120, progress=False, applied_only=True) == {}
        browser.get(f"{_base(settings)}/ui/users/0")
        _wait(browser, _status(browser, "no_vectors"), what="no no-vectors page")
        page = _read(browser)
        assert "No vectors yet" in page["notice"] and f"{expected['0']} events applied" in page["notice"]
        assert page["recent"]


def test_redis_unreachable_page_and_the_worker_keeps_running(worker, browser, services):
    settings, w = worker
    _login(browser, settings)
    browser.get(f"{_base(settings)}/ui/users/0")
    _wait(browser, _status(browser, "ok"), what="user page not ok before the outage")
    services.stop("redis")
    try:
        _wait(browser, _status(browser, "redis_down"), what="no Redis-unreachable page")
        assert "Redis unreachable" in _read(browser)["notice"]
        assert w.proc is not None and w.proc.poll() is None
    finally:
        services.start("redis")
    _wait(browser, _status(browser, "ok"), what="the page did not recover after Redis came back")
    assert w.proc.poll() is None
