// Lesson 04's Node clients (clients_node.mjs) against a real refimpl server:
// the text is the non-streamed answer's; usage is the server's only when the
// request asks for it (the AI SDK's provider: `includeUsage`); and how each
// one stops.  The openai SDK closes the connection on `break` or on an
// aborted signal; the Vercel AI SDK only on its abortSignal: after a `break`
// out of textStream or fullStream it goes on reading, and the model goes on
// generating, for nobody.
import assert from "node:assert/strict";
import { test } from "node:test";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { streamText } from "ai";
import OpenAI from "openai";
import { CLIENTS, MODEL, chatBody } from "./clients_node.mjs";
import { LONG, URL, ending, trace, traceWhen } from "./clients_server.mjs";

const PROMPT = "Why should tokens stream?";
const SIMULATE = { tokens: 40, seed: 3 };

async function nonStreamed(ask) {
  const response = await fetch(`${URL}/v1/chat/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...chatBody(ask), stream: false, stream_options: undefined }),
  });
  const answer = await response.json();
  return { text: answer.choices[0].message.content, usage: answer.usage };
}

for (const [name, client] of Object.entries(CLIENTS)) {
  for (const includeUsage of [false, true]) {
    test(`${name}: the non-streamed text; usage ${includeUsage ? "when asked" : "not asked"}`, async () => {
      const ask = { prompt: PROMPT, simulate: SIMULATE, includeUsage };
      const answer = await nonStreamed(ask);
      const pieces = [];
      const { text, usage } = await client(URL, ask, (piece) => pieces.push(piece));
      assert.equal(text, answer.text);
      assert.equal(pieces.join(""), answer.text);
      // The seed's reader hands over content only: never any usage.
      const reports = includeUsage && name !== "seed's fetch reader";
      assert.deepEqual(usage, reports ? answer.usage : null);
    });
  }
}

test("openai (Node): `break` closes the connection, the server cancels", async () => {
  const client = new OpenAI({ baseURL: `${URL}/v1`, apiKey: "unused" });
  const stream = await client.chat.completions.create({
    model: MODEL,
    messages: [{ role: "user", content: PROMPT }],
    stream: true,
    simulate: LONG,
  });
  let id;
  let pieces = 0;
  for await (const chunk of stream) {
    id = chunk.id;
    if (chunk.choices[0]?.delta?.content && ++pieces === 3) break; // the iterator's return() aborts
  }
  assert.deepEqual(await ending(id), ["cancelled", "client_disconnect"]);
});

test("openai (Node): an aborted signal ends the loop quietly, the server cancels", async () => {
  const client = new OpenAI({ baseURL: `${URL}/v1`, apiKey: "unused" });
  const controller = new AbortController();
  const body = { model: MODEL, messages: [{ role: "user", content: PROMPT }], stream: true, simulate: LONG };
  const stream = await client.chat.completions.create(body, { signal: controller.signal });
  let id;
  let pieces = 0;
  for await (const chunk of stream) {
    id = chunk.id;
    if (chunk.choices[0]?.delta?.content && ++pieces === 3) controller.abort();
  } // no throw: the loop just ends, as it would at [DONE]; check signal.aborted
  assert.equal(pieces, 3);
  assert.deepEqual(await ending(id), ["cancelled", "client_disconnect"]);
});

// The Vercel AI SDK, and the generation's id: the raw chunks carry it.
function aiStream(abortSignal) {
  const refimpl = createOpenAICompatible({ name: "refimpl", baseURL: `${URL}/v1`, apiKey: "unused" });
  const ids = [];
  const result = streamText({
    model: refimpl(MODEL),
    prompt: PROMPT,
    providerOptions: { refimpl: { simulate: LONG } },
    includeRawChunks: true,
    onChunk: ({ chunk }) => chunk.type === "raw" && ids.push(chunk.rawValue.id),
    abortSignal,
  });
  return { result, ids };
}

for (const loop of ["textStream", "fullStream"]) {
  test(`ai: \`break\` out of ${loop} leaves the model running; only abortSignal stops it`, async () => {
    const controller = new AbortController();
    const { result, ids } = aiStream(controller.signal);
    let pieces = 0;
    for await (const part of result[loop]) {
      if ((loop === "textStream" || part.type === "text-delta") && ++pieces === 3) break;
    }
    // Stopped reading, yet the model makes 50 more tokens, for nobody ...
    const made = (await trace(ids[0])).completion_tokens;
    const later = await traceWhen(ids[0], (t) => t.completion_tokens >= made + 50);
    assert.equal(later.finished, false);
    // ... until the signal is aborted.
    controller.abort();
    assert.deepEqual(await ending(ids[0]), ["cancelled", "client_disconnect"]);
  });
}

test("ai: an aborted abortSignal ends the loop quietly, the server cancels", async () => {
  const controller = new AbortController();
  const { result, ids } = aiStream(controller.signal);
  let pieces = 0;
  for await (const _ of result.textStream) if (++pieces === 3) controller.abort(); // no throw
  assert.equal(pieces, 3);
  assert.deepEqual(await ending(ids[0]), ["cancelled", "client_disconnect"]);
});
