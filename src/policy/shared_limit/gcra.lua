-- One decision of a shared GCRA bucket (the algorithm of the gateway's local buckets).
-- KEYS[1]: the bucket, holding its theoretical arrival time (TAT) in microseconds of the
--          Redis clock, so every gateway counts against the same clock.
-- ARGV[1]: emission interval (microseconds a token takes to come back, may be fractional)
-- ARGV[2]: tolerance (interval x burst: how far ahead of now the TAT may run)
-- ARGV[3]: tokens wanted (1, or a lease); fewer are granted when fewer are left
-- Returns {granted, remaining, reset_us, retry_after_us}. The key expires when its bucket
-- is full again, so an idle key is the same as a key never seen, and vanishes.
if redis.replicate_commands then
  redis.replicate_commands()
end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
if not interval or not tolerance or not want or interval <= 0 or tolerance < interval or want < 1 then
  return redis.error_reply('switchyard gcra: bad arguments')
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then
  tat = now
end
-- Tokens left: whole intervals between the TAT and now + tolerance (the epsilon absorbs
-- rounding of fractional intervals).
local granted = math.floor((tolerance - (tat - now)) / interval + 1e-9)
if granted > want then
  granted = want
end
if granted < 1 then
  return {0, 0, math.ceil(tat - now), math.ceil(tat + interval - tolerance - now)}
end
local new_tat = tat + granted * interval
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
local remaining = math.floor((tolerance - (new_tat - now)) / interval + 1e-9)
return {granted, remaining, math.ceil(new_tat - now), 0}
