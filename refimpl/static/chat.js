// The demo page: send one chat turn over the chosen protocol, show each token
// as it arrives with live numbers (TTFT, tokens, tokens/s, last ITL, pings),
// show a failure as a failure, and when the turn ends draw the server's
// trace of it.  The pieces, one idea a file:
//   transport_sse.js      POST + fetch reader + sse.js parser   (lessons 01, 04),
//                         and resuming a cut stream             (lesson 11)
//   transport_ws.js       the /v1/ws/chat WebSocket              (lesson 03)
//   transport_connect.js  gRPC StreamChat over Connect, fetch    (lesson 05)
//   stats.js              the live numbers, measured in the browser
//   timeline.js           the trace as an SVG timeline
// The transports return the same outcome objects, so this file does not
// care which protocol carried the turn.
import { keyHeaders } from "./api_key.js";
import { StreamStats } from "./stats.js";
import { drawTimeline, traceAsText } from "./timeline.js";
import { streamOverConnect } from "./transport_connect.js";
import { streamOverSSE } from "./transport_sse.js";
import { streamOverWebSocket } from "./transport_ws.js";

const $ = (id) => document.getElementById(id);
// Each protocol: how to stream a turn, and whether the page can see its
// heartbeats.  SSE pings are bytes in the body; WebSocket pings are control
// frames the browser answers itself, never shown to JavaScript; a Connect
// stream has none (liveness is HTTP/2 PING's job).
const PROTOCOLS = {
  sse: { stream: streamOverSSE, hiddenPings: null },
  websocket: {
    stream: streamOverWebSocket,
    hiddenPings: "not visible to browser JS on WebSocket (the timeline shows the server's)",
  },
  connect: { stream: streamOverConnect, hiddenPings: "none on Connect: it has no heartbeat message" },
};
let stop = null; // the AbortController of the running turn: Stop aborts it

// The request every protocol sends: the prompt and the simulated model's knobs.
function readRequest() {
  const number = (id) => Number($(id).value);
  const simulate = { ttft_ms: number("ttft"), itl_ms: number("itl"), tokens: number("tokens") };
  if ($("fail-after").value !== "") {
    simulate.fail_after_tokens = number("fail-after");
    simulate.fail_with = $("fail-with").value;
  }
  return { model: $("model").value, messages: [{ role: "user", content: $("prompt").value }], simulate };
}

function showStats(view) {
  for (const [name, text] of Object.entries(view)) $(`stat-${name}`).textContent = text;
}

async function send() {
  const protocol = PROTOCOLS[document.querySelector("input[name=protocol]:checked").value];
  const stats = new StreamStats(performance.now());
  const view = () => ({ ...stats.view(), ...(protocol.hiddenPings && { pings: protocol.hiddenPings }) });
  stop = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  $("output").textContent = "";
  $("usage").textContent = "";
  $("error").hidden = true;
  $("generation").textContent = "";
  $("resumed").hidden = true;
  $("timeline").replaceChildren();
  $("trace").textContent = "(drawn when the turn ends)";
  $("status").textContent = "waiting for the first token…";
  $("status").dataset.ended = "";
  showStats(view());

  // Every token updates the text and the numbers at once: the status must
  // move while tokens stream, not only at the end.
  const resumes = []; // the last event id before each resume
  const on = {
    token(text) {
      stats.token(performance.now());
      $("output").append(text); // appends a text node: no re-parsing of what is there
      $("status").textContent = "streaming…";
      showStats(view());
    },
    ping() {
      stats.ping(performance.now());
      showStats(view());
    },
    // A resumable SSE stream was cut and goes on from the event after
    // `lastEventId`: say so, the text alone would not show it.
    resumed(lastEventId) {
      resumes.push(lastEventId);
      $("resumed").textContent = `resumed after event ${resumes.join(", then after event ")}`;
      $("resumed").hidden = false;
    },
  };
  let outcome;
  try {
    // `resumable` is SSE's alone; the other transports take no options.
    outcome = await protocol.stream(readRequest(), on, stop.signal, { resumable: $("resumable").checked });
  } finally {
    $("send").disabled = false;
    $("stop").disabled = true;
  }
  showOutcome(outcome, stats);
  if (outcome.id) await showTrace(outcome.id);
  else $("trace").textContent = "(no generation: the request was refused before it started)";
}

// How the turn ended, in words.  A failed turn never says "done": its
// partial text is not an answer (lesson 07).
function showOutcome(outcome, stats) {
  $("status").dataset.ended = outcome.ended; // the colour of the status (style.css)
  if (outcome.usage) $("usage").textContent = JSON.stringify(outcome.usage);
  if (outcome.id) {
    const link = Object.assign(document.createElement("a"), {
      href: `/v1/debug/generations/${outcome.id}`,
      textContent: outcome.id,
    });
    $("generation").replaceChildren("generation ", link);
  }
  const seconds = ((performance.now() - stats.startedAt) / 1000).toFixed(2);
  const tokens = outcome.usage?.completion_tokens ?? stats.tokens;
  if (outcome.ended === "done") {
    $("status").textContent = `done: ${tokens} tokens in ${seconds} s, finish_reason ${outcome.finishReason}`;
  } else if (outcome.ended === "stopped") {
    $("status").textContent = "stopped by you";
  } else if (outcome.ended === "cancelled") {
    $("status").textContent = `cancelled by the server (${outcome.reason})`;
  } else {
    const { code, type, message, status } = outcome.error ?? {};
    $("status").textContent = `failed: ${code ?? "error"} after ${stats.tokens} tokens`;
    $("error-code").textContent = [status && `HTTP ${status}`, code, type].filter(Boolean).join(" · ");
    $("error-message").textContent = message ?? "(no message)";
    $("error").hidden = false;
  }
}

// Fetch the server's trace and draw it.  A cancel can reach the server a
// moment after our side has finished, so ask again until the trace is over.
async function showTrace(id) {
  for (let attempt = 0; attempt < 20; attempt++) {
    const response = await fetch(`/v1/debug/generations/${id}`, { headers: keyHeaders() });
    if (!response.ok) break;
    const trace = await response.json();
    drawTimeline($("timeline"), trace);
    $("trace").textContent = traceAsText(trace);
    if (trace.finished) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

$("send").addEventListener("click", send);
$("stop").addEventListener("click", () => stop?.abort());
