// The seed article's fetch reader (refimpl/examples/seed_fetch.mjs), against
// our failing stream and against the inputs it was never written for.  Each
// test pins what it really does; lesson 07 and lesson 04 quote the results.
import assert from "node:assert/strict";
import { test } from "node:test";
import { seedFetchReader } from "../../refimpl/examples/seed_fetch.mjs";
import { FAIL, chatBody, sentBeforeFailure, URL } from "./midstream_server.mjs";

// Run the reader; what it handed to onToken, and what it threw (or null).
async function run(url, body, fetchImpl) {
  const tokens = [];
  try {
    await seedFetchReader(url, body, (t) => tokens.push(t), fetchImpl);
    return { text: tokens.join(""), error: null };
  } catch (error) {
    return { text: tokens.join(""), error };
  }
}

test("our server's mid-stream error: a TypeError, by accident, message lost", async () => {
  const expected = await sentBeforeFailure();
  const { text, error } = await run(URL, chatBody(FAIL));
  assert.equal(text, expected); // the tokens before the failure were shown
  // "event: error" was skipped; its data line {"error": ...} was read as a
  // chunk, and chunk.choices[0] has no chunk.choices to index.
  assert.ok(error instanceof TypeError);
  assert.match(error.message, /reading '0'/);
  assert.doesNotMatch(error.message, /overloaded/);
});

// --- the same reader on bytes we choose: a fetch that returns them ---------
const encoder = new TextEncoder();
const chunk = (content) => JSON.stringify({ choices: [{ index: 0, delta: { content } }] });

// A fetch whose body delivers exactly these reads (strings or bytes).
function fetchOf(...reads) {
  return async () =>
    new Response(
      new ReadableStream({
        start(controller) {
          for (const r of reads) controller.enqueue(typeof r === "string" ? encoder.encode(r) : r);
          controller.close();
        },
      }),
      { headers: { "Content-Type": "text/event-stream" } },
    );
}

const stream = (eol, ...datas) => datas.map((d) => `data: ${d}${eol}${eol}`).join("");
const GOOD = stream("\n", chunk("Hé"), chunk("llo"), "[DONE]");

test("a well-formed stream, whole: the text, no error", async () => {
  assert.deepEqual(await run("", {}, fetchOf(GOOD)), { text: "Héllo", error: null });
});

test("split across two reads at every byte (even inside é): still right", async () => {
  const bytes = encoder.encode(GOOD);
  for (let i = 1; i < bytes.length; i++) {
    const result = await run("", {}, fetchOf(bytes.slice(0, i), bytes.slice(i)));
    assert.deepEqual(result, { text: "Héllo", error: null }, `split at byte ${i}`);
  }
});

test("a stream cut short (no [DONE], no error): returns as if complete", async () => {
  const cut = stream("\n", chunk("Hé"), chunk("llo"));
  assert.deepEqual(await run("", {}, fetchOf(cut)), { text: "Héllo", error: null });
});

test("CRLF line endings: the text, then [DONE]\\r fails JSON.parse", async () => {
  const { text, error } = await run("", {}, fetchOf(stream("\r\n", chunk("Hé"), chunk("llo"), "[DONE]")));
  assert.equal(text, "Héllo");
  assert.ok(error instanceof SyntaxError);
});

test("'data:' without the space (valid SSE): everything silently dropped", async () => {
  const noSpace = GOOD.replaceAll("data: ", "data:");
  assert.deepEqual(await run("", {}, fetchOf(noSpace)), { text: "", error: null });
});

test("multi-line data (one event, two data: lines): JSON.parse of half a chunk", async () => {
  const [first, second] = [chunk("Hi").slice(0, 20), chunk("Hi").slice(20)];
  const { text, error } = await run("", {}, fetchOf(`data: ${first}\ndata: ${second}\n\ndata: [DONE]\n\n`));
  assert.equal(text, "");
  assert.ok(error instanceof SyntaxError);
});

test("it POSTs the body with stream: true to the chat endpoint", async () => {
  const calls = [];
  const fetchSpy = async (url, init) => {
    calls.push([url, init.method, JSON.parse(init.body)]);
    return fetchOf(GOOD)();
  };
  await run("http://x", { model: "m" }, fetchSpy);
  assert.deepEqual(calls, [["http://x/v1/chat/completions", "POST", { model: "m", stream: true }]]);
});
