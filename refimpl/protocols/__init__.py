"""One module per wire protocol, side by side: SSE, WebSocket, gRPC, HTTP/2."""
