-- The telemetry of a response for dataplane native, taken as Envoy streams it to the client.
--
-- Envoy runs this on its worker for each response; bodyChunks() hands over the chunks as they
-- pass, without buffering the response. What it finds goes into the request's dynamic metadata
-- (namespace "extproc"), which the gRPC access log carries to the sidecar:
--   first_token_us  when the first chunk with answer text (or a tool call) passed; for a body
--                   that is not SSE, when its first chunk passed. Microseconds since the epoch;
--   text            the answer's first characters, still JSON-escaped (refusal checks); absent
--                   when they could not be found (a JSON body cut at HEAD_BYTES before them);
--   tool_calls      true when the answer called a tool;
--   cached_prompt_tokens  the prompt-cache hits an SSE stream reported before its answer
--                   (Anthropic's message_start); later usage is in the tail;
--   tail            the last 1 KiB of the body ("usage" and "finish_reason" are at the end).
-- SSE lines are read whole (a line cut between chunks waits for the rest) and only until
-- TEXT_BYTES of text are held; a JSON body is read from its first HEAD_BYTES. After that a chunk
-- costs a length check and a copy of its last bytes.

local TEXT_BYTES = 2400 -- the sidecar's SIGNAL_CHARS (600) at up to 4 bytes a character
local HEAD_BYTES = 65536
local TAIL_BYTES = 1024
local TOOL = '"tool_calls"%s*:%s*%[%s*{'
local CACHED = '"cache_read_input_tokens"%s*:%s*(%d+)'

-- Calls found(piece) for each "content" string in s, still escaped, and for an unterminated
-- last one found(rest, true). Escapes are skipped whole, so \" never ends a string.
local function contents(s, found)
  local pos = 1
  while true do
    local _, open = string.find(s, '"content"%s*:%s*"', pos)
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

local function now_us(handle)
  return tonumber(handle:timestampString(EnvoyTimestampResolution.MICROSECOND))
end

function envoy_on_response(handle)
  local sse = string.find(handle:headers():get("content-type") or "", "text/event-stream", 1, true)
  local first, tools, cached = nil, false, nil
  local text, held = {}, 0
  local pending = "" -- SSE: the unfinished last line; JSON: the head of the body
  local cut = false -- JSON: the body was longer than HEAD_BYTES
  local tail = ""
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n > 0 then
      if sse and held < TEXT_BYTES then
        local s = pending .. chunk:getBytes(0, n)
        local last = 0
        repeat
          local at = string.find(s, "\n", last + 1, true)
          if at then last = at end
        until at == nil
        local lines = string.sub(s, 1, last)
        pending = string.sub(s, last + 1)
        contents(lines, function(piece)
          if #piece > 0 then
            text[#text + 1] = piece
            held = held + #piece
            if first == nil then first = now_us(handle) end
          end
        end)
        if cached == nil then cached = string.match(lines, CACHED) end
        if not tools and string.find(lines, TOOL) then
          tools = true
          if first == nil then first = now_us(handle) end
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
  if sse then
    md:set("extproc", "text", string.sub(table.concat(text), 1, TEXT_BYTES))
  else
    tools = string.find(pending, TOOL) ~= nil
    local answer = nil
    contents(pending, function(piece, unterminated)
      if answer == nil and (cut or not unterminated) then answer = piece end
    end)
    if answer ~= nil then
      md:set("extproc", "text", string.sub(answer, 1, TEXT_BYTES))
    elseif not cut then
      md:set("extproc", "text", "")
    end
  end
  if first ~= nil then md:set("extproc", "first_token_us", first) end
  if tools then md:set("extproc", "tool_calls", true) end
  if cached ~= nil then md:set("extproc", "cached_prompt_tokens", tonumber(cached)) end
  md:set("extproc", "tail", tail)
end
