// The real JavaScript client against a real node, for tests/test_context_js_e2e.py: the
// context a subscription brings. Prints one JSON line per event and runs until its stdin
// closes (the test decides when it has seen enough), then exits 0.
//
//   rewind <N>   subscribe with `rewind: N`: {frame: seq} for every message frame the
//                server sent (before the client's own ordering), {seq, data, replayed}
//                for every message the handler got
//   latest       `client.latest(channel, onValue)`: {seq, value} per value
//   occupancy    subscribe with `occupancy: true`: {occupancy: n} per event; at the
//                end {held: n}, the subscription's `subscribers`
//
// Every mode prints {subscribed: seq} once subscribed, and {event, code} for errors,
// gaps and unrecovered history.
//
//   node [--experimental-websocket] context_subscriber.mjs <ws url> <channel> <mode> [N]

import { PushClient } from "../../index.js";

const [url, channel, mode, rewindText] = process.argv.slice(2);

const client = new PushClient(url, { transports: ["websocket"], baseDelayMs: 50, maxDelayMs: 500 });
const print = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);
for (const name of ["error", "gap", "unrecovered"]) client.on(name, (event) => print({ event: name, code: event.code ?? null }));

const undelta = client.undelta.bind(client);
client.undelta = (message, frame) => {
  if (message.channel === channel) print({ frame: message.seq });
  return undelta(message, frame);
};

await client.connect();
let subscription;
if (mode === "rewind") {
  const handler = (message, meta) => print({ seq: message.seq, data: message.data, replayed: meta.replayed });
  subscription = await client.subscribe(channel, handler, { rewind: Number(rewindText) });
} else if (mode === "latest") {
  subscription = await client.latest(channel, (value, message) => print({ seq: message.seq, value }));
} else if (mode === "occupancy") {
  client.on("occupancy", (event) => {
    if (event.channel === channel) print({ occupancy: event.subscribers });
  });
  subscription = await client.subscribe(channel, () => {}, { occupancy: true });
} else {
  throw new Error(`unknown mode ${mode}`);
}
print({ subscribed: subscription.seq });

process.stdin.on("end", () => {
  if (mode === "occupancy") print({ held: subscription.subscribers });
  client.close();
  process.exit(0);
});
process.stdin.resume();
setTimeout(() => {
  print({ timeout: true });
  process.exit(1);
}, 60_000);
