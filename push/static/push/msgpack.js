// A small MessagePack encoder/decoder for the `v1.msgpack` wire format, vendored so the
// client needs no CDN and no build step. It covers what the contract carries (nil,
// booleans, 64-bit integers, doubles, strings, binary, arrays, maps with string keys);
// extension types are refused, as the server refuses them.
//
//   import * as msgpack from "/static/push/msgpack.js";
//   new PushClient(url, { msgpack });

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder("utf-8", { fatal: true });

class Writer {
  constructor() {
    this.bytes = new Uint8Array(256);
    this.view = new DataView(this.bytes.buffer);
    this.length = 0;
  }

  reserve(n) {
    if (this.length + n <= this.bytes.length) return;
    let size = this.bytes.length * 2;
    while (size < this.length + n) size *= 2;
    const bigger = new Uint8Array(size);
    bigger.set(this.bytes.subarray(0, this.length));
    this.bytes = bigger;
    this.view = new DataView(bigger.buffer);
  }

  u8(value) { this.reserve(1); this.view.setUint8(this.length, value); this.length += 1; }
  u16(value) { this.reserve(2); this.view.setUint16(this.length, value); this.length += 2; }
  u32(value) { this.reserve(4); this.view.setUint32(this.length, value); this.length += 4; }
  u64(value) { this.reserve(8); this.view.setBigUint64(this.length, BigInt(value)); this.length += 8; }
  i64(value) { this.reserve(8); this.view.setBigInt64(this.length, BigInt(value)); this.length += 8; }
  f64(value) { this.reserve(8); this.view.setFloat64(this.length, value); this.length += 8; }
  raw(bytes) { this.reserve(bytes.length); this.bytes.set(bytes, this.length); this.length += bytes.length; }
}

function writeInteger(w, n) {
  if (n >= 0) {
    if (n < 0x80) w.u8(n);
    else if (n < 0x100) { w.u8(0xcc); w.u8(n); }
    else if (n < 0x10000) { w.u8(0xcd); w.u16(n); }
    else if (n < 0x100000000) { w.u8(0xce); w.u32(n); }
    else { w.u8(0xcf); w.u64(n); }
  } else if (n >= -32) w.u8(0xe0 | (n + 32));
  else if (n >= -0x80) { w.u8(0xd0); w.u8(n & 0xff); }
  else if (n >= -0x8000) { w.u8(0xd1); w.u16(n & 0xffff); }
  else if (n >= -0x80000000) { w.u8(0xd2); w.u32(n >>> 0); }
  else { w.u8(0xd3); w.i64(n); }
}

function writeHeader(w, length, fix, fixMax, codes) {
  if (fix !== null && length <= fixMax) w.u8(fix | length);
  else if (codes[0] !== null && length < 0x100) { w.u8(codes[0]); w.u8(length); }
  else if (length < 0x10000) { w.u8(codes[1]); w.u16(length); }
  else { w.u8(codes[2]); w.u32(length); }
}

function writeValue(w, value) {
  if (value === null || value === undefined) w.u8(0xc0);
  else if (value === false) w.u8(0xc2);
  else if (value === true) w.u8(0xc3);
  else if (typeof value === "number") {
    if (Number.isSafeInteger(value)) writeInteger(w, value);
    else { w.u8(0xcb); w.f64(value); }
  } else if (typeof value === "bigint") {
    if (value >= 0n) { w.u8(0xcf); w.u64(value); } else { w.u8(0xd3); w.i64(value); }
  } else if (typeof value === "string") {
    const bytes = textEncoder.encode(value);
    writeHeader(w, bytes.length, 0xa0, 31, [0xd9, 0xda, 0xdb]);
    w.raw(bytes);
  } else if (value instanceof Uint8Array) {
    writeHeader(w, value.length, null, -1, [0xc4, 0xc5, 0xc6]);
    w.raw(value);
  } else if (Array.isArray(value)) {
    writeHeader(w, value.length, 0x90, 15, [null, 0xdc, 0xdd]);
    for (const item of value) writeValue(w, item);
  } else if (typeof value === "object") {
    const entries = Object.entries(value).filter(([, item]) => item !== undefined);
    writeHeader(w, entries.length, 0x80, 15, [null, 0xde, 0xdf]);
    for (const [key, item] of entries) { writeValue(w, key); writeValue(w, item); }
  } else {
    throw new TypeError(`msgpack: cannot encode a ${typeof value}`);
  }
}

/** Encode a value to MessagePack bytes. */
export function encode(value) {
  const w = new Writer();
  writeValue(w, value);
  return w.bytes.slice(0, w.length);
}

class Reader {
  constructor(bytes) {
    this.bytes = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.offset = 0;
  }

  take(n) {
    if (this.offset + n > this.bytes.length) throw new RangeError("msgpack: truncated input");
    const start = this.offset;
    this.offset += n;
    return start;
  }

  u8() { return this.view.getUint8(this.take(1)); }
  u16() { return this.view.getUint16(this.take(2)); }
  u32() { return this.view.getUint32(this.take(4)); }
  i8() { return this.view.getInt8(this.take(1)); }
  i16() { return this.view.getInt16(this.take(2)); }
  i32() { return this.view.getInt32(this.take(4)); }
  // 64-bit integers stay Numbers when exact, else BigInt: seq and most data fit.
  u64() { return narrow(this.view.getBigUint64(this.take(8))); }
  i64() { return narrow(this.view.getBigInt64(this.take(8))); }
  f32() { return this.view.getFloat32(this.take(4)); }
  f64() { return this.view.getFloat64(this.take(8)); }
  bytesOf(n) { const start = this.take(n); return this.bytes.slice(start, start + n); }
  str(n) { const start = this.take(n); return textDecoder.decode(this.bytes.subarray(start, start + n)); }
}

function narrow(big) {
  const small = Number(big);
  return Number.isSafeInteger(small) ? small : big;
}

function readArray(r, n) {
  const items = new Array(n);
  for (let i = 0; i < n; i++) items[i] = readValue(r);
  return items;
}

function readMap(r, n) {
  const map = {};
  for (let i = 0; i < n; i++) {
    const key = readValue(r);
    if (typeof key !== "string") throw new TypeError("msgpack: map keys must be strings");
    map[key] = readValue(r);
  }
  return map;
}

const FIXED = {
  0xc0: () => null, 0xc2: () => false, 0xc3: () => true,
  0xc4: (r) => r.bytesOf(r.u8()), 0xc5: (r) => r.bytesOf(r.u16()), 0xc6: (r) => r.bytesOf(r.u32()),
  0xca: (r) => r.f32(), 0xcb: (r) => r.f64(),
  0xcc: (r) => r.u8(), 0xcd: (r) => r.u16(), 0xce: (r) => r.u32(), 0xcf: (r) => r.u64(),
  0xd0: (r) => r.i8(), 0xd1: (r) => r.i16(), 0xd2: (r) => r.i32(), 0xd3: (r) => r.i64(),
  0xd9: (r) => r.str(r.u8()), 0xda: (r) => r.str(r.u16()), 0xdb: (r) => r.str(r.u32()),
  0xdc: (r) => readArray(r, r.u16()), 0xdd: (r) => readArray(r, r.u32()),
  0xde: (r) => readMap(r, r.u16()), 0xdf: (r) => readMap(r, r.u32()),
};

function readValue(r) {
  const byte = r.u8();
  if (byte < 0x80) return byte;
  if (byte < 0x90) return readMap(r, byte & 0x0f);
  if (byte < 0xa0) return readArray(r, byte & 0x0f);
  if (byte < 0xc0) return r.str(byte & 0x1f);
  if (byte >= 0xe0) return byte - 0x100;
  const read = FIXED[byte];
  if (!read) throw new TypeError(`msgpack: unsupported type 0x${byte.toString(16)}`);
  return read(r);
}

/** Decode one MessagePack value from bytes (a Uint8Array or an ArrayBuffer). */
export function decode(bytes) {
  const r = new Reader(bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes));
  const value = readValue(r);
  if (r.offset !== r.bytes.length) throw new RangeError("msgpack: trailing bytes");
  return value;
}

// ----- the JSON text of a message's data, as the server writes it ------------------------
//
// Delta compression (docs/protocol.md) applies a delta to the JSON text of the previous
// message's data as the server holds it: Python's json.dumps with compact separators and
// non-ASCII characters as they are. Decoded values cannot give it back (1.0 and 1 are the
// same Number, and integer-like keys move first in an object), so this reads the text
// straight from the frame's bytes, in their order and with their types.

// Python's repr of a float: the shortest digits that read back the same (as JavaScript's),
// in positional notation when the decimal exponent is from -4 to 15, else as 1.5e-07 or
// 1e+16; a whole number keeps ".0".
export function pythonFloat(x) {
  if (x === 0) return Object.is(x, -0) ? "-0.0" : "0.0";
  const [mantissa, exponentText] = Math.abs(x).toExponential().split("e");
  const digits = mantissa.replace(".", "");
  const exponent = Number(exponentText);
  const sign = x < 0 ? "-" : "";
  if (exponent < -4 || exponent >= 16) {
    const fraction = digits.length > 1 ? `.${digits.slice(1)}` : "";
    const magnitude = String(Math.abs(exponent)).padStart(2, "0");
    return `${sign}${digits[0]}${fraction}e${exponent < 0 ? "-" : "+"}${magnitude}`;
  }
  const point = exponent + 1;
  if (point <= 0) return `${sign}0.${"0".repeat(-point)}${digits}`;
  if (point >= digits.length) return `${sign}${digits}${"0".repeat(point - digits.length)}.0`;
  return `${sign}${digits.slice(0, point)}.${digits.slice(point)}`;
}

function jsonArray(r, n) {
  const items = new Array(n);
  for (let i = 0; i < n; i++) items[i] = readJson(r);
  return `[${items.join(",")}]`;
}

function jsonMap(r, n) {
  const members = new Array(n);
  for (let i = 0; i < n; i++) {
    const key = readValue(r);
    if (typeof key !== "string") throw new TypeError("msgpack: map keys must be strings");
    members[i] = `${JSON.stringify(key)}:${readJson(r)}`;
  }
  return `{${members.join(",")}}`;
}

const bigText = (r, read) => read.call(r.view, r.take(8)).toString();

const JSON_FIXED = {
  0xc0: () => "null", 0xc2: () => "false", 0xc3: () => "true",
  0xca: (r) => pythonFloat(r.f32()), 0xcb: (r) => pythonFloat(r.f64()),
  0xcf: (r) => bigText(r, DataView.prototype.getBigUint64),
  0xd3: (r) => bigText(r, DataView.prototype.getBigInt64),
  0xdc: (r) => jsonArray(r, r.u16()), 0xdd: (r) => jsonArray(r, r.u32()),
  0xde: (r) => jsonMap(r, r.u16()), 0xdf: (r) => jsonMap(r, r.u32()),
};

function readJson(r) {
  const byte = r.bytes[r.offset];
  if (byte >= 0x80 && byte < 0x90) return jsonMap(r, r.u8() & 0x0f);
  if (byte >= 0x90 && byte < 0xa0) return jsonArray(r, r.u8() & 0x0f);
  const json = JSON_FIXED[byte];
  if (json) {
    r.take(1);
    return json(r);
  }
  const value = readValue(r); // integers and strings: their JSON text is the same
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  throw new TypeError(`msgpack: 0x${byte.toString(16)} has no JSON form`);
}

/** The JSON text of the `data` of a message frame (bytes), as the server wrote it; null if none. */
export function dataText(bytes) {
  const r = new Reader(bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes));
  const byte = r.u8();
  let count;
  if (byte >= 0x80 && byte < 0x90) count = byte & 0x0f;
  else if (byte === 0xde) count = r.u16();
  else if (byte === 0xdf) count = r.u32();
  else return null;
  for (let i = 0; i < count; i++) {
    if (readValue(r) === "data") return readJson(r);
    readValue(r);
  }
  return null;
}
