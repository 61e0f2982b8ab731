#!/bin/sh
# An instant CodeBuddy CLI for the benchmark: reads the prompt (one line) from stdin and prints one
# stream-json `result` line echoing it. A prompt containing "[busy]" runs `sleep 600` instead, in the
# CLI's process group, and is found by the bench through its CODEBUDDY_BENCH_SUBJECT marker (for cancel timing).
IFS= read -r prompt
case "$prompt" in
  *"[busy]"*)
    sleep 600 &
    wait
    exit 0 ;;
esac
printf '{"type":"result","subtype":"success","is_error":false,"result":"done: %s","session_id":"bench"}\n' "$prompt"
