// EventSource, the browser's built-in SSE client (WHATWG HTML §9.2), and why
// a chat page cannot use it for POST /v1/chat/completions.  Node's
// EventSource (undici's, the same interface; a global in Node 22+, behind
// --experimental-eventsource in Node 20, which tests/test_clients.py passes)
// against a tiny node:http server that records what it was asked, and
// against refimpl.
import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer } from "node:http";
import { after, before, test } from "node:test";
import { URL } from "./clients_server.mjs";

let server;
let base;
const requests = []; // [{method, url, lastEventId, body}] in arrival order
let onRequest = () => {};

before(async () => {
  server = createServer(async (request, response) => {
    let body = "";
    for await (const part of request) body += part;
    const seen = { method: request.method, url: request.url, lastEventId: request.headers["last-event-id"], body };
    requests.push(seen);
    response.writeHead(200, { "Content-Type": "text/event-stream" });
    if (request.url === "/answer") {
      // An id on each event, and a short retry: what a resumable stream sends.
      response.end(`retry: 10\nid: 1\ndata: Hello\n\nid: 2\ndata: world\n\n`);
    } else if (request.url === "/fails") {
      response.end(`data: Hello\n\nevent: error\ndata: {"error":{"code":"overloaded"}}\n\n`);
    } else response.end();
    onRequest(seen);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  base = `http://127.0.0.1:${server.address().port}`;
});

after(() => server.close());

test("it cannot POST: options other than withCredentials are ignored, it sends GET with no body", async () => {
  const arrived = new Promise((resolve) => (onRequest = resolve));
  const source = new EventSource(`${base}/ask`, { method: "POST", body: '{"messages": []}' });
  const seen = await arrived;
  source.close();
  assert.equal(seen.method, "GET");
  assert.equal(seen.body, "");
});

test("refimpl's POST endpoint answers its GET with 405: one `error` event, closed, no status", async () => {
  const source = new EventSource(`${URL}/v1/chat/completions`);
  const [event] = await once(source, "error");
  assert.equal(source.readyState, EventSource.CLOSED); // a non-200 is final: no reconnect
  assert.equal(event.constructor.name, "Event"); // no status, no body: just "error"
  assert.equal(event.data, undefined);
});

test("a server's `event: error` and a connection failure reach the same `error` listener", async () => {
  const source = new EventSource(`${base}/fails`);
  const errors = [];
  const both = new Promise((resolve) => {
    source.addEventListener("error", (event) => {
      errors.push(event);
      if (errors.length === 2) resolve();
    });
  });
  await both;
  source.close();
  // The server's event, with its data; then the body ended, which EventSource
  // reports as an error too (and reconnects): tell them apart by `data`.
  assert.equal(errors[0].constructor.name, "MessageEvent");
  assert.deepEqual(JSON.parse(errors[0].data), { error: { code: "overloaded" } });
  assert.equal(errors[1].data, undefined);
});

test("when the body ends, it reconnects with Last-Event-ID: the resume a GET endpoint can serve", async () => {
  const data = [];
  const source = new EventSource(`${base}/answer`);
  source.onmessage = (event) => data.push([event.lastEventId, event.data]);
  const again = new Promise((resolve) => {
    onRequest = (seen) => seen.lastEventId && resolve(seen);
  });
  const seen = await again;
  source.close();
  assert.deepEqual(data.slice(0, 2), [
    ["1", "Hello"],
    ["2", "world"],
  ]);
  assert.equal(seen.method, "GET");
  assert.equal(seen.lastEventId, "2"); // "send me what came after event 2"
});
