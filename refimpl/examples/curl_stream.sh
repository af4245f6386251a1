#!/bin/sh
# Stream one answer with curl; usage: curl_stream.sh [URL]   (lesson 02)
# region: curl-stream
URL=${1:-http://127.0.0.1:8000}
curl -sSN --fail-with-body "$URL/v1/chat/completions" \
  -H 'Content-Type: application/json' \
  -d '{"model": "refimpl-sim", "stream": true,
       "messages": [{"role": "user", "content": "Why stream?"}],
       "simulate": {"tokens": 3, "ttft_ms": 100, "itl_ms": 50}}'
# endregion: curl-stream
