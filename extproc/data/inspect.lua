-- The telemetry of a response for dataplane native, taken as Envoy streams it to the client.
--
-- Envoy runs this on its worker for each response; bodyChunks() hands over the chunks as they
-- pass, without buffering the response. What it finds goes into the request's dynamic metadata
-- (namespace "extproc"), which the gRPC access log carries to the sidecar:
--   format          the API the body speaks (FORMATS below), from the markers of its first
--                   events or its head; absent when none was found (timing only);
--   first_token_us  when the first chunk with answer text (or a tool call) passed; for a body
--                   that is not SSE, when its first chunk passed. Microseconds since the epoch;
--   text            the answer's first characters, still JSON-escaped (refusal checks); absent
--                   when they could not be found (a JSON body cut at HEAD_BYTES before them);
--   tool_calls      true when the answer called a tool;
--   prompt_tokens, completion_tokens, cached_prompt_tokens  the usage counts, found in the
--                   body's last 1 KiB (every API reports them at the end): the last believable
--                   (uint32) count of each side, the cache hits of the last count of them; an
--                   SSE stream's first event's (Anthropic's message_start) where the end has none;
--   finish_reason   why the answer ended ("finish_reason", Anthropic's "stop_reason"): the last
--                   one in the body's last 1 KiB, at most 32 of [a-z_].
-- SSE lines are read whole (a line cut between chunks waits for the rest) and only until
-- TEXT_BYTES of text are held (or HEAD_BYTES passed without a known format); a JSON body is read
-- from its first HEAD_BYTES. After that a chunk costs a length check and a copy of its last bytes.
-- inspect.c is the same reading compiled as an Envoy dynamic module (cheaper for Envoy; see
-- extproc/envoyconf/inspector.py): change both, tests/integration/test_inspector_live.py holds
-- them to the same output.

local TEXT_BYTES = 2400 -- the sidecar's SIGNAL_CHARS (600) at up to 4 bytes a character
local HEAD_BYTES = 65536
local TAIL_BYTES = 1024
local CACHED = '"cache_read_input_tokens"%s*:%s*(%d+)'
local CACHED_TOKENS = '"cached_tokens"%s*:%s*(%d+)'
local INPUT = '"input_tokens"%s*:%s*(%d+)'
local OUTPUT = '"output_tokens"%s*:%s*(%d+)'
local OPENAI_USAGE = {
  prompt = '"prompt_tokens"%s*:%s*(%d+)', completion = '"completion_tokens"%s*:%s*(%d+)',
  finish = '"finish_reason"%s*:%s*"([a-z_]+)"',
}
local MAX_COUNT = 4294967296 -- 2^32: the counts are uint32 fields; a larger one is not believable
local MAX_REASON = 32

-- Where each API keeps its answer text: the string value of `key` (in a stream `sse_key`, where
-- given), in a stream only after `sse` (the event type of a text delta; nil: in every event), in a
-- body only after `json` (the first match is the answer); a `refusal` where the API puts one
-- in its own field (OpenAI's structured refusal); the mark of a tool call; and its usage counts
-- and finish reason (`usage`). The sidecar reads the same (extproc/telemetry/formats.py).
local FORMATS = {
  chat = {
    key = '"content"%s*:%s*"', refusal = '"refusal"%s*:%s*"', tool = '"tool_calls"%s*:%s*%[%s*{',
    usage = OPENAI_USAGE,
  },
  completions = { key = '"text"%s*:%s*"', usage = OPENAI_USAGE },
  responses = {
    key = '"text"%s*:%s*"', sse = '"response%.output_text%.delta"', sse_key = '"delta"%s*:%s*"',
    json = '"output_text"', tool = '"type"%s*:%s*"function_call"',
    usage = { prompt = INPUT, completion = OUTPUT },
  },
  messages = {
    key = '"text"%s*:%s*"', sse = '"text_delta"', json = '"type"%s*:%s*"text"',
    tool = '"type"%s*:%s*"tool_use"',
    usage = { prompt = INPUT, completion = OUTPUT, finish = '"stop_reason"%s*:%s*"([a-z_]+)"' },
  },
}

-- The formats an "object" names (the event "type" prefixes are in format_of).
local OBJECTS = {
  ["chat.completion"] = "chat", ["chat.completion.chunk"] = "chat",
  text_completion = "completions", response = "responses",
}

-- The format s (whole SSE lines, or a body's head) shows, else nil: by its first "object", else
-- its first "type", else the shape of its choices. Each costs one scan, cut short where found.
local function format_of(s)
  local found = OBJECTS[string.match(s, '"object"%s*:%s*"([%w_%.]*)"') or ""]
  if found then return found end
  local kind = string.match(s, '"type"%s*:%s*"([%w_%.]*)"')
  if kind and string.sub(kind, 1, 9) == "response." then
    return "responses"
  elseif kind and string.sub(kind, 1, 7) == "message" then
    return "messages"
  elseif string.find(s, '"choices"', 1, true) then -- a server that names no "object"
    if string.find(s, '"delta"%s*:%s*{') or string.find(s, '"message"%s*:%s*{') then
      return "chat"
    elseif string.find(s, '"text"%s*:') then
      return "completions"
    end
  end
  return nil
end

-- Calls found(piece) for each string value of key (a pattern ending in the opening quote) in s
-- that follows an anchor (when given), still escaped, and for an unterminated last one
-- found(rest, true). Escapes are skipped whole, so \" never ends a string.
local function strings(s, anchor, key, found)
  local pos = 1
  while true do
    if anchor then
      local _, at = string.find(s, anchor, pos)
      if at == nil then return end
      pos = at + 1
    end
    local _, open = string.find(s, key, pos)
    if open == nil then return end
    local i = open + 1
    while true do
      local q = string.find(s, '["\\]', i)
      if q == nil then
        found(string.sub(s, open + 1), true)
        return
      end
      if string.byte(s, q) == 34 then -- the closing quote
        found(string.sub(s, open + 1, q - 1), false)
        pos = q + 1
        break
      end
      i = q + 2
    end
  end
end

-- Envoy hands these strings to the sidecar in protobuf string fields, which must be UTF-8: one
-- bad byte (the body's own, or a cut inside a character) would fail the whole access-log message
-- that carries it, and with it every other request's entry. So each byte that does not start a
-- valid character (RFC 3629: no overlongs or surrogates), and NUL (which this filter's
-- dynamicMetadata():set would cut the string at), is written as "?". ASCII costs one scan.
local function clean(s)
  if not string.find(s, "[%z\128-\255]") then return s end
  local out, i, n = {}, 1, #s
  while i <= n do
    local c = string.byte(s, i)
    local k = 0
    if c ~= 0 and c < 0x80 then k = 1
    elseif c >= 0xC2 and c <= 0xDF then k = 2
    elseif c >= 0xE0 and c <= 0xEF then k = 3
    elseif c >= 0xF0 and c <= 0xF4 then k = 4 end
    local ok = k > 0 and i + k - 1 <= n
    local lo = (c == 0xE0 and 0xA0) or (c == 0xF0 and 0x90) or 0x80
    local hi = (c == 0xED and 0x9F) or (c == 0xF4 and 0x8F) or 0xBF
    for j = 1, k - 1 do
      if not ok then break end
      local d = string.byte(s, i + j)
      ok = d >= lo and d <= hi
      lo, hi = 0x80, 0xBF
    end
    if ok then
      out[#out + 1] = string.sub(s, i, i + k - 1)
      i = i + k
    else
      out[#out + 1] = "?"
      i = i + 1
    end
  end
  return table.concat(out)
end

-- The capture of the last match of pat in s that ok accepts, and where that match starts. Each
-- match is sought from the character after the previous one's start, as inspect.c does.
local function last_match(s, pat, ok)
  local value, at, init = nil, nil, 1
  while true do
    local a, _, v = string.find(s, pat, init)
    if a == nil then return value, at end
    if ok(v) then value, at = v, a end
    init = a + 1
  end
end

local function any() return true end
local function believable(v) return tonumber(v) < MAX_COUNT end
local function reason(v) return #v <= MAX_REASON end

-- The usage counts and the finish reason in the body's tail (see the header), the counts with an
-- SSE stream's first event's (cached, prompt) where the tail has none.
local function usage(md, tail, spec, cached, prompt)
  local u = spec.usage
  local p = last_match(tail, u.prompt, believable) or prompt
  if p ~= nil then md:set("extproc", "prompt_tokens", tonumber(p)) end
  local c = last_match(tail, u.completion, believable)
  if c ~= nil then md:set("extproc", "completion_tokens", tonumber(c)) end
  local hit, at = last_match(tail, CACHED_TOKENS, any)
  local hit2, at2 = last_match(tail, CACHED, any)
  if hit2 ~= nil and (hit == nil or at2 > at) then hit = hit2 end
  if hit == nil then
    hit = cached
  elseif not believable(hit) then
    hit = nil
  end
  if hit ~= nil then md:set("extproc", "cached_prompt_tokens", tonumber(hit)) end
  local why = u.finish and last_match(tail, u.finish, reason)
  if why then md:set("extproc", "finish_reason", why) end
end

local function now_us(handle)
  return tonumber(handle:timestampString(EnvoyTimestampResolution.MICROSECOND))
end

function envoy_on_response(handle)
  local sse = string.find(handle:headers():get("content-type") or "", "text/event-stream", 1, true)
  local fmt, spec = nil, nil
  local first, tools, cached, prompt = nil, false, nil, nil
  local text, held, seen = {}, 0, 0
  local pending = "" -- SSE: the unfinished last line; JSON: the head of the body
  local cut = false -- JSON: the body was longer than HEAD_BYTES
  local tail = ""
  local function keep(piece) -- a piece of a stream's answer text
    if #piece > 0 then
      text[#text + 1] = piece
      held = held + #piece
      if first == nil then first = now_us(handle) end
    end
  end
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n > 0 then
      if sse and held < TEXT_BYTES and (fmt or seen < HEAD_BYTES) then
        local s = pending .. chunk:getBytes(0, n)
        seen = seen + n
        local last = 0
        repeat
          local at = string.find(s, "\n", last + 1, true)
          if at then last = at end
        until at == nil
        local lines = string.sub(s, 1, last)
        pending = string.sub(s, last + 1)
        if fmt == nil then
          fmt = format_of(lines)
          spec = FORMATS[fmt]
        end
        if spec then
          strings(lines, spec.sse, spec.sse_key or spec.key, keep)
          if spec.refusal then strings(lines, nil, spec.refusal, keep) end
          if fmt == "messages" then
            if cached == nil then cached = string.match(lines, CACHED) end
            if prompt == nil then prompt = string.match(lines, INPUT) end
          end
          if spec.tool and not tools and string.find(lines, spec.tool) then
            tools = true
            if first == nil then first = now_us(handle) end
          end
        end
      elseif not sse then
        if first == nil then first = now_us(handle) end
        if #pending < HEAD_BYTES then
          local k = math.min(n, HEAD_BYTES - #pending)
          pending = pending .. chunk:getBytes(0, k)
          cut = cut or k < n
        else
          cut = true
        end
      end
      local k = math.min(n, TAIL_BYTES)
      tail = string.sub(tail .. chunk:getBytes(n - k, k), -TAIL_BYTES)
    end
  end
  local md = handle:streamInfo():dynamicMetadata()
  if not sse then
    fmt = format_of(pending)
    spec = FORMATS[fmt]
  end
  if spec and sse then
    md:set("extproc", "text", clean(string.sub(table.concat(text), 1, TEXT_BYTES)))
  elseif spec then
    tools = spec.tool ~= nil and string.find(pending, spec.tool) ~= nil
    local answer = nil
    local function found(piece, unterminated)
      if answer == nil and (cut or not unterminated) then answer = piece end
    end
    strings(pending, spec.json, spec.key, found)
    if answer == nil and spec.refusal then strings(pending, nil, spec.refusal, found) end
    if answer ~= nil then
      md:set("extproc", "text", clean(string.sub(answer, 1, TEXT_BYTES)))
    elseif not cut then
      md:set("extproc", "text", "")
    end
  end
  if fmt then md:set("extproc", "format", fmt) end
  if first ~= nil and (spec or not sse) then md:set("extproc", "first_token_us", first) end
  if tools then md:set("extproc", "tool_calls", true) end
  if spec then usage(md, tail, spec, cached, prompt) end
end
