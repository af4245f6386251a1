// Our browser reader's parser (refimpl/static/sse.js) on a stream that fails
// after three tokens: it dispatches the tokens, then one event of type
// "error" whose data is the error object, and no [DONE].  The demo page
// (refimpl/static/transport_sse.js) ends the turn as failed on that event.
import assert from "node:assert/strict";
import { test } from "node:test";
import { ERROR, FAIL, readEvents, sentBeforeFailure } from "./midstream_server.mjs";

test("sse.js: the error event arrives with its type and data", async () => {
  const expected = await sentBeforeFailure();
  const { events } = await readEvents(FAIL);
  const last = events.at(-1);
  assert.equal(last.type, "error");
  assert.deepEqual(JSON.parse(last.data), { error: ERROR });
  const before = events.slice(0, -1);
  assert.ok(before.every((e) => e.type === "message"));
  assert.ok(!events.some((e) => e.data === "[DONE]"), "a failed stream has no [DONE]");
  const text = before.map((e) => JSON.parse(e.data).choices[0].delta.content ?? "").join("");
  assert.equal(text, expected);
});
