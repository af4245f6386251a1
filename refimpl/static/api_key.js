// The API key box (lesson 14).  A server started with REFIMPL_API_KEY wants
// a key on every request but the page itself; what you type here goes with
// each one, the way each protocol can carry it from a browser:
//   fetch (SSE, Connect, the trace)  Authorization: Bearer <key>
//   WebSocket                         a subprotocol token, the form the OpenAI
//                                     SDK uses in a browser: the page offers
//                                     ["refimpl.chat", "openai-insecure-api-key.<key>"]
//                                     and the server picks "refimpl.chat"
//                                     (new WebSocket() cannot set headers).
// The key is in the page, readable by its scripts: fine for a demo or a
// trusted tool, not for a public site (give those short-lived keys).

const PROTOCOL = "refimpl.chat";
const KEY_PROTOCOL = "openai-insecure-api-key.";

function key() {
  return globalThis.document?.getElementById("api-key")?.value.trim() ?? "";
}

// Headers to add to a fetch: the key, if one was typed.
export function keyHeaders() {
  return key() ? { Authorization: `Bearer ${key()}` } : {};
}

// The subprotocols to offer when opening a WebSocket.
export function keyProtocols() {
  return key() ? [PROTOCOL, KEY_PROTOCOL + key()] : [];
}
