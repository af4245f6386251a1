// The Vercel AI SDK (`ai` + @ai-sdk/openai-compatible) on a stream that fails
// after three tokens.  Its provider parses the error event's data as an
// "error" stream part; streamText never throws for it.  So `textStream`, the
// loop most examples show, simply ends, and the partial text looks like the
// answer.  Only three places tell: the `onError` callback, an `error` part in
// `fullStream`, and `finishReason === "error"`.  (Without an onError, the SDK
// prints the error to the console, and that is all.)
import assert from "node:assert/strict";
import { test } from "node:test";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { streamText } from "ai";
import { ERROR, FAIL, MODEL, PROMPT, URL, sentBeforeFailure } from "./midstream_server.mjs";

// providerOptions under the provider's name are added to the request body.
const refimpl = createOpenAICompatible({ name: "refimpl", baseURL: `${URL}/v1`, apiKey: "unused" });

function failingStream(onError) {
  return streamText({
    model: refimpl(MODEL),
    prompt: PROMPT,
    providerOptions: { refimpl: { simulate: FAIL } },
    onError,
  });
}

test("ai: textStream ends without an error, partial text only", async () => {
  const expected = await sentBeforeFailure();
  const errors = [];
  const result = failingStream(({ error }) => errors.push(error));
  let text = "";
  for await (const delta of result.textStream) text += delta; // no throw
  assert.equal(text, expected);
  assert.equal(await result.text, expected); // resolves too, no rejection
  // What reveals the failure: the callback and the finish reason.
  assert.equal(await result.finishReason, "error");
  assert.deepEqual(errors, [ERROR]); // the error object itself, not an Error
});

test("ai: fullStream carries an error part between the text and the finish", async () => {
  const expected = await sentBeforeFailure();
  const result = failingStream(() => {});
  const parts = [];
  for await (const part of result.fullStream) parts.push(part);
  const types = parts.map((p) => p.type);
  assert.equal(types.filter((t) => t === "error").length, 1);
  const error = parts.find((p) => p.type === "error");
  assert.deepEqual(error.error, ERROR);
  // The text that came before it, then the error, then a normal-looking close.
  const text = parts.filter((p) => p.type === "text-delta").map((p) => p.text).join("");
  assert.equal(text, expected);
  assert.ok(types.indexOf("error") > types.lastIndexOf("text-delta"));
  assert.equal(types.at(-1), "finish");
  assert.equal(parts.at(-1).finishReason, "error");
});
