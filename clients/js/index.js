// The JavaScript client for bundlers and Node (22+, which has a global WebSocket; pass
// `WebSocket` in the options on older versions). One source of truth: the ES module the
// server serves at /static/push/pushclient.js, kept in push/static/push/.
export * from "../../push/static/push/pushclient.js";
export * as msgpack from "../../push/static/push/msgpack.js";
