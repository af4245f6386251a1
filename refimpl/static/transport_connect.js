// One chat turn over gRPC, the way a browser can speak it: the Connect
// protocol (lesson 05), POST /refimpl.v1.ChatService/StreamChat, read with
// fetch's reader.  The service is proto/refimpl/v1/chat.proto.
//
// Why not plain gRPC: a gRPC call tells how it ended *after* its last
// message, in HTTP/2 trailers (grpc-status, grpc-message).  fetch gives a
// page the status line, the headers and the body, and no way to read
// trailers; it cannot choose HTTP/2 either.  A page could read every chunk
// of a gRPC stream and never learn whether the answer was whole or the model
// failed.  So the outcome has to move into the body.  gRPC-Web does that with
// a last binary frame holding the trailers as text, and usually needs a proxy
// in front of a gRPC server; Connect does it on plain HTTP (any version),
// with JSON or protobuf.  connectrpc serves all three on the same path, on
// the same port as the SSE endpoint (refimpl/protocols/grpc_chat.py).
//
// Connect's streaming protocol (https://connectrpc.com/docs/protocol/, in
// our words): a streaming call is a POST whose Content-Type names the codec
// (application/connect+json here).  Both bodies are a sequence of
// *envelopes*: one flags byte, a 4-byte big-endian length, then that many
// bytes of one message.  Flag bit 0 (0x01) says the message is compressed;
// we ask for no compression, so one is a broken stream.  Flag bit 1 (0x02) marks
// the end-of-stream envelope, the last of the response: always JSON, it
// holds {"error": {code, message, details}} when the call failed, and
// trailing metadata.  The HTTP status is 200 even when the call fails: the
// outcome is that envelope, the Connect twin of SSE's [DONE] / error event.
// Messages are proto3 JSON: lowerCamelCase names, 64-bit integers as strings,
// fields at their zero value left out.
//
// The envelope boundaries have nothing to do with the network's: one read
// can end inside an envelope (even inside its 5-byte prefix) or hold several.
// decodeEnvelopes() is the sans-IO half (pure, tested at every split point in
// tests/js/connect_envelope.test.mjs); readStream() is the I/O loop that
// feeds it.  UTF-8 needs no streaming decoder here: a message is decoded only
// once its envelope is whole.
//
// The shape is the one of transport_sse.js and transport_ws.js:
//   streamOverConnect(request, on, signal) -> Promise<outcome>
// `on.token(text)` for each piece of content; `on.ping` is never called (a
// Connect stream has no heartbeat message: keeping an idle connection alive
// is HTTP/2 PING's job, lesson 08).  It never throws; the outcomes are
//   { ended: "done", id, usage, finishReason }
//   { ended: "error", id, error: { code, type, param, message, status? } }
//   { ended: "stopped", id }                   (you pressed Stop)
// Errors name the OpenAI code: the server puts it in a google.rpc.ErrorInfo
// detail (its `reason`; `type` and `param` in its metadata), see
// patterns/errors.py.  Stop aborts the fetch: the browser closes the
// connection (HTTP/2: resets the stream), and the server cancels the
// generation at once: cancelled(client_cancel) in its trace, since a gRPC
// server only learns "the call is gone", never why (lesson 09).

import { keyHeaders } from "./api_key.js";

const PATH = "/refimpl.v1.ChatService/StreamChat";
const COMPRESSED = 0x01; // flags bit 0
const END_STREAM = 0x02; // flags bit 1: the last envelope, JSON, the outcome
const PREFIX = 5; // flags (1 byte) + length (4 bytes, big-endian)

// The whole envelopes at the front of `bytes`, and the bytes after them (the
// start of the next envelope, maybe empty): prepend those to the next read.
// Each envelope is { flags, data }, `data` a view into `bytes`.
export function decodeEnvelopes(bytes) {
  const envelopes = [];
  let at = 0;
  while (bytes.length - at >= PREFIX) {
    const prefix = new DataView(bytes.buffer, bytes.byteOffset + at, PREFIX);
    const size = prefix.getUint32(1); // DataView reads big-endian by default
    if (bytes.length - at - PREFIX < size) break; // the message is still on its way
    envelopes.push({ flags: prefix.getUint8(0), data: bytes.subarray(at + PREFIX, at + PREFIX + size) });
    at += PREFIX + size;
  }
  return { envelopes, rest: bytes.subarray(at) };
}

// google.rpc.ErrorInfo { string reason = 1; string domain = 2;
// map<string, string> metadata = 3; }, from its protobuf bytes.  Connect
// sends a detail as base64 protobuf ("value"), so we read the protobuf wire
// format by hand: three string fields need no library (and this page has no
// build step).  A map is a repeated message { string key = 1; string value = 2; }.
export function decodeErrorInfo(bytes) {
  const utf8 = new TextDecoder();
  const info = { reason: "", domain: "", metadata: {} };
  for (const [field, value] of protoFields(bytes)) {
    if (field === 1) info.reason = utf8.decode(value);
    else if (field === 2) info.domain = utf8.decode(value);
    else if (field === 3) {
      const entry = Object.fromEntries([...protoFields(value)].map(([f, v]) => [f, utf8.decode(v)]));
      info.metadata[entry[1] ?? ""] = entry[2] ?? "";
    }
  }
  return info;
}

// The length-delimited fields of a protobuf message, as [number, bytes];
// other wire types are skipped.  Each field starts with a varint tag:
// (field number << 3) | wire type.
function* protoFields(bytes) {
  let at = 0;
  const varint = () => {
    let value = 0;
    for (let shift = 0; ; shift += 7) {
      if (at >= bytes.length) throw new Error("protobuf: truncated varint");
      const byte = bytes[at++];
      value += (byte & 0x7f) * 2 ** shift; // not <<: a varint can pass 32 bits
      if (!(byte & 0x80)) return value;
    }
  };
  while (at < bytes.length) {
    const tag = varint();
    const wire = tag % 8;
    if (wire === 2) {
      const size = varint();
      if (at + size > bytes.length) throw new Error("protobuf: truncated field");
      yield [Math.floor(tag / 8), bytes.subarray(at, at + size)];
      at += size;
    } else if (wire === 0) varint();
    else if (wire === 1) at += 8;
    else if (wire === 5) at += 4;
    else throw new Error(`protobuf: wire type ${wire}`);
  }
}

// A Connect error (the end-of-stream envelope's "error") as the OpenAI error
// object the page shows.  The message reads as connect-es shows it,
// "[unavailable] overloaded: …": the Connect code, then the server's words.
// Without an ErrorInfo detail (an error connectrpc raised itself) the Connect
// code is all there is.
export function openAIError({ code, message, details = [] }) {
  const text = `[${code}]${message ? ` ${message}` : ""}`;
  const detail = details.find((d) => d.type === "google.rpc.ErrorInfo");
  try {
    const info = detail && decodeErrorInfo(Uint8Array.from(atob(detail.value), (c) => c.charCodeAt(0)));
    const { type, param = null } = info?.metadata ?? {};
    if (info?.reason) return { code: info.reason, type, param, message: text };
  } catch {
    // a detail we cannot read is no reason to hide the error itself
  }
  return { code, message: text };
}

// The page's request (chat.js, the JSON API's names) as a ChatRequest in
// proto3 JSON: lowerCamelCase, and the int64 fields (tokens,
// fail_after_tokens) as strings; ttft_ms and itl_ms are doubles.
function chatRequest({ model, messages, simulate }) {
  const knobs = { ttftMs: simulate.ttft_ms, itlMs: simulate.itl_ms, tokens: String(simulate.tokens) };
  if (simulate.fail_after_tokens !== undefined) {
    knobs.failAfterTokens = String(simulate.fail_after_tokens);
    knobs.failWith = simulate.fail_with;
  }
  return { model, messages, simulate: knobs };
}

// One envelope: flags 0 (a message, not compressed), the length, the JSON.
function envelope(message) {
  const data = new TextEncoder().encode(JSON.stringify(message));
  const bytes = new Uint8Array(PREFIX + data.length);
  new DataView(bytes.buffer).setUint32(1, data.length);
  bytes.set(data, PREFIX);
  return bytes;
}

export async function streamOverConnect(request, on, signal) {
  let id = null;
  try {
    const response = await fetch(PATH, {
      method: "POST",
      headers: { "Content-Type": "application/connect+json", "Connect-Protocol-Version": "1", ...keyHeaders() },
      body: envelope(chatRequest(request)), // a server stream's request: exactly one envelope
      signal,
    });
    id = response.headers.get("X-Request-Id"); // absent when refused before a generation
    if (!response.ok || !response.headers.get("Content-Type")?.startsWith("application/connect+json")) {
      // A failed call is still a 200; anything else is not Connect talking
      // (a wrong path, a proxy's 502 page).
      const message = (await response.text().catch(() => "")).slice(0, 300) || response.statusText;
      return { ended: "error", id, error: { message, status: response.status } };
    }
    return await readStream(response, id, on);
  } catch (err) {
    if (err.name === "AbortError") return { ended: "stopped", id };
    return { ended: "error", id, error: { code: "network_error", message: err.message } };
  }
}

async function readStream(response, id, on) {
  const reader = response.body.getReader();
  const utf8 = new TextDecoder();
  let pending = new Uint8Array(0); // the start of an envelope not yet whole
  let usage = null;
  let finishReason = null;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    const { envelopes, rest } = decodeEnvelopes(pending.length ? concat(pending, value) : value);
    pending = rest;
    for (const { flags, data } of envelopes) {
      if (flags & COMPRESSED) {
        reader.cancel(); // hang up: nothing after it can be trusted
        const message = "A compressed envelope, though we asked for none.";
        return { ended: "error", id, error: { code: "protocol_error", message } };
      }
      const message = JSON.parse(utf8.decode(data));
      // The end-of-stream envelope is the only proof that the stream is
      // complete, and the only place a failure is told.
      if (flags & END_STREAM) {
        if (message.error) return { ended: "error", id, error: openAIError(message.error) };
        return { ended: "done", id, usage, finishReason };
      }
      id ??= message.id ?? null; // each ChatChunk carries the generation id
      if (message.content) on.token(message.content);
      if (message.finishReason) finishReason = message.finishReason;
      if (message.usage) usage = openAIUsage(message.usage);
    }
  }
  // The body ended without an end-of-stream envelope: the connection was
  // cut.  The text is incomplete, and the page must say so (lesson 07).
  const message = "The stream ended without its end-of-stream envelope: the answer is incomplete.";
  return { ended: "error", id, error: { code: "incomplete_stream", message } };
}

// Usage as the JSON API spells it (what chat.js shows); proto3 JSON leaves a
// zero count out, and sends int64 counts as strings.
function openAIUsage({ promptTokens = 0, completionTokens = 0, totalTokens = 0 }) {
  return {
    prompt_tokens: Number(promptTokens),
    completion_tokens: Number(completionTokens),
    total_tokens: Number(totalTokens),
  };
}

function concat(a, b) {
  const bytes = new Uint8Array(a.length + b.length);
  bytes.set(a);
  bytes.set(b, a.length);
  return bytes;
}
