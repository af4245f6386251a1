// One chat turn over the WebSocket /v1/ws/chat (JSON text messages, lesson 03).
//
// The same shape as transport_sse.js, so the two read side by side:
//   streamOverWebSocket(request, on, signal) -> Promise<outcome>
// with the same outcomes ({ ended: "done" | "error" | "stopped", id, ... }),
// and one more: { ended: "cancelled", id, reason } when the server ended the
// turn itself (reason "shutdown"); SSE says that with an error event.
//
// What differs from SSE:
// * One socket serves many turns: it is opened on the first Send and kept.
// * Stop does not hang up: it sends {"type": "cancel"} on the open socket,
//   and the server answers {"type": "cancelled"}: cancelled(client_cancel)
//   in the trace.  The socket stays ready for the next turn.
// * The generation id arrives only at the end, on done / error / cancelled.
// * Heartbeats are Ping control frames (RFC 6455 §5.5.2): the browser
//   answers them itself and never shows them to JavaScript, so `on.ping` is
//   never called.  The server's trace records them; the timeline shows them.
// * When the model is ahead of the socket, one token message carries every
//   token that was ready, so counting messages undercounts; usage is exact.

import { keyProtocols } from "./api_key.js";

const WS_URL = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/ws/chat`;
let socket = null; // a Promise of the open WebSocket, shared by every turn

function openSocket() {
  if (socket) return socket;
  socket = new Promise((resolve, reject) => {
    const ws = new WebSocket(WS_URL, keyProtocols()); // the key, if any (api_key.js)
    ws.addEventListener("open", () => resolve(ws), { once: true });
    ws.addEventListener("error", () => reject(new Error(`could not connect to ${WS_URL}`)), { once: true });
    ws.addEventListener("close", () => (socket = null), { once: true }); // next Send reconnects
  });
  socket.catch(() => (socket = null));
  return socket;
}

export async function streamOverWebSocket(request, on, signal) {
  let ws;
  try {
    ws = await openSocket();
  } catch (err) {
    return { ended: "error", id: null, error: { code: "network_error", message: err.message } };
  }
  return new Promise((resolve) => {
    const onMessage = (message) => {
      const m = JSON.parse(message.data);
      if (m.type === "token") on.token(m.content);
      else if (m.type === "done") finish({ ended: "done", id: m.id, usage: m.usage, finishReason: m.finish_reason });
      // An error message: the model failed (with an id) or our message was
      // refused (no id, no generation).  The socket stays open either way.
      else if (m.type === "error") finish({ ended: "error", id: m.id ?? null, error: m.error });
      else if (m.type === "cancelled") finish({ ended: m.reason === "client_cancel" ? "stopped" : "cancelled", id: m.id, reason: m.reason, usage: m.usage });
    };
    const onClose = (event) => {
      const message = `The WebSocket closed (code ${event.code}${event.reason ? `: ${event.reason}` : ""}).`;
      finish({ ended: "error", id: null, error: { code: `close_${event.code}`, message } });
    };
    const onStop = () => ws.send(JSON.stringify({ type: "cancel" }));
    function finish(outcome) {
      ws.removeEventListener("message", onMessage);
      ws.removeEventListener("close", onClose);
      signal.removeEventListener("abort", onStop);
      resolve(outcome);
    }
    ws.addEventListener("message", onMessage);
    ws.addEventListener("close", onClose);
    signal.addEventListener("abort", onStop, { once: true });
    // The WebSocket chat message has no "model": the socket serves one model.
    const { messages, simulate } = request;
    ws.send(JSON.stringify({ type: "chat", messages, simulate }));
  });
}
