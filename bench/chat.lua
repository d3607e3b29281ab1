-- wrk script: POST a short chat completion with a Bearer key.
-- BENCH_KEY: the key (omitted when empty, for the mock); BENCH_BODY: the JSON body (bench/run.py
-- passes its own so that wrk and the readiness check send the same request).
wrk.method = "POST"
wrk.path = os.getenv("BENCH_PATH") or "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end
wrk.body = os.getenv("BENCH_BODY")
  or '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in five words."}],"max_tokens":16}'
