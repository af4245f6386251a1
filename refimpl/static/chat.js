// The demo page's client: POST with stream:true, read the body with fetch's
// reader, parse it with SSEParser, append each token as it arrives.  Stop
// aborts the fetch, which closes the connection; the server sees the
// disconnect and cancels the generation (lesson 09) - the trace panel shows it.
import { SSEParser } from "./sse.js";

const $ = (id) => document.getElementById(id);
let controller = null;

async function send() {
  controller = new AbortController();
  $("output").textContent = "";
  $("status").textContent = "waiting for the first token...";
  $("send").disabled = true;
  $("stop").disabled = false;
  const started = performance.now();
  let first = null, tokens = 0, id = null;
  const body = {
    model: $("model").value,
    stream: true,
    stream_options: { include_usage: true },
    messages: [{ role: "user", content: $("prompt").value }],
    simulate: { ttft_ms: Number($("ttft").value), itl_ms: Number($("itl").value), tokens: Number($("tokens").value) },
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    id = response.headers.get("X-Request-Id");
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SSEParser();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      for (const event of parser.feed(value)) {
        if (event.data === "[DONE]") continue;
        const chunk = JSON.parse(event.data);
        if (event.type === "error") throw new Error(chunk.error.message);
        const content = chunk.choices[0]?.delta?.content;
        if (content) {
          first ??= performance.now();
          tokens += 1;
          $("output").textContent += content;
        }
        if (chunk.usage) $("usage").textContent = JSON.stringify(chunk.usage);
      }
    }
    $("status").textContent = `done: TTFT ${(first - started).toFixed(0)} ms, ${tokens} tokens in ${(performance.now() - started).toFixed(0)} ms`;
  } catch (err) {
    $("status").textContent = err.name === "AbortError" ? "stopped by you" : `error: ${err.message}`;
  } finally {
    $("send").disabled = false;
    $("stop").disabled = true;
    if (id) showTrace(id);
  }
}

async function showTrace(id) {
  // The server may still be recording the cancellation; ask twice.
  for (let i = 0; i < 10; i++) {
    const trace = await (await fetch(`/v1/debug/generations/${id}`)).json();
    const t0 = trace.events[0].at;
    $("trace").textContent = trace.events
      .map((e) => `${((e.at - t0) * 1000).toFixed(1).padStart(9)} ms  ${e.name}${e.detail ? `(${e.detail})` : ""}  tokens=${e.tokens}`)
      .join("\n");
    if (trace.finished) return;
    await new Promise((r) => setTimeout(r, 100));
  }
}

$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => controller?.abort());
