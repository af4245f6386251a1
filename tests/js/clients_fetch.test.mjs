// The seed article's fetch reader (refimpl/examples/seed_fetch.mjs) beside
// ours (refimpl/examples/client_fetch.mjs), on the same bytes from a real
// HTTP server: a tiny node:http server in this file writes each case exactly
// as given, so each reader meets it through fetch, undici and TCP like a
// browser page would.  Each case pins what the seed's reader really does and
// that ours gets it right; then ours against a real refimpl server.
// (midstream_seed_fetch.test.mjs, lesson 07, feeds the seed's reader the same
// inputs through a fake fetch, at every split point.)
import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer } from "node:http";
import { after, before, test } from "node:test";
import { StreamError, fetchReader } from "../../refimpl/examples/client_fetch.mjs";
import { seedFetchReader } from "../../refimpl/examples/seed_fetch.mjs";
import { LONG, URL, ending } from "./clients_server.mjs";
import { ERROR, FAIL, chatBody } from "./midstream_server.mjs";

const chunk = (content) => JSON.stringify({ choices: [{ index: 0, delta: { content } }] });
const event = (data, eol = "\n") => `data: ${data}${eol}${eol}`;
const DONE = event("[DONE]");
const FAILED = JSON.stringify({ error: ERROR });

// Each case: what the server writes, one string per write.
const SECOND = event(chunk("llo wörld"));
const CASES = {
  lf: [event(chunk("Hé")) + SECOND + DONE],
  crlf: [event(chunk("Hé"), "\r\n") + event(chunk("llo wörld"), "\r\n") + event("[DONE]", "\r\n")],
  "no-space": [(event(chunk("Hé")) + SECOND + DONE).replaceAll("data: ", "data:")],
  "multi-line": [`data: ${chunk("Hé").slice(0, 20)}\ndata: ${chunk("Hé").slice(20)}\n\n` + SECOND + DONE],
  split: "split", // written below, in two writes
  heartbeat: [`: ping\n\n${event(chunk("Hé"))}: ping\n\n${SECOND}${DONE}`],
  "error-event": [`${event(chunk("Hé"))}event: error\n${event(FAILED)}`],
  "error-event-no-space": [`${event(chunk("Hé"))}event:error\ndata:${FAILED}\n\n`],
  cut: [event(chunk("Hé")) + SECOND], // the body ends cleanly: no [DONE], no error
  "bad-gateway": "bad-gateway", // a proxy's 502 page, written below
};
const PAGE = "<html><body><h1>502 Bad Gateway</h1></body></html>\n";

let server;
let base;
let firstToken; // resolves when a reader handed over the split case's first token

before(async () => {
  server = createServer(async (request, response) => {
    for await (const _ of request); // read the body
    const name = request.url.split("/")[1];
    if (name === "bad-gateway") {
      response.writeHead(502, { "Content-Type": "text/html" });
      response.end(PAGE);
      return;
    }
    response.writeHead(200, { "Content-Type": "text/event-stream" });
    if (name === "split") {
      // The second event, cut inside the two UTF-8 bytes of "ö".  The rest
      // is written once the reader has handed over the first token, so it
      // cannot arrive in the same read as the first half.
      const bytes = Buffer.from(event(chunk("Hé")) + SECOND + DONE);
      const at = bytes.indexOf(Buffer.from("ö")) + 1;
      response.write(bytes.subarray(0, at));
      await firstToken.promise;
      response.end(bytes.subarray(at));
      return;
    }
    for (const write of CASES[name]) response.write(write);
    response.end();
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  base = `http://127.0.0.1:${server.address().port}`;
});

after(() => server.close());

// Run one reader on one case: the text it handed over, and what it threw.
async function read(reader, name) {
  firstToken = resolvers();
  let text = "";
  const onToken = (piece) => {
    text += piece;
    firstToken.resolve();
  };
  try {
    await reader(`${base}/${name}`, { model: "m", messages: [] }, onToken);
    return { text, error: null };
  } catch (error) {
    return { text, error };
  }
}

function resolvers() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

const WHOLE = "Héllo wörld";

// case -> what the seed's reader does: the text it showed, and the error it
// threw (a class), or null for "returned normally, as if complete".
const SEED = {
  lf: [WHOLE, null],
  crlf: [WHOLE, SyntaxError], // "[DONE]\r" is not "[DONE]": JSON.parse("[DONE]\r") throws
  "no-space": ["", null], // every line dropped, and it returns: an empty answer, "complete"
  "multi-line": ["", SyntaxError], // JSON.parse of the first half of the chunk
  split: [WHOLE, null], // the kept last line and TextDecoder's {stream: true} handle it
  heartbeat: [WHOLE, null], // ": ping" does not start with "data: "
  "error-event": ["Hé", TypeError], // by accident: {"error": ...}.choices[0]; the message is lost
  "error-event-no-space": ["Hé", null], // dropped, the body ends: the failed stream looks finished
  cut: [WHOLE, null], // returns as if complete
  "bad-gateway": ["", null], // never looks at the status: an empty answer, "complete"
};

for (const [name, [text, error]] of Object.entries(SEED)) {
  test(`seed's reader, ${name}: ${error ? error.name : "no error"}, ${JSON.stringify(text)}`, async () => {
    const result = await read(seedFetchReader, name);
    assert.equal(result.text, text);
    if (error) assert.ok(result.error instanceof error, String(result.error));
    else assert.equal(result.error, null);
  });
}

// Ours: the whole text where there is one, and an error the caller can act
// on where the stream failed or was cut short.
const OURS = {
  lf: [WHOLE, null],
  crlf: [WHOLE, null],
  "no-space": [WHOLE, null],
  "multi-line": [WHOLE, null],
  split: [WHOLE, null],
  heartbeat: [WHOLE, null],
  "error-event": ["Hé", ERROR],
  "error-event-no-space": ["Hé", ERROR],
  cut: [WHOLE, { message: "the stream ended without [DONE]", code: "incomplete" }],
  "bad-gateway": ["", { message: `HTTP 502: ${PAGE}`, code: "http_502" }],
};

for (const [name, [text, error]] of Object.entries(OURS)) {
  test(`our reader, ${name}: ${error ? error.code : "no error"}, ${JSON.stringify(text)}`, async () => {
    const result = await read(fetchReader, name);
    assert.equal(result.text, text);
    if (error) {
      assert.ok(result.error instanceof StreamError, String(result.error));
      assert.deepEqual(result.error.error, error); // the server's error object, whole
      assert.equal(result.error.message, error.message);
    } else assert.equal(result.error, null);
  });
}

// --- ours against refimpl -----------------------------------------------------
test("refimpl: a mid-stream error throws StreamError with the server's error object", async () => {
  let text = "";
  await assert.rejects(
    fetchReader(URL, chatBody(FAIL), (piece) => (text += piece)),
    (err) => err instanceof StreamError && err.error.code === "overloaded" && err.message === ERROR.message,
  );
  assert.ok(text.length > 0);
});

test("refimpl: an error before the stream (404) throws StreamError with its code", async () => {
  const body = { ...chatBody(), model: "gpt-4o" };
  await assert.rejects(
    fetchReader(URL, body, () => {}),
    (err) => err instanceof StreamError && err.error.code === "model_not_found",
  );
});

test("refimpl: aborting the signal closes the connection, the server cancels", async () => {
  const controller = new AbortController();
  let id;
  const fetchImpl = async (...args) => {
    const response = await fetch(...args);
    id = response.headers.get("x-request-id");
    return response;
  };
  let pieces = 0;
  const onToken = () => ++pieces === 3 && controller.abort();
  await assert.rejects(fetchReader(URL, chatBody(LONG), onToken, { signal: controller.signal, fetchImpl }), {
    name: "AbortError",
  });
  assert.equal(pieces, 3);
  assert.deepEqual(await ending(id), ["cancelled", "client_disconnect"]);
});
