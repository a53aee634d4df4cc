-- wrk script for bench/run.py: a chat-completion POST with a new x-conversation-id per request.
--
-- Why a new id per request: the sidecar hashes the sticky key on every request, and the bare
-- Envoy baseline ignores it; reusing one id would let nothing differ between requests. The
-- prefix (first script argument) keeps ids of different runs apart.
--
-- At the end it prints one line, "BENCH_JSON {...}", with the request count, the error counts and
-- latency percentiles in microseconds, which bench/run.py parses (wrk's own text output has no
-- p90/p99.9 and rounds to two digits).

local threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
  table.insert(threads, thread)
end

function init(args)
  prefix = (args[1] or "conv") .. "-" .. tostring(tid) .. "-"
  counter = 0
  wrk.method = "POST"
  wrk.path = "/v1/chat/completions"
  wrk.body = '{"model":"m","messages":[{"role":"user","content":"hi"}]}'
  wrk.headers["content-type"] = "application/json"
end

function request()
  counter = counter + 1
  wrk.headers["x-conversation-id"] = prefix .. counter
  return wrk.format()
end

function done(summary, latency, requests)
  local e = summary.errors
  local parts = {
    string.format('"requests":%d', summary.requests),
    string.format('"duration_us":%d', summary.duration),
    string.format('"bytes":%d', summary.bytes),
    string.format('"errors_connect":%d', e.connect),
    string.format('"errors_read":%d', e.read),
    string.format('"errors_write":%d', e.write),
    string.format('"errors_status":%d', e.status),
    string.format('"errors_timeout":%d', e.timeout),
    string.format('"lat_mean_us":%.1f', latency.mean),
    string.format('"lat_max_us":%d', latency.max),
  }
  for _, p in ipairs({50, 90, 99, 99.9}) do
    table.insert(parts, string.format('"p%s_us":%d', tostring(p), latency:percentile(p)))
  end
  io.write("BENCH_JSON {" .. table.concat(parts, ",") .. "}\n")
end
