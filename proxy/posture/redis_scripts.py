"""The Redis posture store's Lua scripts: each store operation is one script, so it is
atomic on the server (Redis runs a script to the end before any other command) and
costs one round trip. Every script takes the key prefix as ``ARGV[1]``.

Keys (``P`` = the prefix, ``mailward:`` by default):

``P p:<device>``   hash: authority -> posture JSON (the newest per authority)
``P u:<user>``     set of devices whose posture names the user
``P devs``         set of devices with posture
``P seen``         sorted set: device -> its newest posture's ``iat`` (``forget_after``)
``P m:<authority>``  set of devices with posture from an MDM connector
``P c:<device>``   hash: MDM authority -> SHA-256 of that posture's content (everything
                   but the check-in times, :func:`proxy.posture.sqlite_mdm.content`)
``P j:<issuer>:<jti>``  replay memory: ``exp`` + skew (compared with the caller's
                   clock), with a TTL so Redis drops it afterwards
``P n:<nonce>``    an issued challenge: its expiry, or ``used`` once consumed
``P alias``        hash: alias -> device
``P ra:<device>``  set: the aliases naming the device (the reverse of ``alias``, so an
                   alias or a forget need not scan every alias); built from ``alias``
                   once when ``P ra:built`` is missing
``P bind``         hash: device -> bound-at
``P rev``          hash: device -> ``{"why", "actor", "at"}`` JSON
``P unrev``        hash: device -> when it was last unrevoked (tells a stale local
                   copy of a revocation from one Redis lost)
``P seq``, ``P feed``  the change feed: a counter and a stream whose entry ids are
                   ``<seq>-1`` (fields ``d`` device, ``k`` kind, ``o`` origin)
``P policy:active``, ``P policy:<sha256>``  the policy in force (content-addressed)
``P policy:history``  list of JSON activations (sha256, version, when, how, actor)
``P policy:files``   hash: instance -> SHA-256 of its policy file as last looked at
``P notice:<key>``   sorted set of notice times (the notice rate shared by instances)

Device ids arrive lower-cased (:func:`proxy.posture.device_key`). The scripts build
key names from the prefix, so the store needs a single Redis (or a Sentinel-managed
primary), not Redis Cluster.
"""

from __future__ import annotations

from typing import Final

#: Change-feed entries kept (about a day of changes at one a second).
FEED_MAXLEN: Final = 100_000

_COMMON = """
local P = ARGV[1]
local function feed(device, kind, origin)
  local s = redis.call('INCR', P .. 'seq')
  redis.call('XADD', P .. 'feed', 'MAXLEN', '~', 'FEED_MAXLEN', s .. '-1',
             'd', device, 'k', kind, 'o', origin)
end
local function resolve(key)
  return redis.call('HGET', P .. 'alias', key) or key
end
""".replace("FEED_MAXLEN", str(FEED_MAXLEN))

#: ARGV: prefix, nonce ('' for none), now, key, authority, platform, iat, signer, jti,
#: jti expiry, jti ttl, user, posture JSON, origin.
COMMIT = _COMMON + """
local nonce, now = ARGV[2], tonumber(ARGV[3])
if nonce ~= '' then
  local v = redis.call('GET', P .. 'n:' .. nonce)
  if (not v) or v == 'used' or tonumber(v) <= now then return 'bad_nonce' end
end
local key = ARGV[4]
local device = resolve(key)
if redis.call('HEXISTS', P .. 'rev', device) == 1
   or redis.call('HEXISTS', P .. 'rev', key) == 1 then return 'revoked' end
local authority, pk = ARGV[5], P .. 'p:' .. device
if authority == 'device' then
  local all = redis.call('HGETALL', pk)
  local best_mdm, best_iat, best_platform = -1, 0, nil
  for i = 1, #all, 2 do
    local p = cjson.decode(all[i + 1])
    local m = (all[i] ~= 'device') and 1 or 0
    if m > best_mdm or (m == best_mdm and p.iat > best_iat) then
      best_mdm, best_iat, best_platform = m, p.iat, p.platform
    end
  end
  if best_platform and best_platform ~= ARGV[6] then return 'platform_mismatch' end
end
local jk = P .. 'j:' .. ARGV[8] .. ':' .. ARGV[9]
local seen = redis.call('GET', jk)
if seen and tonumber(seen) > now then return 'replay' end
redis.call('SET', jk, ARGV[10], 'EX', ARGV[11])
if nonce ~= '' then redis.call('SET', P .. 'n:' .. nonce, 'used', 'KEEPTTL') end
local cur = redis.call('HGET', pk, authority)
if (not cur) or cjson.decode(cur).iat <= tonumber(ARGV[7]) then
  redis.call('HSET', pk, authority, ARGV[13])
  redis.call('SADD', P .. 'u:' .. ARGV[12], device)
  redis.call('SADD', P .. 'devs', device)
  redis.call('ZADD', P .. 'seen', 'GT', ARGV[7], device)
  feed(device, 'posture', ARGV[14])
end
return 'ok'
"""

#: ARGV: prefix, key. Returns {device, {authority, json, ...}}.
POSTURES = _COMMON + """
local device = resolve(ARGV[2])
return {device, redis.call('HGETALL', P .. 'p:' .. device)}
"""

#: ARGV: prefix, user. Returns {device, {authority, json, ...}, ...}.
USER_DEVICES = _COMMON + """
local out = {}
for _, d in ipairs(redis.call('SMEMBERS', P .. 'u:' .. ARGV[2])) do
  out[#out + 1] = d
  out[#out + 1] = redis.call('HGETALL', P .. 'p:' .. d)
end
return out
"""

#: ARGV: prefix. Returns {aliases, bound devices, revocations, seq}.
TRUST = """
local P = ARGV[1]
return {redis.call('HGETALL', P .. 'alias'), redis.call('HKEYS', P .. 'bind'),
        redis.call('HGETALL', P .. 'rev'), redis.call('GET', P .. 'seq') or '0'}
"""

#: ARGV: prefix, seq. Returns {newest seq, entries} (entries only when newer).
CHANGES = """
local P = ARGV[1]
local cur = tonumber(redis.call('GET', P .. 'seq') or '0')
if cur <= tonumber(ARGV[2]) then return {cur, {}} end
return {cur, redis.call('XRANGE', P .. 'feed', '(' .. ARGV[2] .. '-1', '+', 'COUNT', 10000)}
"""

#: ARGV: prefix, key, record JSON, origin. Returns {device, newly revoked}.
REVOKE = _COMMON + """
local device = resolve(ARGV[2])
local n = redis.call('HSETNX', P .. 'rev', device, ARGV[3])
if n == 1 then feed(device, 'revoked', ARGV[4]) end
return {device, n}
"""

#: Replays a revocation kept locally: ARGV prefix, device, record JSON, at, origin
#: (the device resolved through aliases made since).
#: Skipped when Redis holds a later unrevocation of the device.
REPLAY_REVOKE = _COMMON + """
local device = resolve(ARGV[2])
local un = tonumber(redis.call('HGET', P .. 'unrev', device) or '-1')
if un >= tonumber(ARGV[4]) then return -1 end
local n = redis.call('HSETNX', P .. 'rev', device, ARGV[3])
if n == 1 then feed(device, 'revoked', ARGV[5]) end
return n
"""

#: ARGV: prefix, key, now, origin.
UNREVOKE = _COMMON + """
local device = resolve(ARGV[2])
local n = redis.call('HDEL', P .. 'rev', device)
if ARGV[2] ~= device then n = n + redis.call('HDEL', P .. 'rev', ARGV[2]) end
redis.call('HSET', P .. 'unrev', device, ARGV[3])
if n > 0 then feed(device, 'unrevoked', ARGV[4]) end
return {device, n}
"""

#: ARGV: prefix, key, origin.
UNBIND = _COMMON + """
local device = resolve(ARGV[2])
local n = redis.call('HDEL', P .. 'bind', device)
if n > 0 then feed(device, 'unbound', ARGV[3]) end
return {device, n}
"""

#: ARGV: prefix, device (resolved), now, origin.
BIND = _COMMON + """
local n = redis.call('HSETNX', P .. 'bind', ARGV[2], ARGV[3])
if n == 1 then feed(ARGV[2], 'bound', ARGV[4]) end
return n
"""

_DROP_POSTURE = """
local function drop_posture(device)
  local all = redis.call('HGETALL', P .. 'p:' .. device)
  for i = 1, #all, 2 do
    redis.call('SREM', P .. 'u:' .. string.lower(cjson.decode(all[i + 1]).user), device)
    redis.call('SREM', P .. 'm:' .. all[i], device)
  end
  redis.call('DEL', P .. 'p:' .. device, P .. 'c:' .. device)
  redis.call('SREM', P .. 'devs', device)
  redis.call('ZREM', P .. 'seen', device)
  return #all / 2
end
"""

#: ARGV: prefix, key, origin. Posture, binding and aliases go; a revocation stays.
_REVERSE = """
local function reverse_index()
  if redis.call('SETNX', P .. 'ra:built', '1') == 0 then return end
  local aliases = redis.call('HGETALL', P .. 'alias')
  for i = 1, #aliases, 2 do redis.call('SADD', P .. 'ra:' .. aliases[i + 1], aliases[i]) end
end
local function set_alias(a, device)
  local was = redis.call('HGET', P .. 'alias', a)
  if was then redis.call('SREM', P .. 'ra:' .. was, a) end
  redis.call('HSET', P .. 'alias', a, device)
  redis.call('SADD', P .. 'ra:' .. device, a)
end
local function drop_alias(a)
  local was = redis.call('HGET', P .. 'alias', a)
  if not was then return 0 end
  redis.call('SREM', P .. 'ra:' .. was, a)
  return redis.call('HDEL', P .. 'alias', a)
end
"""

FORGET = _COMMON + _DROP_POSTURE + _REVERSE + """
local device = resolve(ARGV[2])
reverse_index()
local n = drop_posture(device) + redis.call('HDEL', P .. 'bind', device)
for _, a in ipairs(redis.call('SMEMBERS', P .. 'ra:' .. device)) do n = n + drop_alias(a) end
n = n + drop_alias(device)
feed(device, 'forgotten', ARGV[3])
return {device, n}
"""

_ALIAS_FN = """
local function do_alias(key, other, origin)
  local device, old = resolve(key), resolve(other)
  if old == device then return device, old end
  reverse_index()
  local moved = redis.call('HGETALL', P .. 'p:' .. old)
  for i = 1, #moved, 2 do
    local p = cjson.decode(moved[i + 1])
    local mine = redis.call('HGET', P .. 'p:' .. device, moved[i])
    if (not mine) or cjson.decode(mine).iat < p.iat then
      redis.call('HSET', P .. 'p:' .. device, moved[i], moved[i + 1])
      local hash = redis.call('HGET', P .. 'c:' .. old, moved[i])
      if hash then redis.call('HSET', P .. 'c:' .. device, moved[i], hash) end
      if moved[i] ~= 'device' then redis.call('SADD', P .. 'm:' .. moved[i], device) end
      redis.call('SADD', P .. 'u:' .. string.lower(p.user), device)
      redis.call('SADD', P .. 'devs', device)
      redis.call('ZADD', P .. 'seen', 'GT', p.iat, device)
    end
  end
  drop_posture(old)
  for _, h in ipairs({'bind', 'rev'}) do
    local v = redis.call('HGET', P .. h, old)
    if v then
      redis.call('HSETNX', P .. h, device, v)
      redis.call('HDEL', P .. h, old)
    end
  end
  for _, a in ipairs(redis.call('SMEMBERS', P .. 'ra:' .. old)) do set_alias(a, device) end
  set_alias(old, device)
  set_alias(other, device)
  drop_alias(device)
  feed(device, 'alias', origin)
  feed(old, 'alias', origin)
  return device, old
end
"""

#: ARGV: prefix, key of the device, key of the other id, origin. Returns {device,
#: the device the other id named}.
ALIAS = _COMMON + _DROP_POSTURE + _REVERSE + _ALIAS_FN + """
local device, old = do_alias(ARGV[2], ARGV[3], ARGV[4])
return {device, old}
"""

#: ARGV: prefix. Everything ``device list`` shows.
DUMP = """
local P = ARGV[1]
local postures = {}
for _, d in ipairs(redis.call('SMEMBERS', P .. 'devs')) do
  postures[#postures + 1] = d
  postures[#postures + 1] = redis.call('HGETALL', P .. 'p:' .. d)
end
return {postures, redis.call('HKEYS', P .. 'bind'), redis.call('HGETALL', P .. 'alias'),
        redis.call('HGETALL', P .. 'rev')}
"""

#: ARGV: prefix, sha256, policy text, history entry JSON, instance, file sha256 ('' =
#: unchanged). Stores the text, points at it, appends the entry; returns the history length.
POLICY_MOVE = """
local P = ARGV[1]
redis.call('SET', P .. 'policy:' .. ARGV[2], ARGV[3])
redis.call('SET', P .. 'policy:active', ARGV[2])
if ARGV[6] ~= '' then redis.call('HSET', P .. 'policy:files', ARGV[5], ARGV[6]) end
return redis.call('RPUSH', P .. 'policy:history', ARGV[4])
"""

#: ARGV: prefix, instance. Returns {active sha256 or '', the instance's file sha256 or
#: '', history entries}.
POLICY_POINTER = """
local P = ARGV[1]
return {redis.call('GET', P .. 'policy:active') or '',
        redis.call('HGET', P .. 'policy:files', ARGV[2]) or '',
        redis.call('LRANGE', P .. 'policy:history', 0, -1)}
"""

#: ARGV: prefix. A cheap change detector: "<active sha256> <history length>".
POLICY_STAMP = """
local P = ARGV[1]
return (redis.call('GET', P .. 'policy:active') or '') .. ' '
       .. redis.call('LLEN', P .. 'policy:history')
"""

#: ARGV: prefix, instance, file sha256.
POLICY_NOTE_FILE = """
return redis.call('HSET', ARGV[1] .. 'policy:files', ARGV[2], ARGV[3])
"""

#: ARGV: prefix, sha256. The stored text, or false.
POLICY_TEXT = """
return redis.call('GET', ARGV[1] .. 'policy:' .. ARGV[2])
"""

#: ARGV: prefix, key, now, window seconds, count. Claims one notice under the key when
#: fewer than ``count`` were sent in the window before ``now`` (times are the callers'
#: clocks); returns 1 when claimed, 0 when the rate is used up.
NOTICE_CLAIM = """
local k, now, window = ARGV[1] .. 'notice:' .. ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', k, '-inf', '(' .. (now - window))
if redis.call('ZCOUNT', k, now - window, '+inf') >= tonumber(ARGV[5]) then return 0 end
redis.call('ZADD', k, now, ARGV[3] .. '#' .. redis.call('ZCARD', k))
redis.call('EXPIRE', k, math.ceil(window) + 3600)
return 1
"""

#: ARGV: prefix, cursor, count. One page of every device's postures as one JSON text
#: (one string to parse, not four per device): {next cursor ('0' at the end),
#: '[[device, [posture, ...]], ...]'} (the postures are stored JSON, spliced in).
POSTURE_PAGE = """
local P = ARGV[1]
local page = redis.call('SSCAN', P .. 'devs', ARGV[2], 'COUNT', ARGV[3])
local out = {}
for _, d in ipairs(page[2]) do
  out[#out + 1] = '[' .. cjson.encode(d) .. ',['
                  .. table.concat(redis.call('HVALS', P .. 'p:' .. d), ',') .. ']]'
end
return {page[1], '[' .. table.concat(out, ',') .. ']'}
"""

#: ARGV: prefix, time. Devices whose newest posture was made before it (posture
#: stored before this key existed is not listed until the device reports again).
NOT_SEEN = """
return redis.call('ZRANGEBYSCORE', ARGV[1] .. 'seen', '-inf', '(' .. ARGV[2])
"""

#: A page of MDM connector postures, as :func:`proxy.posture.sqlite_mdm.commit`.
#: ARGV: prefix, origin, then per device: key, authority, user, posture JSON, content
#: hash, iat, other ids (JSON list). Returns per device {device, outcome, previous
#: posture JSON when changed or '', 1 when an alias was recorded}.
MDM_COMMIT = _COMMON + _DROP_POSTURE + _REVERSE + _ALIAS_FN + """
local origin, out = ARGV[2], {}
for w = 3, #ARGV, 7 do
  local key, authority, text, hash = ARGV[w], ARGV[w + 1], ARGV[w + 3], ARGV[w + 4]
  local iat, device, aliased = tonumber(ARGV[w + 5]), resolve(ARGV[w]), 0
  for _, other in ipairs(cjson.decode(ARGV[w + 6])) do
    if resolve(other) ~= device then device, aliased = do_alias(key, other, origin), 1 end
  end
  local pk = P .. 'p:' .. device
  local cur = redis.call('HGET', pk, authority)
  local outcome, prev = 'new', nil
  if cur then
    prev = cjson.decode(cur).iat
    outcome = (redis.call('HGET', P .. 'c:' .. device, authority) == hash) and 'fresh'
              or 'changed'
  end
  if redis.call('HEXISTS', P .. 'rev', device) == 1
     or redis.call('HEXISTS', P .. 'rev', key) == 1 then
    outcome = 'revoked'
  elseif prev and (prev > iat or (outcome == 'fresh' and prev == iat)) then
    outcome = 'same'  -- older: never roll back; the same check-in again: nothing to do
  else
    redis.call('HSET', pk, authority, text)
    redis.call('HSET', P .. 'c:' .. device, authority, hash)
    redis.call('SADD', P .. 'u:' .. ARGV[w + 2], device)
    redis.call('SADD', P .. 'devs', device)
    redis.call('SADD', P .. 'm:' .. authority, device)
    redis.call('ZADD', P .. 'seen', 'GT', iat, device)
    if outcome ~= 'fresh' then feed(device, 'posture', origin) end
  end
  out[#out + 1] = {device, outcome, (outcome == 'changed') and cur or '', aliased}
end
return out
"""

#: ARGV: prefix, authority, origin, keys... The devices lose the authority's posture
#: and their own reports. Returns the devices that had any.
MDM_REMOVE = _COMMON + """
local authority, origin, removed = ARGV[2], ARGV[3], {}
for k = 4, #ARGV do
  local device = resolve(ARGV[k])
  local pk, users, n = P .. 'p:' .. device, {}, 0
  for _, a in ipairs({authority, 'device'}) do
    local v = redis.call('HGET', pk, a)
    if v then
      users[string.lower(cjson.decode(v).user)] = true
      n = n + redis.call('HDEL', pk, a)
    end
  end
  if n > 0 then
    redis.call('SREM', P .. 'm:' .. authority, device)
    redis.call('HDEL', P .. 'c:' .. device, authority)
    local left, newest = redis.call('HGETALL', pk), nil
    for i = 1, #left, 2 do
      local p = cjson.decode(left[i + 1])
      users[string.lower(p.user)] = nil
      if (not newest) or p.iat > newest then newest = p.iat end
    end
    for u, _ in pairs(users) do redis.call('SREM', P .. 'u:' .. u, device) end
    if newest then
      redis.call('ZADD', P .. 'seen', newest, device)
    else
      redis.call('SREM', P .. 'devs', device)
      redis.call('ZREM', P .. 'seen', device)
    end
    feed(device, 'posture', origin)
    removed[#removed + 1] = device
  end
end
return removed
"""

#: ARGV: prefix, authority. The devices with posture from that MDM connector.
MDM_DEVICES = """
return redis.call('SMEMBERS', ARGV[1] .. 'm:' .. ARGV[2])
"""

SCRIPTS: Final = {
    "commit": COMMIT, "postures": POSTURES, "user_devices": USER_DEVICES,
    "trust": TRUST, "changes": CHANGES, "revoke": REVOKE, "replay_revoke": REPLAY_REVOKE,
    "unrevoke": UNREVOKE, "unbind": UNBIND, "bind": BIND, "forget": FORGET,
    "alias": ALIAS, "dump": DUMP, "not_seen": NOT_SEEN, "mdm_commit": MDM_COMMIT,
    "mdm_remove": MDM_REMOVE, "mdm_devices": MDM_DEVICES,
    "policy_move": POLICY_MOVE, "policy_pointer": POLICY_POINTER, "policy_stamp": POLICY_STAMP,
    "policy_note_file": POLICY_NOTE_FILE, "policy_text": POLICY_TEXT,
    "notice_claim": NOTICE_CLAIM, "posture_page": POSTURE_PAGE,
}
