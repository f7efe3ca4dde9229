-- Admit requests against their quota entries, atomically, in one round trip.
--
-- For each request, checks every limit its entry sets and, only if all of
-- them admit it, takes from all of them: a request refused by one limit
-- consumes nothing from the others. Several requests may come in one call
-- (the gateway batches the requests of one event-loop turn); each is handled
-- in turn exactly as if it had come alone. Time is Redis server time (TIME),
-- never a gateway's clock, so replicas with skewed clocks agree.
--
-- KEYS, three per request (one hash tag, so one Redis Cluster slot):
--   rate bucket (string "tokens ts": tokens left, last update in ms),
--   in-flight slots (sorted set: member = slot id, score = expiry in ms),
--   LLM token budget (string "tokens ts")
-- ARGV[1]  slot ttl in ms (a crashed replica's slots expire after this)
-- then four per request:
--   the entry's limits, "rate_per_s burst max_concurrent tokens_per_minute" (0 = not limited),
--   slot id (unique per request), token cost,
--   rate tokens wanted: 1, or more for a gateway that leases a small local allowance
--   (it gets between 1 and that many, as many as the bucket holds)
--
-- Returns one string (cheaper for the gateway to decode than nested arrays):
-- five integers per request, all comma-separated, in request order:
--   allowed, reason, remaining, reset_ms, retry_ms
--   allowed   rate tokens granted (1, or up to the number wanted), 0 when refused
--   reason    0 ok, 1 rate, 2 concurrency, 3 tokens
--   remaining whole units left in the headline limit (rate, else tokens, else slots)
--   reset_ms  ms until the headline bucket is full again
--   retry_ms  ms until a retry can succeed (refusals only)

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local slot_ttl = tonumber(ARGV[1])

-- The level of a bucket now: what it held, plus what refilled since, capped.
-- A clock that stepped back (failover) refills nothing rather than draining.
local function level(key, capacity, per_ms)
  local v = redis.call('GET', key)
  local tokens, ts
  if v then
    local a, b = string.match(v, '^(%S+) (%S+)$')
    tokens, ts = tonumber(a), tonumber(b)
  end
  if tokens == nil or ts == nil then
    return capacity
  end
  local elapsed = now - ts
  if elapsed < 0 then elapsed = 0 end
  return math.min(capacity, tokens + elapsed * per_ms)
end

-- Store a bucket; it expires when it would be full again (an absent key is a full bucket).
local function store(key, tokens, capacity, per_ms)
  local ttl = math.min(math.ceil((capacity - tokens) / per_ms) + 1000, 1e15)  -- 1e15 ms: no exponent in the reply
  redis.call('SET', key, string.format('%.17g %.17g', tokens, now), 'PX', ttl)
end

local function acquire(kr, kc, kt, rate, burst, maxc, slot, tpm, cost, want)
  local rate_ms = rate / 1000
  local tok_ms = tpm / 60000
  local rtokens, ttokens, inflight = 0, 0, 0

  if rate > 0 then
    rtokens = level(kr, burst, rate_ms)
  end
  if tpm > 0 then
    ttokens = level(kt, tpm, tok_ms)
  end
  if maxc > 0 then
    redis.call('ZREMRANGEBYSCORE', kc, '-inf', now)
    inflight = redis.call('ZCARD', kc)
  end

  -- What the RateLimit-* headers describe.
  local function headline(allowed, reason, retry)
    if rate > 0 then
      return allowed, reason, math.floor(rtokens), math.ceil((burst - rtokens) / rate_ms), retry
    elseif tpm > 0 then
      return allowed, reason, math.max(0, math.floor(ttokens)), math.ceil((tpm - ttokens) / tok_ms), retry
    end
    return allowed, reason, math.max(0, maxc - inflight), 0, retry
  end

  if rate > 0 and rtokens < 1 then
    return headline(0, 1, math.ceil((1 - rtokens) / rate_ms))
  end
  if maxc > 0 and inflight >= maxc then
    return headline(0, 2, 1000)
  end
  if tpm > 0 and ttokens < cost then
    if cost > tpm then
      return headline(0, 3, 60000)  -- larger than the whole budget: never admissible
    end
    return headline(0, 3, math.ceil((cost - ttokens) / tok_ms))
  end

  local granted = 1
  if rate > 0 then
    if want > 1 then
      granted = math.min(want, math.floor(rtokens))
    end
    rtokens = rtokens - granted
    store(kr, rtokens, burst, rate_ms)
  end
  if maxc > 0 then
    redis.call('ZADD', kc, now + slot_ttl, slot)
    redis.call('PEXPIRE', kc, slot_ttl)
    inflight = inflight + 1
  end
  if tpm > 0 then
    ttokens = ttokens - cost
    store(kt, ttokens, tpm, tok_ms)
  end
  return headline(granted, 0, 0)
end

local out = {}
for i = 0, #KEYS / 3 - 1 do
  local k, a = i * 3, 1 + i * 4
  local rate, burst, maxc, tpm = string.match(ARGV[a + 1], '^(%S+) (%S+) (%S+) (%S+)$')
  local allowed, reason, remaining, reset, retry = acquire(
    KEYS[k + 1], KEYS[k + 2], KEYS[k + 3],
    tonumber(rate), tonumber(burst), tonumber(maxc), ARGV[a + 2], tonumber(tpm), tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4]))
  out[i + 1] = string.format('%d,%d,%d,%d,%d', allowed, reason, math.min(remaining, 1e15),
                             math.min(reset, 1e15), math.min(retry, 1e15))
end
return table.concat(out, ',')
