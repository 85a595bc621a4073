// What the Pusher client scripts share (pusher_client.mjs, echo_client.mjs): their
// configuration, one JSON line out per thing seen, one JSON command in per stdin line,
// and a bounded life. A script runs its commands in order, exits 0 when its stdin closes
// and exits 1 by itself after `lifetimeSecs` (a test that hangs does not leave it
// running).
//
// Configuration: one JSON object as the first argument, e.g.
//   {"key": "app-key", "host": "127.0.0.1", "port": 8000,
//    "authEndpoint": "http://127.0.0.1:8000/pusher/auth", "token": "<API token>",
//    "frames": true, "lifetimeSecs": 60}
// `frames` prints every frame the server sent ({frame: {event, channel, data}}) and every
// one the client sent ({sent: {...}}), for a failing test to show the exchange.

import { createInterface } from "node:readline";

export const config = JSON.parse(process.argv[2] ?? "{}");

export const print = (line) => process.stdout.write(`${JSON.stringify(line)}\n`);

// The options of `new Pusher(key, options)` for a plain-TCP node on loopback: only the
// WebSocket transport (no SockJS or HTTP fallback), no stats, the auth endpoint with our
// API token, and an empty `cluster` (pusher-js 8 insists on one; unused with wsHost). The
// auth requests name the app (`app_key`): a server with several apps needs it.
export function pusherOptions() {
  const headers = config.token ? { Authorization: `Token ${config.token}` } : {};
  const params = { app_key: config.key };
  return {
    cluster: "",
    wsHost: config.host ?? "127.0.0.1",
    wsPort: config.port,
    forceTLS: false,
    enabledTransports: ["ws"],
    activityTimeout: config.activityTimeoutMs ?? 120_000,
    channelAuthorization: {
      endpoint: config.authEndpoint ?? `http://127.0.0.1:${config.port}/pusher/auth`,
      transport: "ajax",
      headers,
      params,
    },
    userAuthentication: {
      endpoint: config.userAuthEndpoint ?? `http://127.0.0.1:${config.port}/pusher/user-auth`,
      transport: "ajax",
      headers,
      params,
    },
  };
}

// Every frame in and out of a pusher-js client, when the configuration asks for them.
export function traceFrames(pusher) {
  if (!config.frames) return;
  pusher.connection.bind("message", (event) => print({ frame: event }));
  const connection = pusher.connection;
  const send = connection.send_event.bind(connection);
  connection.send_event = (name, data, channel) => {
    print({ sent: { event: name, channel: channel ?? null, data } });
    return send(name, data, channel);
  };
}

// pusher-js's own log as {log} lines, but for what {frame} and {sent} already show.
const SAID_BY_FRAMES = ['["Event recd"', '["Event sent"', '["No callbacks on '];
export function keepLog(Pusher) {
  Pusher.log = (message) => {
    const text = String(message);
    if (!SAID_BY_FRAMES.some((start) => text.includes(start))) print({ log: text });
  };
}

export function watchConnection(pusher) {
  pusher.connection.bind("state_change", ({ current }) => {
    print(current === "connected" ? { state: current, socket_id: pusher.connection.socket_id } : { state: current });
  });
  pusher.connection.bind("error", (error) => print({ connection_error: describe(error) }));
}

// Member lists and errors as plain JSON (pusher-js hands class instances).
export function describe(value) {
  if (value === undefined) return null;
  if (value instanceof Error) return { error: String(value.message) };
  if (value && typeof value === "object" && "members" in value && "count" in value && "myID" in value) {
    return { count: value.count, me: value.me ?? null, members: value.members };
  }
  try {
    return JSON.parse(JSON.stringify(value));
  } catch {
    return String(value);
  }
}

// Runs `operations[command.op](command)` for each JSON line of stdin, one at a time and
// in order; an exception becomes {op, failed: message}. `close()` runs when stdin ends.
export function serve(operations, close) {
  const handle = (command) => {
    const operation = operations[command.op];
    if (!operation) throw new Error(`unknown op ${command.op}`);
    return operation(command);
  };
  const lifetime = setTimeout(() => {
    print({ timeout: true });
    process.exit(1);
  }, (config.lifetimeSecs ?? 60) * 1000);
  let queue = Promise.resolve();
  const lines = createInterface({ input: process.stdin });
  lines.on("line", (text) => {
    if (!text.trim()) return;
    const command = JSON.parse(text);
    queue = queue.then(async () => {
      try {
        await handle(command);
      } catch (error) {
        print({ op: command.op, failed: String(error?.message ?? error) });
      }
    });
  });
  lines.on("close", () => {
    queue.then(async () => {
      clearTimeout(lifetime);
      await close();
      process.exit(0);
    });
  });
}
