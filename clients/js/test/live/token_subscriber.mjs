// The real JavaScript client against a real node, for tests/test_token_js_e2e.py: a
// private channel subscribed with a token provider that mints tokens as an app's own
// back-end does (HMAC-SHA256 with the node's subscription-token secret). Prints one JSON
// line per event and takes commands on stdin, one a line, until stdin closes (then it
// exits 0):
//
//   hold       the provider's next calls wait, as a slow back-end does, until `release`
//   release
//   fail <N>   the provider's next N calls throw
//   drop       drop the connection as a silent one is dropped: the client reconnects
//              and resumes
//   lose <N>   the message frame of seq N is lost on the way (once): the client sees a
//              gap and reads it back from the REST history
//
// Lines: {subscribed: seq}, {seq, data} per message, {provider: n} when the provider is
// called, {ended: code} when the server ends the subscription by itself (the client may
// recover from it without an `error`), {event: "error", code} for every `error`,
// {told_ended: {channel, code, message}} for every `ended` (gone for good), {opened: n}
// for each connection, and {rejected: code} when the first subscribe fails (mode
// `fail-first`), {losing: seq} once `lose` is heard, {lost: seq} for a frame lost,
// {gap: [from, to]} and {unrecovered: seq} for the client's events. In mode `string` the
// channel is subscribed with one token string, which holds until its `exp`. With `sse`
// after the mode (or as it: `sse` alone is the provider), the client uses the
// Server-Sent Events fallback only, and prints {stream: n} for each stream it opens and
// {state} for each change of state.
//
//   node [--experimental-websocket] token_subscriber.mjs <ws url> <channel> <secret> <ttl> [fail-first | string | sse] [sse]

import { createHmac } from "node:crypto";
import { createInterface } from "node:readline";

import { PushClient } from "../../index.js";
import { NodeEventSource } from "./event_source.mjs";

const [url, channel, secret, ttlText, mode, ...flags] = process.argv.slice(2);
const overSse = mode === "sse" || flags.includes("sse");
const print = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);

// The documented scheme: <payload>.<signature>, both base64url without padding.
function mint() {
  const now = Math.floor(Date.now() / 1000);
  const payload = Buffer.from(JSON.stringify({ ch: channel, iat: now, exp: now + Number(ttlText) })).toString("base64url");
  return `${payload}.${createHmac("sha256", secret).update(payload).digest("base64url")}`;
}

let calls = 0;
let failures = mode === "fail-first" ? 1 : 0;
let held = null; // { promise, release } while `hold`
async function provider(asked) {
  if (asked !== channel) throw new Error(`asked for ${asked}`);
  calls += 1;
  print({ provider: calls });
  if (held) await held.promise;
  if (failures > 0) {
    failures -= 1;
    throw new Error("the back-end did not answer");
  }
  return mint();
}

let streams = 0;
class CountedEventSource extends NodeEventSource {
  constructor(streamUrl) {
    super(streamUrl);
    print({ stream: ++streams });
  }
}
const transport = overSse ? { transports: ["sse"], EventSource: CountedEventSource } : { transports: ["websocket"] };
const client = new PushClient(url, { ...transport, baseDelayMs: 50, maxDelayMs: 500 });
if (overSse) client.on("state", ({ state }) => print({ state }));
client.on("error", (error) => print({ event: "error", code: error.code ?? null }));
client.on("gap", ({ from, to }) => print({ gap: [from, to] }));
client.on("unrecovered", ({ seq }) => print({ unrecovered: seq }));
client.on("ended", (detail) => print({ told_ended: detail }));
let opened = 0;
client.on("open", () => print({ opened: ++opened }));
const lose = new Set(); // seqs whose message frame is lost once
const onMessage = client.onMessage.bind(client);
client.onMessage = (message, replayed) => {
  if (lose.delete(message.seq)) print({ lost: message.seq });
  else onMessage(message, replayed);
};
const onSubscriptionEnded = client.onSubscriptionEnded.bind(client);
client.onSubscriptionEnded = (subscription, error) => {
  print({ ended: error.code });
  onSubscriptionEnded(subscription, error);
};

await client.connect();
try {
  const subscription = await client.subscribe(channel, (message) => print({ seq: message.seq, data: message.data }), { token: mode === "string" ? mint() : provider });
  print({ subscribed: subscription.seq });
} catch (error) {
  print({ rejected: error.code });
}

const commands = createInterface({ input: process.stdin });
commands.on("line", (line) => {
  const [command, argument] = line.trim().split(/\s+/);
  if (command === "hold") {
    let release;
    held = { promise: new Promise((resolve) => (release = resolve)) };
    held.release = release;
  } else if (command === "release") {
    held?.release();
    held = null;
  } else if (command === "lose") {
    lose.add(Number(argument));
    print({ losing: Number(argument) });
  } else if (command === "fail") {
    failures = Number(argument);
  } else if (command === "drop") {
    // As when the connection went silent: the client drops the socket and reconnects.
    // (Closing the socket ourselves reports 1000 in Node: closed for good.)
    client.onHeartbeatTimeout();
  }
});
commands.on("close", () => {
  client.close();
  process.exit(0);
});
setTimeout(() => {
  print({ timeout: true });
  process.exit(1);
}, 60_000);
