// The openai Node SDK on a stream that fails after three tokens: the
// for-await loop throws the SDK's APIError (the base class itself: there is
// no HTTP status mid-stream), after handing over the tokens that came first.
import assert from "node:assert/strict";
import { test } from "node:test";
import OpenAI from "openai";
import { ERROR, FAIL, MODEL, PROMPT, URL, sentBeforeFailure } from "./midstream_server.mjs";

test("openai (Node): APIError after the partial text", async () => {
  const expected = await sentBeforeFailure();
  const client = new OpenAI({ baseURL: `${URL}/v1`, apiKey: "unused" });
  const stream = await client.chat.completions.create({
    model: MODEL,
    messages: [{ role: "user", content: PROMPT }],
    stream: true,
    simulate: FAIL, // unknown params ride along in the body
  });
  let text = "";
  let err = null;
  try {
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
  } catch (e) {
    err = e;
  }
  assert.equal(text, expected);
  assert.equal(err.constructor, OpenAI.APIError);
  assert.equal(err.status, undefined);
  assert.equal(err.code, "overloaded");
  assert.equal(err.type, "server_error");
  assert.equal(err.message, ERROR.message);
  assert.deepEqual(err.error, ERROR);
});
