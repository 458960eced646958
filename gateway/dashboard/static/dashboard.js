// ArqonBus dashboard: no build step, no dependencies. Data comes over two WebSockets of
// this gateway: /dashboard/feed (a snapshot every heartbeat interval) and /dashboard/tail
// (an ordinary ArqonBus session, so the tail is a subscriber like any other). Both are
// authenticated by the HttpOnly cookie that /dashboard/login sets. Every value is written
// with textContent, never as HTML.
"use strict";

const HISTORY = 120; // points on the rate chart
const TAIL_ROWS = 200;
const $ = (id) => document.getElementById(id);
const rates = []; // [{in, out}]
let feed = null;
let tail = null;
let traceViewerUrl = "";
let signedIn = false;

function wsUrl(path) {
  return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + path;
}

function setStatus(text) { $("status").textContent = text; }

function showLogin(message) {
  $("app").hidden = true;
  $("signout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  setStatus("signed out");
}

function openFeed() {
  feed = new WebSocket(wsUrl("/dashboard/feed"));
  let opened = false;
  feed.onopen = () => { opened = true; signedIn = true; setStatus("live"); };
  feed.onmessage = (msg) => render(JSON.parse(msg.data));
  feed.onclose = () => {
    if (!opened) { showLogin(signedIn ? "the gateway refused the credential" : ""); return; }
    setStatus("reconnecting…");
    setTimeout(openFeed, 1000); // the gateway restarted or drained: come back
  };
}

async function signIn(event) {
  event.preventDefault();
  const token = $("token").value.trim();
  const reply = await fetch("/dashboard/login", {
    headers: { Authorization: "Bearer " + token }, credentials: "same-origin", cache: "no-store",
  });
  const body = await reply.json().catch(() => ({}));
  if (!reply.ok) { $("login-error").textContent = body.message || reply.statusText; return; }
  $("token").value = "";
  $("login").hidden = true;
  $("whoami").textContent = body.principal + " @ " + body.tenant + " (" + body.role + ")";
  openFeed();
}

async function signOut() {
  await fetch("/dashboard/logout", { credentials: "same-origin" });
  signedIn = false;
  if (feed) { feed.onclose = null; feed.close(); }
  if (tail) { tail.close(); }
  showLogin("");
}

// -- rendering ------------------------------------------------------------------------

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fillTable(id, items, columns) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren(...items.map((item) => {
    const row = document.createElement("tr");
    columns.forEach((col) => cell(row, col(item)));
    return row;
  }));
}

function fmtRate(x) { return x >= 100 ? x.toFixed(0) : x.toFixed(1); }
function fmtBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function fmtUptime(s) {
  if (s < 120) return s.toFixed(0) + " s";
  if (s < 7200) return (s / 60).toFixed(0) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function render(snap) {
  if (snap.type !== "snapshot") return;
  $("app").hidden = false;
  $("signout").hidden = false;
  traceViewerUrl = snap.trace_viewer_url || "";
  const gws = snap.gateways;
  const sum = (key) => gws.reduce((acc, g) => acc + g[key], 0);
  const rin = sum("msgs_in_per_s"), rout = sum("msgs_out_per_s");
  $("n-gateways").textContent = gws.length;
  $("n-nats").textContent = snap.nats.filter((n) => n.reachable).length + " / " + snap.nats.length;
  $("n-connections").textContent = sum("connections");
  $("n-tenant-connections").textContent = snap.connections.tenant;
  $("rate-in").textContent = fmtRate(rin);
  $("rate-out").textContent = fmtRate(rout);
  fillTable("gateways", gws, [
    (g) => g.node + (g.node === snap.node ? " (this)" : ""), (g) => g.region || "–",
    (g) => g.version, (g) => fmtUptime(g.uptime_s), (g) => g.connections,
    (g) => fmtRate(g.msgs_in_per_s), (g) => fmtRate(g.msgs_out_per_s),
    (g) => g.nats.name || g.nats.url,
  ]);
  fillTable("nats", snap.nats, [
    (n) => n.name || "?", (n) => n.url, (n) => n.version || "–", (n) => n.cluster || "–",
    (n) => (n.jetstream ? "yes" : "no"),
    (n) => (!n.reachable ? "unreachable" : n.connected ? "up (this gateway's)" : "up"),
  ]);
  fillTable("channels", snap.channels, [(c) => c.room, (c) => c.channel, (c) => c.members]);
  $("stream-tenant").textContent = snap.tenant;
  const s = snap.stream;
  fillTable("stream", s ? [
    ["events", s.messages], ["bytes", fmtBytes(s.bytes)], ["first seq", s.first_seq],
    ["last seq", s.last_seq],
  ] : [["stream", "unavailable"]], [(r) => r[0], (r) => r[1]]);
  $("errors").textContent = snap.errors.join("; ");
  rates.push({ in: rin, out: rout });
  if (rates.length > HISTORY) rates.shift();
  drawChart();
}

function drawChart() {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 30;
  ctx.clearRect(0, 0, w, h);
  const top = Math.max(1, ...rates.map((r) => Math.max(r.in, r.out)));
  ctx.strokeStyle = "#dde"; ctx.fillStyle = "#667"; ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = pad / 2 + (h - pad) * i / 4;
    ctx.beginPath(); ctx.moveTo(pad + 10, y); ctx.lineTo(w, y); ctx.stroke();
    ctx.fillText(fmtRate(top * (4 - i) / 4), 0, y + 4);
  }
  const line = (key, color) => {
    ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath();
    rates.forEach((r, i) => {
      const x = pad + 10 + (w - pad - 10) * i / Math.max(rates.length - 1, 1);
      const y = pad / 2 + (h - pad) * (1 - r[key] / top);
      if (i) ctx.lineTo(x, y); else ctx.moveTo(x, y);
    });
    ctx.stroke(); ctx.lineWidth = 1;
  };
  line("in", "#2a7ae2");
  line("out", "#e2762a");
}

// -- live tail: an ArqonBus subscriber ----------------------------------------------------

function traceId(trace) {
  // The envelope's optional trace field: a W3C traceparent, alone or in an object.
  const parent = typeof trace === "string" ? trace : trace && trace.traceparent;
  const parts = typeof parent === "string" ? parent.split("-") : [];
  return parts.length >= 4 ? parts[1] : "";
}

function tailRow(env) {
  const row = document.createElement("tr");
  cell(row, env.seq);
  cell(row, (env.timestamp || "").replace("T", " ").replace("Z", ""));
  cell(row, env.from || "");
  cell(row, JSON.stringify(env.payload), "payload");
  const id = traceId(env.trace);
  const td = cell(row, traceViewerUrl ? "" : id);
  if (id && traceViewerUrl) {
    const a = document.createElement("a");
    a.href = traceViewerUrl.replace("{trace_id}", id);
    a.target = "_blank"; a.rel = "noopener"; a.textContent = id;
    td.appendChild(a);
  }
  row.dataset.text = JSON.stringify(env).toLowerCase();
  applyFilter(row);
  const body = $("tail").querySelector("tbody");
  body.prepend(row);
  while (body.rows.length > TAIL_ROWS) body.deleteRow(-1);
}

function applyFilter(row) {
  const needle = $("tail-filter").value.trim().toLowerCase();
  row.hidden = needle !== "" && !row.dataset.text.includes(needle);
}

function startTail(event) {
  event.preventDefault();
  if (tail) tail.close();
  $("tail").querySelector("tbody").replaceChildren();
  const room = $("tail-room").value.trim(), channel = $("tail-channel").value.trim();
  const ws = new WebSocket(wsUrl("/dashboard/tail"));
  tail = ws;
  $("tail-status").textContent = "connecting…";
  ws.onmessage = (msg) => {
    const env = JSON.parse(msg.data);
    if (env.type === "welcome") {
      ws.send(JSON.stringify({
        version: "1.0", id: "dash_" + Date.now(), type: "command", room, channel,
        payload: { command: "join_channel", parameters: {} },
      }));
    } else if (env.type === "command_response") {
      const ok = env.payload.status === "success";
      $("tail-status").textContent = ok
        ? "tailing " + room + "/" + channel + " from seq " + env.payload.result.last_seq
        : "refused: " + (env.payload.error && env.payload.error.message || env.payload.status);
    } else if (env.type === "event" && env.room === room && env.channel === channel) {
      tailRow(env);
    } else if (env.type === "error") {
      $("tail-status").textContent = "error: " + (env.payload.message || env.payload.code);
    }
  };
  ws.onclose = (ev) => {
    if (tail === ws) $("tail-status").textContent = "closed (" + ev.code + ") " + ev.reason;
  };
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", signIn);
  $("signout").addEventListener("click", signOut);
  $("tail-form").addEventListener("submit", startTail);
  $("tail-filter").addEventListener("input", () => {
    $("tail").querySelectorAll("tbody tr").forEach(applyFilter);
  });
  openFeed(); // signed in already (the cookie)? else the login form shows
});
