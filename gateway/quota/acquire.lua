-- Admit requests against their quota entries, atomically, in one round trip.
--
-- For each request, checks every limit its entry sets and, only if all of
-- them admit it, takes from all of them: a request refused by one limit
-- consumes nothing from the others. Several requests may come in one call
-- (the gateway batches the requests of one event-loop turn); each is handled
-- in turn exactly as if it had come alone. Time is Redis server time (TIME),
-- never a gateway's clock, so replicas with skewed clocks agree.
--
-- KEYS, five per request (one hash tag, so one Redis Cluster slot):
--   rate bucket (string "tokens ts": tokens left, last update in ms),
--   in-flight slots (sorted set: member = slot id, score = expiry in ms),
--   LLM token budget (string "tokens ts"),
--   per-day total (string "day used": the UTC day number since the epoch, units used in it),
--   per-month total (string "month used": year * 12 + month - 1, units used in it)
-- ARGV[1]  slot ttl in ms (a crashed replica's slots expire after this)
-- then five per request:
--   the entry's limits, "rate_per_s burst max_concurrent tokens_per_minute per_day per_month" (0 = not limited),
--   slot id (unique per request), token cost,
--   rate tokens wanted: 1, or more for a gateway that leases a small local allowance
--   (it gets between 1 and that many, as many as the bucket holds),
--   units: what the request costs in the rate bucket and the day/month totals (1, or its rows)
--
-- Day and month are UTC calendar windows computed here from Redis TIME, so every
-- replica counts into the same window; a refusal by one of them has retry_ms =
-- the time to the window's end, and its remaining/reset describe that window.
--
-- Returns one string (cheaper for the gateway to decode than nested arrays):
-- five integers per request, all comma-separated, in request order:
--   allowed, reason, remaining, reset_ms, retry_ms
--   allowed   rate tokens granted (1, or up to the number wanted), 0 when refused
--   reason    0 ok, 1 rate, 2 concurrency, 3 tokens, 4 day, 5 month
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

-- Hinnant's civil calendar: days since 1970-01-01 <-> (year, month, day), proleptic Gregorian.
local function civil(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

local function days(y, m)  -- the first day of month m of year y, in days since the epoch
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = math.floor((153 * mp + 2) / 5)
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end

local today = math.floor(now / 86400000)
local day_end = (today + 1) * 86400000
local year, month = civil(today)
local month_id = year * 12 + month - 1
local month_end
if month == 12 then month_end = days(year + 1, 1) * 86400000 else month_end = days(year, month + 1) * 86400000 end

local function used(key, id)
  local v = redis.call('GET', key)
  if v then
    local a, b = string.match(v, '^(%S+) (%S+)$')
    if tonumber(a) == id then return tonumber(b) or 0 end
  end
  return 0
end

local function acquire(kr, kc, kt, kd, km, rate, burst, maxc, slot, tpm, cost, want, pday, pmonth, units)
  local rate_ms = rate / 1000
  local tok_ms = tpm / 60000
  local rtokens, ttokens, inflight = 0, 0, 0
  local dused, mused = 0, 0
  if pday > 0 then dused = used(kd, today) end
  if pmonth > 0 then mused = used(km, month_id) end
  -- a spent calendar window decides first: its retry (the window's end) is the honest one
  if pday > 0 and dused + units > pday then
    return 0, 4, math.max(0, pday - dused), day_end - now, day_end - now
  end
  if pmonth > 0 and mused + units > pmonth then
    return 0, 5, math.max(0, pmonth - mused), month_end - now, month_end - now
  end

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
    elseif maxc > 0 then
      return allowed, reason, math.max(0, maxc - inflight), 0, retry
    elseif pday > 0 then
      return allowed, reason, math.max(0, pday - dused), day_end - now, retry
    end
    return allowed, reason, math.max(0, pmonth - mused), month_end - now, retry
  end

  if rate > 0 and rtokens < units then
    if units > burst then
      return headline(0, 1, math.ceil(burst / rate_ms))  -- more rows than the burst: never admissible
    end
    return headline(0, 1, math.ceil((units - rtokens) / rate_ms))
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
    local take = units
    if want > 1 then
      granted = math.min(want, math.floor(rtokens))
      take = granted
    end
    rtokens = rtokens - take
    store(kr, rtokens, burst, rate_ms)
  end
  if pday > 0 then
    dused = dused + units
    redis.call('SET', kd, string.format('%d %d', today, dused), 'PX', math.ceil(day_end - now) + 3600000)
  end
  if pmonth > 0 then
    mused = mused + units
    redis.call('SET', km, string.format('%d %d', month_id, mused), 'PX', math.ceil(month_end - now) + 3600000)
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
for i = 0, #KEYS / 5 - 1 do
  local k, a = i * 5, 1 + i * 5
  local rate, burst, maxc, tpm, pday, pmonth = string.match(ARGV[a + 1], '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$')
  local allowed, reason, remaining, reset, retry = acquire(
    KEYS[k + 1], KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5],
    tonumber(rate), tonumber(burst), tonumber(maxc), ARGV[a + 2], tonumber(tpm), tonumber(ARGV[a + 3]),
    tonumber(ARGV[a + 4]), tonumber(pday), tonumber(pmonth), tonumber(ARGV[a + 5]))
  out[i + 1] = string.format('%d,%d,%d,%d,%d', allowed, reason, math.min(remaining, 1e15),
                             math.min(reset, 1e15), math.min(retry, 1e15))
end
return table.concat(out, ',')
