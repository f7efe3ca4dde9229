-- Keep alive the in-flight slots of requests that are still running.
--
-- A slot's score is its expiry; a replica refreshes every slot it holds every
-- TTL/3, so only the slots of a replica that died ever reach their expiry.
-- A slot is only pushed forward, never created (ZADD XX): a request that ended
-- while this call was on its way has been removed (release.lua) and stays so.
--
-- KEYS     in-flight slot sets (sorted sets), any number
-- ARGV[1]  slot ttl in ms
-- then, per key: the number n of slot ids, then the n slot ids
-- Returns the number of slots found and refreshed.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local ttl = tonumber(ARGV[1])
local expiry = now + ttl
local a = 2
local kept = 0
for i = 1, #KEYS do
  local key = KEYS[i]
  local n = tonumber(ARGV[a])
  for j = a + 1, a + n do
    if redis.call('ZSCORE', key, ARGV[j]) then
      redis.call('ZADD', key, 'XX', expiry, ARGV[j])
      kept = kept + 1
    end
  end
  a = a + n + 1
  redis.call('PEXPIRE', key, ttl)  -- a no-op on a key that is gone
end
return kept
