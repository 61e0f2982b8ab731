#!/bin/sh
# An instant CodeBuddy CLI for the benchmark, speaking the stream-json input protocol the bot uses: it answers
# `initialize`, and each user message at once with one `result` line echoing it (it does not replay messages, so
# the bot follows its lines as they come). A prompt containing "[busy]" starts `sleep 600` instead (a tool left
# running, found by the bench through its CODEBUDDY_BENCH_SUBJECT marker); `interrupt` kills it and is answered.
busy=""
while IFS= read -r line; do
  case "$line" in
    *'"subtype": "initialize"'*)
      printf '{"type":"control_response","response":{"subtype":"success","request_id":"initialize","response":{}}}\n' ;;
    *'"subtype": "interrupt"'*)
      id=${line#*\"request_id\": \"}; id=${id%%\"*}
      [ -n "$busy" ] && kill "$busy" 2>/dev/null && wait "$busy" 2>/dev/null
      busy=""
      printf '{"type":"control_response","response":{"subtype":"success","request_id":"%s","response":{"interrupted":true}}}\n' "$id" ;;
    *'"type": "user"'*)
      prompt=${line#*\"content\": \"}; prompt=${prompt%%\"*}
      case "$prompt" in
        *"[busy]"*) sleep 600 & busy=$! ;;
        *) printf '{"type":"result","subtype":"success","is_error":false,"result":"done: %s","session_id":"bench"}\n' "$prompt" ;;
      esac ;;
  esac
done
