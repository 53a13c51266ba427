"""The Redis ledger's Lua scripts (see :class:`proxy.state.ledger.RedisLedger`): one script
per operation, so each operation is atomic on the server. Kept apart from the Python so the
two languages are read (and reviewed) one at a time."""

# KEYS[1] the counter hash, KEYS[2] the holds zset (member "<id>:<estimate>", score hold_until),
# KEYS[3] the settled holds zset (score: when settled; kept SETTLE_DEDUPE_S).
# Increments always use the decimal strings received (never a Lua number formatted back,
# which Lua 5.1 would print as 1e+15 past 14 digits).
_NEG = """
local function neg(s) if s == '0' then return s end return '-' .. s end
"""
_PURGE = _NEG + """
local function purge(h, z, now)
  local expired = redis.call('ZRANGEBYSCORE', z, '-inf', now)
  for _, m in ipairs(expired) do
    redis.call('HINCRBY', h, 'reserved', neg(string.match(m, ':(%d+)$')))
    redis.call('HINCRBY', h, 'rreq', -1)
  end
  if #expired > 0 then redis.call('ZREMRANGEBYSCORE', z, '-inf', now) end
end
local function totals(h)
  local v = redis.call('HMGET', h, 'spend', 'reserved', 'req', 'rreq')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0
end
"""

# ARGV: now, estimate, degraded_estimate, degrade_nano, degrade_req, cap_nano, cap_req,
#       refuse_flag, member_id, hold_until, ttl_s   (-1 / '' = unset)
RESERVE = _PURGE + """
local h, z = KEYS[1], KEYS[2]
purge(h, z, ARGV[1])
local spend, reserved, req, rreq = totals(h)
local dn, dr = tonumber(ARGV[4]), tonumber(ARGV[5])
local degraded = (dn >= 0 and spend >= dn) or (dr >= 0 and req >= dr)
local est = degraded and ARGV[3] or ARGV[2]
local cap, capr = tonumber(ARGV[6]), tonumber(ARGV[7])
local ok = true
if cap >= 0 and (spend >= cap or spend + reserved + tonumber(est) > cap) then ok = false end
if capr >= 0 and req + rreq + 1 > capr then ok = false end
local fired = 0
if ok then
  reserved = redis.call('HINCRBY', h, 'reserved', est)
  rreq = redis.call('HINCRBY', h, 'rreq', 1)
  redis.call('ZADD', z, ARGV[10], ARGV[9] .. ':' .. est)
  redis.call('EXPIRE', z, ARGV[11])
elseif ARGV[8] ~= '' then
  fired = redis.call('HSETNX', h, 'f:' .. ARGV[8], 1)
end
redis.call('EXPIRE', h, ARGV[11])
return {ok and 1 or 0, degraded and 1 or 0, tonumber(est), spend, reserved, req, rreq, fired}
"""

# ARGV: member, estimate, cost, counted (0|1), ttl_s, now, dedupe_since,
#       then (flag, spend_at, req_at)*
SETTLE = _NEG + """
local h, z, d = KEYS[1], KEYS[2], KEYS[3]
redis.call('ZREMRANGEBYSCORE', d, '-inf', '(' .. ARGV[7])
if redis.call('ZADD', d, 'NX', ARGV[6], ARGV[1]) == 0 then
  local v = redis.call('HMGET', h, 'spend', 'reserved', 'req', 'rreq')
  return {tonumber(v[1]) or 0, tonumber(v[2]) or 0, tonumber(v[3]) or 0, tonumber(v[4]) or 0, 0}
end
redis.call('EXPIRE', d, ARGV[5])
if redis.call('ZREM', z, ARGV[1]) == 1 then
  redis.call('HINCRBY', h, 'reserved', neg(ARGV[2]))
  redis.call('HINCRBY', h, 'rreq', -1)
end
local spend = redis.call('HINCRBY', h, 'spend', ARGV[3])
local req = redis.call('HINCRBY', h, 'req', ARGV[4])
redis.call('EXPIRE', h, ARGV[5])
local v = redis.call('HMGET', h, 'reserved', 'rreq')
local out = {spend, tonumber(v[1]) or 0, req, tonumber(v[2]) or 0, 1}
for i = 8, #ARGV, 3 do
  local sa, ra = tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  if (sa >= 0 and spend >= sa) or (ra >= 0 and req >= ra) then
    if redis.call('HSETNX', h, 'f:' .. ARGV[i], 1) == 1 then table.insert(out, ARGV[i]) end
  end
end
return out
"""

# ARGV: member, estimate
REFUND = _PURGE + """
local h, z = KEYS[1], KEYS[2]
if redis.call('ZREM', z, ARGV[1]) == 1 then
  redis.call('HINCRBY', h, 'reserved', neg(ARGV[2]))
  redis.call('HINCRBY', h, 'rreq', -1)
end
local spend, reserved, req, rreq = totals(h)
return {spend, reserved, req, rreq}
"""

READ = "return redis.call('HGETALL', KEYS[1])"
