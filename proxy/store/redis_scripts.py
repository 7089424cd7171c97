"""The Lua scripts of the Redis store (`proxy.store.redis`), each one atomic step on the server.

Their KEYS and ARGV are documented above each; the key layout and the integer arithmetic they
rely on (micro-units, `%d`, never `tostring`) are described in `proxy.store.redis`.
"""

# One script run reserves a whole batch of calls, each all-or-nothing on its own, in order (a
# later call of the batch sees what an earlier one recorded, exactly as separate runs would).
# KEYS: two per item, the calls' items one after another: the item's log (ZSET) and its ledger
#   total (STRING, budgets only).
# ARGV: call count, replay check ("1": a resend, whose first run's reply may have been lost;
#   "0": a first send, whose fresh reservation ids cannot be recorded yet), then per call: now_us
#   ("" = use the server's TIME), reservation id, item count, then six per item:
#   kind ("s" slot | "c" charge), enforce ("1" | "0"), window_us, horizon_us,
#   slot: max_calls (-1 = none), cooldown_us    charge: max_micros, cost_micros
# Returns two tables per call, {outcomes, members, outcomes, members, ...}: outcomes is six
#   integers per item: ok (1|0), limit (0 none | 1 max_calls | 2 cooldown | 3 max_spend),
#   count, elapsed_us, spent_micros, retry_us (-1 = none);
# members is one string per item: the member recorded for it, or "" if nothing was recorded.
RESERVE_LUA = r"""
local function fmt(x) return string.format('%d', x) end
local function amount_of(member) return tonumber(string.match(member, ':(%d+)$')) or 0 end

local server_now
local function clock(arg)
  if arg ~= '' then return tonumber(arg) end
  if not server_now then
    local t = redis.call('TIME')
    server_now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return server_now
end

-- One call: its arguments start at ARGV[a + 1], its keys after KEYS[k].
local check_replay = ARGV[2] == '1'

local function reserve(now, rid, n, a, k)
  local outcomes, members, passed = {}, {}, {}
  local blocked = false

  -- A retry of a reservation that already ran (its reply was lost): the script is atomic, so
  -- either every passing item of it was recorded or none. Found recorded: answer "granted" for
  -- what it recorded and record nothing again. (A first send skips the look: two commands a
  -- call, of the dozen or so the rest takes.)
  local replay = false
  for i = 1, check_replay and n or 0 do
    local b = a + (i - 1) * 6
    local amount = 0
    if ARGV[b + 1] == 'c' then amount = tonumber(ARGV[b + 6]) end
    local member = rid .. '.' .. i .. ':' .. fmt(amount)
    if redis.call('ZSCORE', KEYS[k + 2 * i - 1], member) then
      replay = true
      members[i] = member
    end
  end
  if replay then
    for i = 1, n do
      -- An item not recorded the first time was a shadow item that would have blocked; its
      -- report is lost with the first reply (shadow items never block).
      members[i] = members[i] or ''
      for _, v in ipairs({1, 0, 0, 0, 0, -1}) do table.insert(outcomes, v) end
    end
    return outcomes, members
  end

  for i = 1, n do
    local b = a + (i - 1) * 6
    local kind, enforce = ARGV[b + 1], ARGV[b + 2] == '1'
    local window, horizon = tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4])
    local x, y = tonumber(ARGV[b + 5]), tonumber(ARGV[b + 6])
    local key, sumkey = KEYS[k + 2 * i - 1], KEYS[k + 2 * i]
    local ok, limit, count, elapsed, spent, retry = 1, 0, 0, 0, 0, -1

    if kind == 's' then
      local max_calls, cooldown = x, y
      -- An entry at t counts while t > now - horizon: exact at the boundary.
      redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now - horizon))
      if max_calls >= 0 then
        count = redis.call('ZCOUNT', key, '(' .. fmt(now - window), '+inf')
      end
      if cooldown > 0 then
        local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
        if last[2] then
          local since = now - tonumber(last[2])
          if since < cooldown then
            ok, limit, elapsed, retry = 0, 2, since, cooldown - since
          end
        end
      end
      if ok == 1 and max_calls >= 0 and count >= max_calls then
        ok, limit = 0, 1
        if max_calls > 0 then
          local e = redis.call('ZRANGEBYSCORE', key, '(' .. fmt(now - window), '+inf',
            'WITHSCORES', 'LIMIT', count - max_calls, 1)
          retry = tonumber(e[2]) + window - now
        end
      end
    else
      local max_micros, cost = x, y
      local stale = redis.call('ZRANGEBYSCORE', key, '-inf', fmt(now - window))
      if #stale > 0 then
        local gone = 0
        for _, m in ipairs(stale) do gone = gone + amount_of(m) end
        redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now - window))
        if gone > 0 and redis.call('EXISTS', sumkey) == 1 then
          redis.call('DECRBY', sumkey, fmt(gone))
        end
      end
      if redis.call('ZCARD', key) == 0 then
        redis.call('DEL', sumkey)
      else
        local total = redis.call('GET', sumkey)
        if total then
          spent = tonumber(total)
        else
          -- The total is gone (evicted, deleted by hand): rebuild it from the log.
          for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do spent = spent + amount_of(m) end
          redis.call('SET', sumkey, fmt(spent))
          local ttl = redis.call('PTTL', key)
          if ttl > 0 then redis.call('PEXPIRE', sumkey, ttl) end
        end
      end
      if spent + cost > max_micros then
        ok, limit = 0, 3
        if cost <= max_micros then
          -- When enough of the oldest charges have aged out for this one to fit.
          local freed, start, found = 0, 0, false
          while not found do
            local page = redis.call('ZRANGE', key, start, start + 127, 'WITHSCORES')
            if #page == 0 then break end
            for j = 1, #page, 2 do
              freed = freed + amount_of(page[j])
              if spent - freed + cost <= max_micros then
                retry = tonumber(page[j + 1]) + window - now
                found = true
                break
              end
            end
            start = start + 128
          end
        end
      end
    end

    if ok == 0 and enforce then blocked = true end
    passed[i] = ok == 1
    table.insert(outcomes, ok)
    table.insert(outcomes, limit)
    table.insert(outcomes, count)
    table.insert(outcomes, elapsed)
    table.insert(outcomes, spent)
    table.insert(outcomes, retry)
  end

  for i = 1, n do
    local member = ''
    if not blocked and passed[i] then
      local b = a + (i - 1) * 6
      local kind, horizon = ARGV[b + 1], tonumber(ARGV[b + 4])
      local amount = 0
      if kind == 'c' then amount = tonumber(ARGV[b + 6]) end
      local key, sumkey = KEYS[k + 2 * i - 1], KEYS[k + 2 * i]
      local ttl = fmt(math.floor(horizon / 1000) + 1)
      member = rid .. '.' .. i .. ':' .. fmt(amount)
      redis.call('ZADD', key, fmt(now), member)
      redis.call('PEXPIRE', key, ttl)
      if kind == 'c' then
        redis.call('INCRBY', sumkey, fmt(amount))
        redis.call('PEXPIRE', sumkey, ttl)
      end
    end
    members[i] = member
  end
  return outcomes, members
end

local result = {}
local a, k = 2, 0
for _ = 1, tonumber(ARGV[1]) do
  local now, rid, n = clock(ARGV[a + 1]), ARGV[a + 2], tonumber(ARGV[a + 3])
  local outcomes, members = reserve(now, rid, n, a + 3, k)
  table.insert(result, outcomes)
  table.insert(result, members)
  a = a + 3 + 6 * n
  k = k + 2 * n
end
return result
"""

# KEYS: two per entry: the log (ZSET) and its ledger total. ARGV: one member per entry.
RELEASE_LUA = r"""
for i = 1, #ARGV do
  local key, sumkey, member = KEYS[2 * i - 1], KEYS[2 * i], ARGV[i]
  if redis.call('ZREM', key, member) == 1 then
    local amount = tonumber(string.match(member, ':(%d+)$')) or 0
    if redis.call('ZCARD', key) == 0 then
      redis.call('DEL', sumkey)
    elseif amount > 0 and redis.call('EXISTS', sumkey) == 1 then
      redis.call('DECRBY', sumkey, string.format('%d', amount))
    end
  end
end
return 0
"""


# Approvals: every change of state is a compare-and-set in one script, so two replicas racing
# for one grant cannot both use it.
# KEYS: digest key, record key, index. ARGV: id, record, keep_ms, now_ms, record key prefix.
PUT_APPROVAL_LUA = r"""
local current = redis.call('GET', KEYS[1])
if current then
  local state = redis.call('HGET', ARGV[5] .. current, 'state')
  if state == 'pending' or state == 'approved' or state == 'denied' then return current end
end
redis.call('HSET', KEYS[2], 'state', 'pending', 'record', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[4])
redis.call('ZADD', KEYS[3], tonumber(ARGV[4]) + tonumber(ARGV[3]), ARGV[1])
return ARGV[1]
"""
# KEYS: digest key. ARGV: record key prefix. The open approval's record, or nil.
FIND_APPROVAL_LUA = r"""
local current = redis.call('GET', KEYS[1])
if not current then return false end
local found = redis.call('HMGET', ARGV[1] .. current, 'state', 'record')
if found[1] == 'pending' or found[1] == 'approved' or found[1] == 'denied' then
  return found[2]
end
return false
"""
# KEYS: record key, digest key. ARGV: expected state, new state, record, id.
UPDATE_APPROVAL_LUA = r"""
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'record', ARGV[3])
local open = ARGV[2] == 'pending' or ARGV[2] == 'approved' or ARGV[2] == 'denied'
if not open and redis.call('GET', KEYS[2]) == ARGV[4] then redis.call('DEL', KEYS[2]) end
return 1
"""
