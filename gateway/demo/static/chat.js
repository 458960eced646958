// The ArqonBus chat demo, on the JavaScript SDK (clients/js, bundled as arqonbus.min.js).
//
// One subscription per page, from seq 0: the room's stored lines first, then live ones, each
// exactly once and in seq order, also across a reconnect to another gateway (the SDK resumes
// from the last seq it handed over). The page keeps the newest MAX_LINES in view.
import { Client } from "/demo/arqonbus.min.js";

const CHANNEL = "general";
const MAX_LINES = 500;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const own = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
// Only gateways on this page's own host (any port): a link must not be able to send the
// token the user types to someone else's server.
function sameHost(url) {
  try {
    const parsed = new URL(url);
    return (parsed.protocol === "ws:" || parsed.protocol === "wss:") && parsed.hostname === location.hostname;
  } catch {
    return false;
  }
}
const asked = (params.get("gateways") || own).split(",").map((url) => url.trim()).filter(Boolean);
const gateways = asked.filter(sameHost).slice(0, 16);
if (gateways.length === 0) gateways.push(own);
const ignored = asked.filter((url) => !sameHost(url));
if (params.get("room")) $("room").value = params.get("room");
$("gateways").textContent = gateways.join(", ");
if (ignored.length) {
  $("signin-error").textContent = `ignored gateways not on ${location.hostname}: ${ignored.join(", ")}`;
}

let client = null;
let sub = null;
let room = null;
let lastShown = 0; // the seq of the last line shown: a line never shows twice
let sending = 0;

function setState(state, text) {
  const badge = $("state");
  badge.dataset.state = state;
  badge.textContent = text;
}

function showNode() {
  if (!client || !room) return;
  const node = client.welcome && client.welcome.node ? `, gateway ${client.welcome.node}` : "";
  $("room-title").textContent = `${room} / ${CHANNEL}${node}`;
}

function describe(error) {
  if (!error) return "";
  const code = error.code ? ` (${error.code})` : "";
  return `${error.message || String(error)}${code}`;
}

const states = []; // every state this page went through, for people and tests

function notice(text) {
  const li = document.createElement("li");
  li.className = "notice";
  li.textContent = text;
  append(li);
}

function onState(event) {
  const { state, url, error } = event.detail;
  const previous = states.length ? states[states.length - 1].state : null;
  states.push({ state, url: url ?? null });
  if (state === "connected") {
    setState("connected", `connected to ${url}`);
    showNode();
    if (previous === "resuming" && sub) notice(`resumed on ${url} after #${lastShown}: nothing missed, nothing twice`);
  } else if (state === "resuming") {
    setState("resuming", "connection lost: resuming on another gateway…");
    if (sub) notice(`connection to ${states.length > 1 ? states[states.length - 2].url : "the gateway"} lost after #${lastShown}`);
  }
  else if (state === "connecting") setState("connecting", "connecting…");
  else if (state === "closed") setState("closed", `closed${error ? ": " + describe(error) : ""}`);
}

function append(li) {
  const lines = $("lines");
  const atBottom = lines.scrollTop + lines.clientHeight >= lines.scrollHeight - 8;
  lines.append(li);
  while (lines.children.length > MAX_LINES) lines.firstElementChild.remove();
  if (atBottom) lines.scrollTop = lines.scrollHeight;
}

function showItem(item) {
  if (item.type === "gap") {
    const li = document.createElement("li");
    li.className = "gap";
    if (item.reason === "epoch") {
      // A regional failover: the new region's seqs continue after the fork point.
      lastShown = item.afterSeq;
      const lost = item.lostToSeq >= item.lostFromSeq && item.lostFromSeq > 0;
      li.textContent =
        `the room moved to another region (epoch ${item.epoch}) after #${item.afterSeq}` +
        (lost ? `; lines #${item.lostFromSeq}–#${item.lostToSeq} of the old region were not copied before it went down` : "");
    } else {
      li.textContent =
        `lines after #${item.afterSeq} up to #${item.firstAvailableSeq - 1} are no longer stored ` +
        "(the room's retention removed them before this page read them)";
    }
    append(li);
    return;
  }
  if (item.seq <= lastShown) return; // the SDK already guarantees this; the page checks too
  lastShown = item.seq;
  const li = document.createElement("li");
  li.dataset.seq = String(item.seq);
  li.dataset.id = item.id;
  const seq = document.createElement("span");
  seq.className = "seq";
  seq.textContent = `#${item.seq}`;
  const from = document.createElement("span");
  from.className = "from";
  from.textContent = item.from ?? "";
  const text = document.createElement("span");
  text.className = "text";
  const body = item.payload && typeof item.payload.text === "string" ? item.payload.text : JSON.stringify(item.payload);
  text.textContent = body;
  li.append(seq, from, text);
  append(li);
}

function showMembers() {
  const list = $("members");
  const members = [...sub.members.values()].sort((a, b) => a.principal.localeCompare(b.principal));
  list.replaceChildren(
    ...members.map((member) => {
      const li = document.createElement("li");
      li.dataset.principal = member.principal;
      li.dataset.state = member.state;
      li.textContent = member.state === "online" ? member.principal : `${member.principal} (${member.state})`;
      return li;
    }),
  );
  $("occupancy").textContent = `(${members.length})`;
}

async function readItems() {
  try {
    for await (const item of sub) showItem(item);
  } catch (error) {
    setState("closed", `subscription ended: ${describe(error)}`);
  }
}

async function join(event) {
  event.preventDefault();
  $("signin-error").textContent = "";
  const token = $("token").value.trim();
  room = $("room").value.trim();
  const button = event.submitter || $("signin").querySelector("button");
  button.disabled = true;
  try {
    client = new Client({ urls: gateways, token, auth: $("auth").value });
    client.addEventListener("state", onState);
    await client.connect();
    sub = await client.subscribe(room, CHANNEL, { sinceSeq: 0, presence: true, trackMembers: true });
  } catch (error) {
    $("signin-error").textContent = describe(error);
    button.disabled = false;
    if (client) await client.close();
    client = null;
    return;
  }
  showNode();
  $("signin").hidden = true;
  $("chat").hidden = false;
  sub.addEventListener("members", showMembers);
  showMembers();
  readItems();
  $("text").focus();
}

async function send(event) {
  event.preventDefault();
  const input = $("text");
  const text = input.value.trim();
  if (!text || !client) return;
  input.value = "";
  sending += 1;
  $("pending").textContent = `sending ${sending}…`;
  try {
    // Resent with the same id across reconnects until the store acknowledges it.
    await client.publish(room, CHANNEL, { text }, { timeoutMs: 60_000 });
    $("send-error").textContent = "";
  } catch (error) {
    $("send-error").textContent = `not sent: ${describe(error)}`;
  } finally {
    sending -= 1;
    $("pending").textContent = sending ? `sending ${sending}…` : "";
  }
}

$("signin").addEventListener("submit", join);
$("composer").addEventListener("submit", send);
window.arqonbusChat = { states, get client() { return client; }, get lastShown() { return lastShown; } };
