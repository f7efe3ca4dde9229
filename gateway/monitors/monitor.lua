-- Per-caller query-stream monitors: the window of the last N rows' suspicion bits and the alarm.
--
-- One key per (monitor, subject, model): the string "until_ms bits", where bits
-- holds the last N rows' suspicion ('1' suspicious, '0' not), oldest first, and
-- until_ms is when the alarm ends (0: never raised). Several requests may come in
-- one call (the gateway batches one event-loop turn); each is handled in turn.
-- Time is Redis server time, so replicas with skewed clocks agree.
--
-- KEYS: one per request.
-- ARGV: one per request, "op N alarm_rate alarm_for_ms bits": op "u" (update) or "r" (read: no bits),
-- window N, alarm rate, alarm duration in ms, the new rows' bits (one string: cheap for the client to encode).
-- An update slides the window over every new row: an alarm is raised when any full window
-- ending in the new rows has more than alarm_rate * N suspicious rows (so padding the end of a
-- request with honest rows hides nothing), and lasts alarm_for_ms after the last such window.
-- Returns one string: per request "remaining_ms,raised" (raised 1 when this call started an alarm).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 1, #KEYS do
  local op, sn, srate, sfor, new = string.match(ARGV[i], '^(%a) (%S+) (%S+) (%S+) ?([01]*)$')
  local n, rate, alarm_for = tonumber(sn), tonumber(srate), tonumber(sfor)
  local key = KEYS[i]
  local v = redis.call('GET', key)
  local until_ms, bits = 0, ''
  if v then
    local x, y = string.match(v, '^(%d+) ?([01]*)$')
    until_ms, bits = tonumber(x) or 0, y or ''
  end
  local raised = 0
  if op == 'u' and #new > 0 then
    local was = until_ms > now
    local all = bits .. new
    local start = #bits + 1
    local lo = math.max(1, start - n)
    local cnt = 0
    for j = lo, start - 1 do
      if string.byte(all, j) == 49 then cnt = cnt + 1 end
    end
    local hit = false
    for j = start, #all do
      if string.byte(all, j) == 49 then cnt = cnt + 1 end
      local drop = j - n
      if drop >= 1 and string.byte(all, drop) == 49 then cnt = cnt - 1 end
      if j >= n and cnt > rate * n then hit = true end
    end
    if hit then
      until_ms = now + alarm_for
      if not was then raised = 1 end
    end
    bits = string.sub(all, -n)
    local ttl = math.max(until_ms - now, 86400000)
    redis.call('SET', key, string.format('%d %s', until_ms, bits), 'PX', ttl)
  end
  out[i] = string.format('%d,%d', math.max(0, until_ms - now), raised)
end
return table.concat(out, ',')
