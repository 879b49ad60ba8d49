// mirstream pages: renders /ui (the stream) and /ui/users/{id} from the worker's JSON, polled every second.
// No framework, no CDN: plain DOM and inline SVG.  Read-only: it only ever sends GET requests.
"use strict";

const POLL_MS = 1000;
const COLORS = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#bf3989", "#0a7ea4", "#57606a"];
const main = document.getElementById("main");
const live = document.getElementById("live");

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
function clock(ts) { // a wall-clock time (Kafka, writes): local HH:MM:SS
  return new Date(ts * 1000).toLocaleTimeString([], { hour12: false });
}
function stamp(ts) { // an event's own time: UTC date and time
  return new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}
function secs(s) { return s == null ? "–" : s < 10 ? s.toFixed(2) + " s" : s.toFixed(1) + " s"; }
function ago(s) { return s < 60 ? `${Math.max(0, s).toFixed(0)} s ago` : `${(s / 60).toFixed(1)} min ago`; }

async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
  if (r.status === 401) throw new Error("this worker needs its token: open the page with ?token=…");
  const ct = r.headers.get("Content-Type") || "";
  if (!ct.includes("json")) throw new Error(`worker answered ${r.status}`);
  return r.json();
}

function poll(url, render) {
  async function tick() {
    try {
      render(await getJSON(url));
      live.textContent = "live · updated " + clock(Date.now() / 1000);
      live.className = "muted";
    } catch (e) {
      live.textContent = "worker unreachable: " + e.message;
      live.className = "pending";
    }
    setTimeout(tick, POLL_MS);
  }
  tick();
}

// ------------------------------------------------------------------------------------------ user view
function notice(title, text, bad) {
  return `<div class="notice${bad ? " bad" : ""}" id="notice"><h1>${esc(title)}</h1><p>${esc(text)}</p></div>`;
}

function itemRows(hits, key, fmt) {
  const max = Math.max(1e-9, ...hits.map((h) => Math.abs(h[key])));
  return hits.map((h) => `<tr class="hit"><td>${esc(h.item ?? "?")}</td><td>${esc(h.title)}</td>` +
    `<td class="num">${fmt(h[key])} <span class="bar" style="width:${(40 * Math.abs(h[key]) / max).toFixed(0)}px"></span></td></tr>`).join("");
}

function freshness(d) {
  const v = d.vectors, a = d.applied || {};
  const pending = v.pending > 0 ? ` <span class="pending">${v.pending} newer event(s) applied, refinement pending</span>` : " (up to date with every applied event)";
  return `<div class="fresh" id="freshness">Vectors reflect events up to <b>${clock(v.produced_at)}</b>, ` +
    `written <b>${secs(v.freshness_s)}</b> after the last event reached Kafka · <span id="ago">${ago(d.now - v.updated_at)}</span> · ` +
    `model <code id="version">${esc(v.version)}</code> · <span id="seq">${v.seq}</span> events reflected` +
    ` of ${a.seq ?? v.seq} applied${pending}<br><span class="muted">event watermark: newest event time ` +
    `${stamp(v.event_ts)}; ${d.items} items in the catalogue</span></div>`;
}

function recent(d) {
  if (!d.recent || !d.recent.length) return `<p class="muted">${esc(d.recent_note || "no stored events")}</p>`;
  return `<table id="recent"><tr><th>time</th><th>scenario</th><th>action</th><th>item</th><th>text</th></tr>` +
    d.recent.map((e) => `<tr class="event"><td class="num">${stamp(e.ts)}</td><td>${esc(e.scenario)}</td>` +
      `<td>${esc(e.action)}</td><td>${esc(e.item ?? "?")}</td><td>${esc(e.title)}</td></tr>`).join("") + "</table>";
}

function coarse(d) {
  const c = d.coarse;
  if (!c) return "";
  if (!c.available) return `<h2>Coarse interests</h2><p class="muted" id="coarse">${esc(c.note)}</p>`;
  return `<h2>Coarse interests <span class="muted">(${esc(c.note)})</span></h2><div class="grid" id="coarse">` +
    c.interests.map((hits, i) => `<div class="card"><h3>coarse interest ${i}</h3><table>` +
      itemRows(hits, "weight", (x) => (100 * x).toFixed(1) + " %") + "</table></div>").join("") + "</div>";
}

let lastUser = "";
function renderUser(d) {
  const key = JSON.stringify({ ...d, now: 0 });
  const agoSpan = document.getElementById("ago");
  if (key === lastUser && agoSpan && d.vectors) { // nothing new: only the age moves (selections survive)
    agoSpan.textContent = ago(d.now - d.vectors.updated_at);
    return;
  }
  lastUser = key;
  document.title = `mirstream · user ${d.user}`;
  const head = `<h1>User <span id="user">${esc(d.user)}</span></h1>`;
  let html;
  if (d.status === "unknown") {
    html = head + notice("Unknown user", `No event of user ${d.user} has been applied: this worker's Redis has no state for it. Check the id (and the prefix of the deployment).`, true);
  } else if (d.status === "redis_down") {
    html = head + notice("Redis unreachable", `The worker cannot read Redis right now (${d.message}). The worker keeps running; this page retries every second.`, true);
  } else if (d.status === "no_vectors") {
    html = head + notice("No vectors yet", `${d.message}: the refiner has not written this user's interest vectors yet. This page updates by itself when it does.`, false) +
      `<h2>Recent events</h2>${recent(d)}` + coarse(d);
  } else {
    const k = d.vectors.k;
    const cards = d.scenarios.map((s) => `<div class="card scenario" data-scenario="${esc(s.scenario)}"><h3>${esc(s.scenario)}</h3>` +
      s.interests.map((hits, i) => `<div class="interest"><div class="label">interest ${i}</div><table>` +
        itemRows(hits, "score", (x) => x.toFixed(3)) + "</table></div>").join("") + "</div>").join("");
    html = head + freshness(d) +
      `<h2>Interests per scenario <span class="muted">(K = ${k} vectors each, their nearest items by inner product)</span></h2>` +
      `<div class="grid" id="scenarios">${cards}</div>` + `<h2>Recent events</h2>${recent(d)}` + coarse(d);
  }
  main.innerHTML = html;
  main.dataset.status = d.status;
}

// ------------------------------------------------------------------------------------------ stream view
function chart(id, title, t, series, unit) {
  const W = 360, H = 130, L = 34, B = 16;
  const names = Object.keys(series);
  const values = names.flatMap((n) => series[n].filter((x) => x != null));
  const top = Math.max(1e-9, ...values) * 1.1;
  const t0 = t.length ? t[0] : 0, t1 = t.length ? t[t.length - 1] : 1, span = Math.max(1, t1 - t0);
  const x = (ti) => L + (W - L - 4) * (ti - t0) / span, y = (v) => H - B - (H - B - 6) * v / top;
  const lines = names.map((n, i) => {
    let d = "", pen = "M";
    series[n].forEach((v, j) => { if (v == null) { pen = "M"; return; } d += `${pen}${x(t[j]).toFixed(1)},${y(v).toFixed(1)} `; pen = "L"; });
    return `<path d="${d}" fill="none" stroke="${COLORS[i % COLORS.length]}" stroke-width="1.5"/>`;
  }).join("");
  const fmt = (v) => v == null ? "–" : v >= 100 ? v.toFixed(0) : v.toFixed(2);
  const legend = names.map((n, i) => { const s = series[n], last = s.length ? s[s.length - 1] : null;
    return `<span><i style="background:${COLORS[i % COLORS.length]}"></i>${esc(n)} <b data-series="${esc(n)}">${fmt(last)}</b>${unit}</span>`; }).join("");
  return `<div class="card" id="${id}"><h3>${esc(title)}</h3><svg class="chart" viewBox="0 0 ${W} ${H}" preserveAspectRatio="none">` +
    `<line x1="${L}" y1="${H - B}" x2="${W}" y2="${H - B}" stroke="#dde3e8"/><line x1="${L}" y1="4" x2="${L}" y2="${H - B}" stroke="#dde3e8"/>` +
    `<text x="2" y="12">${fmt(top / 1.1)}</text><text x="2" y="${H - B}">0</text>` +
    `<text x="${L}" y="${H - 3}">−${(span / 60).toFixed(1)} min</text><text x="${W - 24}" y="${H - 3}">now</text>${lines}</svg>` +
    `<div class="legend">${legend || '<span class="muted">no samples yet</span>'}</div></div>`;
}

function renderStream(d) {
  document.title = "mirstream · stream";
  const n = d.t.length, keep = Math.max(0, n - 150); // the last 5 minutes of 2 s samples
  const cut = (s) => Object.fromEntries(Object.entries(s).map(([k, v]) => [k, v.slice(keep)]));
  const t = d.t.slice(keep);
  const rates = cut(d.events_per_s);
  const total = Object.values(rates).reduce((acc, v) => acc + (v.length ? v[v.length - 1] : 0), 0);
  const peak = Math.max(0, ...Object.values(rates).flatMap((v) => v));
  const dead = d.deadletter_last.map((x) => `<tr><td class="num">${clock(x.at)}</td><td>${esc(x.source)}</td>` +
    `<td>${esc(x.topic)}</td><td>${esc(x.reason)}</td></tr>`).join("");
  main.dataset.samples = t.length;
  main.innerHTML = `<h1>Stream <span class="muted">(this worker, sampled every 2 s)</span></h1>` +
    `<p>events/s now: <span class="big" id="rate-now">${total.toFixed(1)}</span> · peak over the window: ` +
    `<span class="big" id="rate-peak">${peak.toFixed(1)}</span> · dead letters: <span class="big" id="deadletters-total">${d.deadletter_total}</span></p>` +
    `<div class="charts">` +
    chart("chart-events", "events/s per scenario", t, rates, "/s") +
    chart("chart-lag", "consumer lag per partition", t, cut(d.lag), "") +
    chart("chart-queue", "refinement queue depth (users)", t, { queue: d.queue.slice(keep) }, "") +
    chart("chart-fresh", `freshness over the last ${d.window_s.toFixed(0)} s (Kafka → vectors)`, t,
      { p50: d.fresh_p50.slice(keep), p99: d.fresh_p99.slice(keep) }, " s") +
    `</div><h2>Dead letters</h2>` +
    (dead ? `<table id="deadletters"><tr><th>at</th><th>source</th><th>topic</th><th>reason</th></tr>${dead}</table>`
      : `<p class="muted" id="deadletters">none since this worker started</p>`);
}

// ------------------------------------------------------------------------------------------ routing
const path = location.pathname.replace(/\/+$/, "");
const m = path.match(/^\/ui\/users\/(.+)$/);
if (m) {
  const user = decodeURIComponent(m[1]);
  document.getElementById("find-id").value = user;
  poll(`/ui/api/users/${encodeURIComponent(user)}`, renderUser);
} else {
  poll("/ui/api/stream", renderStream);
}
