// The demo page: a live feed of one channel through the JavaScript client, a publish
// box, the connection state, messages per second and latency.
//
// The page also exposes what it received for tests: `#feed[data-seqs]` lists every seq
// in arrival order, `#state[data-state]` the client's state and `#state[data-protocol]`
// the subprotocol the server chose ("v1.json", "v1.msgpack"; empty on SSE or while not
// connected).
//
// `/?transport=sse` makes the client skip the WebSocket (`transports: ["sse"]`),
// `/?transport=websocket` turns the SSE fallback off, and `/?ws=ws://127.0.0.1:1/ws/`
// points its WebSocket elsewhere (a closed port shows the fallback by itself); the
// event stream and REST stay on the page's own node.

import { PushClient } from "./pushclient.js";
import * as msgpack from "./msgpack.js";

const FEED_ITEMS_SHOWN = 200;
const RATE_WINDOW_MS = 5_000;
const LATENCY_SAMPLES = 100;
const STATS_REFRESH_MS = 500;
// A demo should come back quickly after a restart; the library default (30 s) suits
// fleets of clients better.
const DEMO_MAX_DELAY_MS = 5_000;
const TRANSPORTS = Object.freeze({
  auto: ["websocket", "sse"],
  sse: ["sse"],
  websocket: ["websocket"],
});
const TRANSPORT_LABELS = Object.freeze({ websocket: "WebSocket", sse: "Server-Sent Events + REST" });

const $ = (id) => document.getElementById(id);
const root = $("demo");

const view = {
  client: null,
  channel: root.dataset.channel || "demo",
  seqs: [],
  arrivals: [],
  latencies: [],
  gaps: 0,
  reconnects: 0,
};

function wsUrl() {
  const override = new URLSearchParams(location.search).get("ws");
  if (override) return override;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws/`;
}

function logEvent(text, kind = "") {
  const item = document.createElement("li");
  item.textContent = `${new Date().toLocaleTimeString()}  ${text}`;
  if (kind) item.className = kind;
  $("events").prepend(item);
  while ($("events").children.length > 50) $("events").lastChild.remove();
}

function showState(state, client) {
  const connected = state === "connected" || state === "sse";
  const protocol = connected ? (client.protocol ?? "") : "";
  $("state").dataset.state = state;
  $("state").dataset.protocol = protocol;
  $("state-label").textContent = state;
  $("transport-used").textContent = connected ? TRANSPORT_LABELS[client.transport] : "–";
  $("protocol").textContent = protocol || "–";
}

function resetFeed() {
  view.seqs = [];
  view.arrivals = [];
  view.latencies = [];
  view.gaps = 0;
  $("feed").replaceChildren();
  $("feed").dataset.seqs = "";
  $("feed-empty").hidden = false;
  $("feed-channel").textContent = view.channel;
}

function cell(className, text) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  return span;
}

function showMessage(message, { replayed }) {
  const now = Date.now();
  const latencyMs = Math.max(0, now - message.timestamp * 1000);
  view.seqs.push(message.seq);
  view.arrivals.push(now);
  // A replayed message's age is how long we were away, not how fast delivery is.
  if (!replayed) {
    view.latencies.push(latencyMs);
    if (view.latencies.length > LATENCY_SAMPLES) view.latencies.shift();
  }

  const item = document.createElement("li");
  item.className = "fresh";
  item.dataset.seq = message.seq;
  item.append(
    cell("seq", `#${message.seq}`),
    cell("time", new Date(message.timestamp * 1000).toLocaleTimeString()),
    cell("lat", replayed ? "replayed" : `${latencyMs.toFixed(0)} ms`),
    cell("data", JSON.stringify(message.data)),
  );
  const feed = $("feed");
  feed.prepend(item);
  while (feed.children.length > FEED_ITEMS_SHOWN) feed.lastChild.remove();
  feed.dataset.seqs = view.seqs.join(",");
  $("feed-empty").hidden = true;
  $("received").textContent = view.seqs.length;
  $("last-seq").textContent = message.seq;
}

function refreshStats() {
  const now = Date.now();
  while (view.arrivals.length && view.arrivals[0] < now - RATE_WINDOW_MS) view.arrivals.shift();
  $("rate").textContent = (view.arrivals.length / (RATE_WINDOW_MS / 1000)).toFixed(1);
  if (view.latencies.length) {
    const last = view.latencies[view.latencies.length - 1];
    // The median, not the mean: one stalled message should not colour the next hundred.
    const sorted = [...view.latencies].sort((a, b) => a - b);
    const median = sorted[Math.floor(sorted.length / 2)];
    $("latency").textContent = `${last.toFixed(0)} · ${median.toFixed(0)}`;
  }
  $("gaps").textContent = view.gaps;
  $("reconnects").textContent = view.reconnects;
}

function wire(client) {
  client.on("state", ({ state, previous }) => {
    showState(state, client);
    // Back over either transport; sse -> connected is a switch, not a reconnect.
    if ((state === "connected" || state === "sse") && previous === "reconnecting") view.reconnects += 1;
    logEvent(`${previous} → ${state}`);
  });
  client.on("open", (hello) => {
    $("server-id").textContent = hello.server_id;
    $("connection-id").textContent = hello.connection_id;
  });
  client.on("close", ({ code, willReconnect, delayMs }) => {
    if (willReconnect) {
      logEvent(`closed (${code}), retrying in ${(delayMs / 1000).toFixed(1)} s`);
    } else {
      logEvent(`closed (${code})`);
    }
  });
  client.on("gap", ({ channel, from, to }) => {
    view.gaps += 1;
    logEvent(`gap on ${channel}: seqs ${from}–${to} missed, reading them from history`, "gap");
  });
  client.on("unrecovered", ({ channel, seq }) => logEvent(`${channel} up to seq ${seq} is no longer in history: refetch`, "gap"));
  client.on("error", (error) => logEvent(`error: ${error.message}`, "gap"));
}

async function start() {
  view.client?.close();
  view.channel = $("channel").value.trim() || "demo";
  const transport = $("transport").value;
  const url = new URL(location.href);
  url.searchParams.set("channel", view.channel);
  if (transport === "auto") url.searchParams.delete("transport");
  else url.searchParams.set("transport", transport);
  history.replaceState(null, "", url);
  resetFeed();

  const options = {
    token: $("token").value.trim() || null,
    maxDelayMs: DEMO_MAX_DELAY_MS,
    transports: TRANSPORTS[transport],
    sseUrl: `${location.origin}/sse/`,
    apiUrl: `${location.origin}/api/v1/`,
  };
  if ($("format").value === "msgpack") options.msgpack = msgpack;
  const client = new PushClient(wsUrl(), options);
  view.client = client;
  wire(client);
  client.connect().catch((error) => logEvent(`could not connect: ${error.message}`, "gap"));
  try {
    const subscription = await client.subscribe(view.channel, showMessage);
    // Over SSE there is no `subscribed` reply: the seq is known with the first message.
    const at = subscription.seq === null ? "" : ` at seq ${subscription.seq}`;
    logEvent(`subscribed to ${view.channel}${at}`);
  } catch (error) {
    logEvent(`subscribe failed: ${error.message}`, "gap");
  }
}

async function publish() {
  const text = $("publish-data").value;
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    data = text;
  }
  const result = $("publish-result");
  try {
    const overRest = view.client.state === "sse";
    const reply = await view.client.publish(view.channel, data);
    result.className = "ok";
    result.textContent = `published, seq ${reply.seq}${overRest ? " (over REST)" : ""}`;
  } catch (error) {
    result.className = "bad";
    result.textContent = error.code === "FORBIDDEN" ? "forbidden: enter a token and connect" : error.message;
  }
}

const askedTransport = new URLSearchParams(location.search).get("transport");
if (askedTransport in TRANSPORTS) $("transport").value = askedTransport;
$("connect").addEventListener("click", start);
$("publish").addEventListener("click", publish);
$("publish-data").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) publish();
});
setInterval(refreshStats, STATS_REFRESH_MS);
start();
