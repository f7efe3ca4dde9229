-- Give back what finished requests held: the in-flight slot, and the part of
-- the LLM token reservation not used (or charge what was used beyond it).
-- Several requests may come in one call; each is handled in turn.
--
-- KEYS, two per request: in-flight slots (sorted set), LLM token budget (string "tokens ts")
-- ARGV, three per request:
--   slot id ('' = none), tokens_per_minute (0 = no budget),
--   refund = reserved - used (negative charges the overshoot)
-- Returns one string: per request the budget's remaining whole tokens (0 without
-- a budget), comma-separated.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000

local function release(kc, kt, slot, tpm, refund)
  if slot ~= '' then
    redis.call('ZREM', kc, slot)
  end
  if tpm <= 0 then
    return 0
  end
  local per_ms = tpm / 60000
  local v = redis.call('GET', kt)
  local tokens, ts
  if v then
    local a, b = string.match(v, '^(%S+) (%S+)$')
    tokens, ts = tonumber(a), tonumber(b)
  end
  if tokens == nil or ts == nil then
    tokens = tpm
  else
    local elapsed = now - ts
    if elapsed < 0 then elapsed = 0 end
    tokens = math.min(tpm, tokens + elapsed * per_ms)
  end
  if refund ~= 0 then
    -- May go below zero: a request that used more than it reserved leaves a
    -- debt that later requests wait out.
    tokens = math.min(tpm, tokens + refund)
    local ttl = math.min(math.ceil((tpm - tokens) / per_ms) + 1000, 1e15)
    redis.call('SET', kt, string.format('%.17g %.17g', tokens, now), 'PX', ttl)
  end
  return math.max(0, math.floor(tokens))
end

local out = {}
for i = 0, #KEYS / 2 - 1 do
  local k, a = i * 2, i * 3
  out[i + 1] = string.format('%d', math.min(1e15, release(KEYS[k + 1], KEYS[k + 2], ARGV[a + 1], tonumber(ARGV[a + 2]),
                                                    tonumber(ARGV[a + 3]))))
end
return table.concat(out, ',')
