// The demo page's Connect transport (refimpl/static/transport_connect.js),
// in Node, two ways:
// * its envelope decoder, a pure function, on a case table fed whole, one
//   byte at a time, and split at every point with an empty read between;
//   and its ErrorInfo reader on the bytes our server sends;
// * the whole transport, streamOverConnect, through fetch (undici) against a
//   tiny node:http server that writes each response exactly as given, so an
//   envelope really is split across network reads: the server writes the
//   second half only once the page has shown the first token.
// tests/test_demo_page.py drives the same transport in Chromium against a
// real refimpl server.  Run by tests/test_js_sse.py (`node --test`).
import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer } from "node:http";
import { after, before, test } from "node:test";
import {
  decodeEnvelopes,
  decodeErrorInfo,
  openAIError,
  streamOverConnect,
} from "../../refimpl/static/transport_connect.js";

// Built here with Buffer, not with the module's own encoder, so a mistake
// made the same way on both sides cannot pass.
function envelope(flags, message) {
  const data = Buffer.from(JSON.stringify(message));
  const prefix = Buffer.alloc(5);
  prefix.writeUInt8(flags, 0);
  prefix.writeUInt32BE(data.length, 1);
  return Buffer.concat([prefix, data]);
}

const ID = "chatcmpl-test";
const MESSAGES = [
  [0x00, { id: ID, content: "Hé" }],
  [0x00, { id: ID, content: "llo wörld 🌍" }],
  [0x00, { id: ID, finishReason: "stop", usage: { promptTokens: "1", completionTokens: "3", totalTokens: "4" } }],
  [0x02, {}],
];
const BODY = Buffer.concat(MESSAGES.map(([flags, m]) => envelope(flags, m)));

// The transport's loop, without the network: what is left over goes in
// front of the next read.
function decodeReads(reads) {
  let pending = new Uint8Array(0);
  const out = [];
  for (const read of reads) {
    const { envelopes, rest } = decodeEnvelopes(Buffer.concat([pending, read]));
    out.push(...envelopes.map(({ flags, data }) => [flags, JSON.parse(new TextDecoder().decode(data))]));
    pending = rest;
  }
  return { out, pending };
}

test("decodeEnvelopes: several envelopes in one read", () => {
  const { envelopes, rest } = decodeEnvelopes(new Uint8Array(BODY));
  assert.equal(envelopes.length, MESSAGES.length);
  assert.equal(rest.length, 0);
});

test("decodeEnvelopes: one byte at a time, and split at every point", () => {
  const ways = [[BODY], [...BODY].map((byte) => Buffer.from([byte]))];
  for (let at = 1; at < BODY.length; at++) ways.push([BODY.subarray(0, at), Buffer.alloc(0), BODY.subarray(at)]);
  for (const [i, reads] of ways.entries()) {
    const { out, pending } = decodeReads(reads);
    assert.deepEqual(out, MESSAGES, `way ${i}`);
    assert.equal(pending.length, 0, `way ${i}`);
  }
});

test("decodeEnvelopes: a cut prefix or message is kept for the next read", () => {
  const first = envelope(0, { content: "x" });
  for (const at of [0, 3, 5, first.length - 1]) {
    const { envelopes, rest } = decodeEnvelopes(first.subarray(0, at));
    assert.deepEqual(envelopes, []);
    assert.deepEqual(Buffer.from(rest), first.subarray(0, at));
  }
});

test("decodeEnvelopes: an empty message, a length past 2**31, a view into a larger buffer", () => {
  const { envelopes } = decodeEnvelopes(Uint8Array.of(0x02, 0, 0, 0, 0));
  assert.deepEqual(envelopes.map((e) => [e.flags, e.data.length]), [[0x02, 0]]);
  // 0x80000000 bytes announced: a signed read would make it negative.
  const huge = decodeEnvelopes(Uint8Array.of(0, 0x80, 0, 0, 0, 1, 2));
  assert.deepEqual([huge.envelopes.length, huge.rest.length], [0, 7]);
  // A Uint8Array that starts 3 bytes into its buffer (a subarray of a read).
  const framed = Buffer.concat([Buffer.from("abc"), BODY]);
  const view = new Uint8Array(framed.buffer, framed.byteOffset + 3, BODY.length);
  assert.equal(decodeEnvelopes(view).envelopes.length, MESSAGES.length);
});

// The ErrorInfo details our server sent (patterns/errors.py, grpc_error) for
// a model that failed with "overloaded", and for a bad simulate.tokens.
const OVERLOADED = "CgpvdmVybG9hZGVkEgdyZWZpbXBsGhQKBHR5cGUSDHNlcnZlcl9lcnJvcg";
const BAD_VALUE =
  "Cg1pbnZhbGlkX3ZhbHVlEgdyZWZpbXBsGhgKBXBhcmFtEg9zaW11bGF0ZS50b2tlbnMaHQoEdHlwZRIVaW52YWxpZF9yZXF1ZXN0X2Vycm9y";
const bytes = (base64) => new Uint8Array(Buffer.from(base64, "base64"));

test("decodeErrorInfo reads reason, domain and metadata", () => {
  assert.deepEqual(decodeErrorInfo(bytes(OVERLOADED)), {
    reason: "overloaded",
    domain: "refimpl",
    metadata: { type: "server_error" },
  });
  assert.deepEqual(decodeErrorInfo(bytes(BAD_VALUE)).metadata, {
    param: "simulate.tokens",
    type: "invalid_request_error",
  });
});

test("openAIError: the OpenAI code from ErrorInfo, else the Connect code", () => {
  const error = { code: "unavailable", message: "overloaded: The model failed." };
  const detail = (value) => [{ type: "google.rpc.ErrorInfo", value }];
  assert.deepEqual(openAIError({ ...error, details: detail(OVERLOADED) }), {
    code: "overloaded",
    type: "server_error",
    param: null,
    message: "[unavailable] overloaded: The model failed.",
  });
  const fallback = { code: "unavailable", message: "[unavailable] overloaded: The model failed." };
  assert.deepEqual(openAIError(error), fallback);
  assert.deepEqual(openAIError({ ...error, details: detail("CgpvdmVy") }), fallback); // cut short
  assert.deepEqual(openAIError({ code: "internal" }), { code: "internal", message: "[internal]" });
});

// -- the transport, over a real socket ---------------------------------------
let server;
let respond; // (request body, response) => void: what the next call gets
const realFetch = globalThis.fetch;

before(async () => {
  server = createServer(async (request, response) => {
    const parts = [];
    for await (const part of request) parts.push(part);
    respond(Buffer.concat(parts), request, response);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  // The page fetches a path of its own origin; here the origin is this server.
  const base = `http://127.0.0.1:${server.address().port}`;
  globalThis.fetch = (path, init) => realFetch(new URL(path, base), init);
});

after(() => {
  globalThis.fetch = realFetch;
  server.closeAllConnections(); // undici keeps its connections alive for a while
  server.close();
});

function startConnect(response, headers = {}) {
  response.writeHead(200, { "Content-Type": "application/connect+json", "X-Request-Id": ID, ...headers });
}

const REQUEST = {
  model: "refimpl-sim",
  messages: [{ role: "user", content: "hi" }],
  simulate: { ttft_ms: 0, itl_ms: 5, tokens: 3, fail_after_tokens: 2, fail_with: "overloaded" },
};

// Calls the transport; `firstToken` resolves when the page got its first token.
function turn(request = REQUEST, signal = new AbortController().signal) {
  const tokens = [];
  let gotFirst;
  const firstToken = new Promise((resolve) => (gotFirst = resolve));
  const on = {
    token(text) {
      tokens.push(text);
      gotFirst();
    },
    ping: () => assert.fail("Connect has no pings"),
  };
  return { tokens, firstToken, outcome: streamOverConnect(request, on, signal) };
}

for (const [where, offset] of [
  ["inside its 5-byte prefix", 2],
  ["inside the two UTF-8 bytes of ö", Buffer.from(JSON.stringify(MESSAGES[1][1])).indexOf("ö") + 6],
]) {
  test(`streamOverConnect: an envelope split across reads, ${where}`, async () => {
    let sent;
    respond = (body, _request, response) => {
      sent = body;
      startConnect(response);
      const at = envelope(...MESSAGES[0]).length + offset;
      response.write(BODY.subarray(0, at));
      // The rest only once the first token reached the page: it cannot come
      // in the same read as the first half.
      call.firstToken.then(() => response.end(BODY.subarray(at)));
    };
    const call = turn();
    assert.deepEqual(await call.outcome, {
      ended: "done",
      id: ID,
      usage: { prompt_tokens: 1, completion_tokens: 3, total_tokens: 4 },
      finishReason: "stop",
    });
    assert.deepEqual(call.tokens, ["Hé", "llo wörld 🌍"]);
    // What the page sent: one envelope, a ChatRequest in proto3 JSON.
    assert.deepEqual(decodeReads([sent]).out, [
      [
        0x00,
        {
          model: "refimpl-sim",
          messages: [{ role: "user", content: "hi" }],
          simulate: { ttftMs: 0, itlMs: 5, tokens: "3", failAfterTokens: "2", failWith: "overloaded" },
        },
      ],
    ]);
  });
}

test("streamOverConnect: an error in the end-of-stream envelope", async () => {
  const message = `overloaded: The model failed while generating (overloaded). (generation ${ID})`;
  const error = { code: "unavailable", message, details: [{ type: "google.rpc.ErrorInfo", value: OVERLOADED }] };
  respond = (_body, _request, response) => {
    startConnect(response);
    response.end(Buffer.concat([envelope(...MESSAGES[0]), envelope(0x02, { error })]));
  };
  const call = turn();
  assert.deepEqual(await call.outcome, {
    ended: "error",
    id: ID,
    error: { code: "overloaded", type: "server_error", param: null, message: `[unavailable] ${message}` },
  });
  assert.deepEqual(call.tokens, ["Hé"]);
});

test("streamOverConnect: a body cut before its end-of-stream envelope", async () => {
  respond = (_body, _request, response) => {
    startConnect(response);
    response.end(Buffer.concat([envelope(...MESSAGES[0]), envelope(...MESSAGES[1]).subarray(0, 9)]));
  };
  const { outcome } = turn();
  const { ended, error } = await outcome;
  assert.deepEqual([ended, error.code], ["error", "incomplete_stream"]);
});

test("streamOverConnect: not a Connect response (a proxy's 502 page)", async () => {
  respond = (_body, _request, response) => {
    response.writeHead(502, { "Content-Type": "text/html" });
    response.end("<h1>502 Bad Gateway</h1>");
  };
  const { outcome } = turn();
  assert.deepEqual(await outcome, {
    ended: "error",
    id: null,
    error: { message: "<h1>502 Bad Gateway</h1>", status: 502 },
  });
});

test("streamOverConnect: Stop aborts the fetch, and the server sees the connection go", async () => {
  let closed;
  respond = (_body, request, response) => {
    closed = once(response, "close");
    startConnect(response);
    response.write(envelope(...MESSAGES[0])); // and never the end
  };
  const stop = new AbortController();
  const call = turn(REQUEST, stop.signal);
  await call.firstToken;
  stop.abort();
  assert.deepEqual(await call.outcome, { ended: "stopped", id: ID });
  await closed;
});
