"""edgebundle's Lua: one Redis Functions library with every multi-key change of a thread.

Functions, not scripts. All of the project's Lua is one library that is loaded with
``FUNCTION LOAD`` and called with ``FCALL`` (Redis 7.0 or newer); nothing sends EVAL.
So a device's Redis user needs ``+fcall``/``+fcall_ro`` and never EVAL, EVALSHA, SCRIPT
or FUNCTION: it can run only the code an admin loaded, these fenced and validated
functions, and no busy loop or allocation loop of its own. (Redis still checks every
command a function runs against the caller's user, keys included, so a function can
do no more than its caller may; :mod:`edgebundle.fleet.acl` grants what they call.)

Versioning. The library is ``edgebundle_<v>`` and each function ``eb_<v>_<name>``,
where ``<v>`` (:data:`VERSION`) is the first 12 hex digits of the sha256 of the
library's source: any change to the Lua is a new version, with nothing to bump by
hand. Function names are global in Redis, so libraries of two edgebundle versions can
be loaded side by side while a fleet upgrades, and a device only ever calls its own
code: ``FCALL eb_<v>_push`` runs exactly the code this module holds, or answers
"Function not found". ``eb_<v>_version`` (read-only) answers ``<v>``.

Loading. :class:`Functions` calls FCALL; on "Function not found" it loads the
library (``FUNCTION LOAD REPLACE``; on a cluster on every primary, and replicas copy
it) and calls again, so a private Redis, or a central Redis without ACL users, works
with no setup. A device user may not load: it gets a RedisAccessError saying that an admin
loads the library, which ``edgebundle fleet provision`` and ``edgebundle fleet
load-functions`` do. Redis keeps functions in its RDB/AOF; a Redis that restarted
without persistence has lost them (and every thread): callers that may, load again.

Inside the library, the helpers are library-wide locals, and the call being served
sits in library-wide locals too (``KEYS``, ``ARGV``, ``META``…): every callback starts
with ``begin(keys, args)`` (sync functions: the layout below, checked) or ``use(…)``
(the fleet controller's). Redis runs one function at a time and never nests them.

Every sync function is one atomic step on the node that owns the thread's hash slot.
They all see the same ``KEYS`` layout (:func:`script_keys`) and the same first three
``ARGV``; each function's own comment block lists the rest::

    KEYS[1..9]   eb:{T}:meta, :msgs, :changes, :mids, :lock, :fence, :queue, :runs, :inputs
    KEYS[10..13] eb:{T}:run:<R>, :run:<R>:events, :run:<R>:go, :run:<R>:text (one run's)
    ARGV[1]     the caller's clock in seconds (only ever stored as created_at)
    ARGV[2]     the sliding session TTL in ms
    ARGV[3]     the lock lease in ms (also the time a queued run gets to take its turn)

Keys of *other* runs (the active run an edit interrupts, the next queued run a
finished run wakes, every run whose TTL a touch refreshes) are found through the
runs zset, the queue or meta's ``active_run`` and touched undeclared. That is safe
on Redis Cluster: they carry the same ``{T}`` hash tag, so they live in the slot of
the declared keys (Redis refuses only keys of another slot).

Ending a run is ONE helper (``end_run``) whether it finishes, fails, is cancelled, is
interrupted by an edit or a new run, or lost its lease and is taken over.

Conventions inside Redis: JSON only (cjson); versions come from ``HINCRBY`` on meta,
never from a clock; replies are arrays whose first element says what happened
(``ok``, ``gone``, ``epoch``, ``busy``, ``lost``, ``norun``, ``wait``, ``ended``,
``duplicate``, ``gap``, ``badmutation``).

The lock holds either a holder's random token or ``reserved:<run id>``: when the
thread frees up, the next queued run is woken (a token RPUSHed on its ``go`` list,
which its ``acquire`` BLPOPs) and the thread is reserved for it for one lease. A run
whose reservation ran out (its device went away before taking its turn) is failed by
the next run that wants the thread, exactly like a holder whose lease ran out.

Why it is over 400 lines: it is the text of one Redis Functions library (Lua), loaded
as a whole with one FUNCTION LOAD; its functions share local helpers (``end_run``,
the lock, the TTLs) that Lua cannot import from another library.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os.path
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoPermissionError, ResponseError

from edgebundle import keys
from edgebundle.errors import RedisAccessError
from edgebundle.sync.client import Client


def script_keys(thread_id: str, run_id: str | None = None) -> list[str]:
    """The ``KEYS`` of a script call: the thread's fixed keys, then the run's if any."""
    fixed = keys.fixed_keys(thread_id)
    return fixed if run_id is None else fixed + keys.run_keys(thread_id, run_id)


def _key_layout() -> dict[str, str]:
    """How Lua builds keys of runs it finds by id, taken from :mod:`edgebundle.keys` (one place)."""
    thread, run = "T", "RUN0ID"
    tag = os.path.commonprefix([keys.meta(thread), keys.lock(thread), keys.run(thread, run)])
    layout = {"META_SUFFIX_LEN": str(len(keys.meta(thread)) - len(tag))}
    for name, key in (("RUN", keys.run(thread, run)), ("EVENTS", keys.run_events(thread, run)),
                      ("GO", keys.run_wakeup(thread, run)), ("TEXT", keys.run_text(thread, run))):
        before, _, after = key[len(tag):].partition(run)
        layout[f"{name}_PRE"] = json.dumps(before)  # a JSON string is a valid Lua literal here
        layout[f"{name}_POST"] = json.dumps(after)
    return layout


_PRELUDE_TEMPLATE = r"""
-- The call being served: set by begin() (sync functions) or use() (the others) first
-- thing in every callback. Redis runs one function at a time and a function cannot call
-- another, so these library-wide locals always hold the current call's values.
local KEYS, ARGV
local META, MSGS, CHANGES, MIDS, LOCK, FENCE, QUEUE, RUNS, INPUTS
local RUN, RUN_TEXT, RUN_GO, TAG
local NOW, TTL, LEASE, SLACK, RUN_TTL
local FIXED = 9  -- KEYS[FIXED + 1 ..] are the declared run's: hash, events, go, text
local RESERVED = 'reserved:'

local function use(keys, args)
  KEYS, ARGV = keys, args
end

local function refuse(message)
  error({err = 'ERR edgebundle: ' .. message})
end

-- The common KEYS/ARGV layout of every sync function (module docstring), checked: one
-- thread's keys (every key carries the tag of KEYS[1]) and a sane clock, TTL and lease.
local function begin(keys, args)
  use(keys, args)
  if #keys ~= FIXED and #keys ~= FIXED + 4 then
    refuse('a sync function takes 9 thread keys, or 13 with a run\'s')
  end
  META, MSGS, CHANGES, MIDS = keys[1], keys[2], keys[3], keys[4]
  LOCK, FENCE, QUEUE, RUNS, INPUTS = keys[5], keys[6], keys[7], keys[8], keys[9]
  RUN, RUN_GO, RUN_TEXT = keys[10], keys[12], keys[13]
  TAG = string.sub(META, 1, #META - @META_SUFFIX_LEN@)
  for i = 2, #keys do
    if string.sub(keys[i], 1, #TAG) ~= TAG then refuse('every key must be of one thread') end
  end
  NOW = tonumber(args[1])
  TTL = tonumber(args[2])
  LEASE = tonumber(args[3])
  if not NOW or not TTL or not LEASE or TTL < 1 or LEASE < 1 then
    refuse('ARGV[1..3] must be the clock, a TTL and a lease (ms >= 1)')
  end
  TTL, LEASE = math.floor(TTL), math.floor(LEASE)
  -- run keys are refreshed once per SLACK (not on every access: a long thread has many
  -- runs) and live SLACK longer, so they never expire before the thread itself
  SLACK = math.min(math.floor(TTL / 10), 60000)
  RUN_TTL = TTL + SLACK
end

local function run_key(id) return TAG .. @RUN_PRE@ .. id .. @RUN_POST@ end
local function events_key(id) return TAG .. @EVENTS_PRE@ .. id .. @EVENTS_POST@ end
local function go_key(id) return TAG .. @GO_PRE@ .. id .. @GO_POST@ end
local function text_key(id) return TAG .. @TEXT_PRE@ .. id .. @TEXT_POST@ end

local function clock_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function keep_run(id)
  redis.call('PEXPIRE', run_key(id), RUN_TTL)
  redis.call('PEXPIRE', events_key(id), RUN_TTL)
  redis.call('PEXPIRE', go_key(id), RUN_TTL)
  redis.call('PEXPIRE', text_key(id), RUN_TTL)
end

-- Sliding TTL: every fixed key (not the lock: it has its lease) and the declared run
-- keys now; every run of the thread (via RUNS) when SLACK has passed since last time.
local function touch()
  for i = 1, FIXED do
    if i ~= 5 then redis.call('PEXPIRE', KEYS[i], TTL) end
  end
  for i = FIXED + 1, #KEYS do redis.call('PEXPIRE', KEYS[i], RUN_TTL) end
  local now = clock_ms()
  local last = tonumber(redis.call('HGET', META, 'touched_at') or '0')
  if now - last >= SLACK then
    redis.call('HSET', META, 'touched_at', now)
    for _, id in ipairs(redis.call('ZRANGE', RUNS, 0, -1)) do keep_run(id) end
  end
end

local function load_run(id)
  local raw = redis.call('HGET', run_key(id), 'run')
  if not raw then return nil end
  return cjson.decode(raw)
end

local function emit(run_id, kind, data)
  return redis.call('XADD', events_key(run_id), '*', 'type', kind, 'data', data)
end

-- A position for a message: the one it asks for, or the next free one.
local function claim_position(pos)
  local free = tonumber(redis.call('HGET', META, 'next_position') or '1')
  if pos == nil or pos == cjson.null then
    redis.call('HSET', META, 'next_position', free + 1)
    return free
  end
  if pos >= free then redis.call('HSET', META, 'next_position', math.floor(pos) + 1) end
  return pos
end

-- Every change of a message: bump the thread's version, stamp the message with it,
-- store it and index it for diffs. Returns the stored JSON.
local function bump_and_write(msg)
  local version = redis.call('HINCRBY', META, 'version', 1)
  msg.version = version
  local raw = cjson.encode(msg)
  redis.call('HSET', MSGS, msg.id, raw)
  redis.call('ZADD', CHANGES, version, msg.id)
  return raw
end

-- The thread is free (lock deleted): reserve it for the next queued run for one lease
-- and wake that run's acquire (BLPOP on its go list).
local function wake_next()
  local head = redis.call('LINDEX', QUEUE, 0)
  if head then
    redis.call('SET', LOCK, RESERVED .. head, 'PX', LEASE)
    redis.call('RPUSH', go_key(head), '1')
    redis.call('PEXPIRE', go_key(head), RUN_TTL)
  end
end

-- Ends a run, whoever ends it: finish, fail, cancel, interrupt, takeover of a dead
-- holder, or a queued run that never took its turn. status is completed, failed,
-- cancelled or incomplete; text the assistant message's final content (nil: the text
-- generated so far). A generating run's message lands in the thread with a new
-- version; the run's terminal events and 'done' are added; if it held (or had the
-- thread reserved) the lock is deleted and the next queued run woken.
local function end_run(run, status, reason, text, info)
  if run.status ~= 'queued' and run.status ~= 'in_progress' then return cjson.encode(run) end
  local was_queued = run.status == 'queued'
  if was_queued then
    redis.call('LREM', QUEUE, 0, run.id)
  else
    if text == nil then text = redis.call('GET', text_key(run.id)) or '' end
    redis.call('SET', text_key(run.id), text, 'KEEPTTL')
    local raw = redis.call('HGET', MSGS, run.message_id)
    if raw then
      local msg = cjson.decode(raw)
      msg.content = text
      if status == 'completed' then msg.status = 'completed' else msg.status = 'incomplete' end
      emit(run.id, 'message.completed', '{"message":' .. bump_and_write(msg) .. '}')
    end
  end
  run.status = status
  run.reason = reason
  if info.usage ~= nil then run.usage = info.usage end
  local run_raw = cjson.encode(run)
  redis.call('HSET', run_key(run.id), 'run', run_raw)
  local data = '{"run":' .. run_raw .. ',"reason":' .. cjson.encode(reason or cjson.null)
  if status == 'completed' then
    local usage = cjson.encode(run.usage or cjson.null)
    emit(run.id, 'run.completed', data .. ',"usage":' .. usage .. '}')
  elseif status == 'failed' then
    emit(run.id, 'run.failed', data .. ',"error":' .. cjson.encode(info.error or '') .. '}')
  else
    emit(run.id, 'run.cancelled', data .. ',"cause":' .. cjson.encode(info.cause or '') .. '}')
  end
  emit(run.id, 'done', '{}')
  if was_queued then redis.call('RPUSH', go_key(run.id), '1') end  -- its waiter looks again
  keep_run(run.id)
  if redis.call('HGET', META, 'active_run') == run.id then
    redis.call('HSET', META, 'active_run', '')
    redis.call('DEL', LOCK)
    wake_next()
  elseif redis.call('GET', LOCK) == RESERVED .. run.id then
    redis.call('DEL', LOCK)
    wake_next()
  end
  return run_raw
end

-- A run is marked active but nobody holds the lock: its holder's lease ran out
-- (stalled, partitioned, dead). It ends incomplete with the text it had written.
local function reap()
  if redis.call('EXISTS', LOCK) == 1 then return end
  local active = redis.call('HGET', META, 'active_run')
  if not active or active == '' then return end
  local dead = load_run(active)
  if dead and dead.status == 'in_progress' then
    end_run(dead, 'incomplete', 'interrupted', nil, {cause = 'lease_expired'})
  else
    redis.call('HSET', META, 'active_run', '')
    wake_next()
  end
end

-- Only the holder of this lock acquisition may write: same token, same fence.
local function fenced(run_id, token, fence)
  return redis.call('GET', LOCK) == token
    and redis.call('GET', FENCE) == fence
    and redis.call('HGET', run_key(run_id), 'fence') == fence
end

-- The holder wrote: a run taken by its start is no longer only claimed (start_run).
local function confirm(run_id)
  redis.call('HDEL', run_key(run_id), 'claim')
end

local function append_delta(run_id, message_id, text)
  local seq = redis.call('HINCRBY', run_key(run_id), 'seq', 1)
  redis.call('APPEND', text_key(run_id), text)
  emit(run_id, 'message.delta', cjson.encode({message_id = message_id, seq = seq, text = text}))
  return seq
end

-- ARGV[first ..] are text batches the holder numbered from base + 1. A call the client
-- sends again (its reply was lost to a restart) finds some already written: those are
-- skipped, so no text is ever stored twice. Returns the run's last seq.
local function append_deltas(run_id, message_id, base, first)
  local seq = tonumber(redis.call('HGET', run_key(run_id), 'seq') or '0')
  for i = first + math.max(seq - base, 0), #ARGV do
    seq = append_delta(run_id, message_id, ARGV[i])
  end
  return seq
end

local function create_meta(epoch)
  redis.call('HSET', META, 'epoch', epoch, 'version', 0, 'floor', 0, 'created_at', ARGV[1],
             'active_run', '', 'next_position', 1)
end

local function hmget_all(key, ids)
  local out = {}
  for i = 1, #ids, 500 do
    local chunk = redis.call('HMGET', key, unpack(ids, i, math.min(i + 499, #ids)))
    for _, v in ipairs(chunk) do if v then out[#out + 1] = v end end
  end
  return out
end

-- The sync object: what changed since (epoch, since), or everything (tombstones too)
-- when the epoch differs or since cannot be diffed. {'ok', epoch, version, full,
-- active run JSON or '', {queued run JSON...}, {message JSON...}}
local function snapshot(client_epoch, since)
  local m = redis.call('HMGET', META, 'epoch', 'version', 'floor', 'active_run')
  local epoch, version, floor = m[1], tonumber(m[2]), tonumber(m[3] or '0')
  local full = client_epoch ~= epoch or since < floor or since > version
  local ids
  if full then
    ids = redis.call('ZRANGE', CHANGES, 0, -1)
  else
    ids = redis.call('ZRANGEBYSCORE', CHANGES, '(' .. since, '+inf')
  end
  local active = ''
  if m[4] and m[4] ~= '' then active = redis.call('HGET', run_key(m[4]), 'run') or '' end
  local queued = {}
  for _, id in ipairs(redis.call('LRANGE', QUEUE, 0, -1)) do
    local raw = redis.call('HGET', run_key(id), 'run')
    if raw then queued[#queued + 1] = raw end
  end
  return {'ok', epoch, version, full and 1 or 0, active, queued, hmget_all(MSGS, ids)}
end

-- The declared run (KEYS[10..13]), queued and allowed its turn, takes the thread with
-- token: SET lock token PX lease, fence = INCR, run in_progress, active run set, the
-- assistant message created (in_progress, new version) at the position start_run
-- reserved for it, run.started and message.created added. Returns the run's and the
-- message's JSON and the fence.
local function take(run, token)
  local id = run.id
  redis.call('LREM', QUEUE, 0, id)
  redis.call('SET', LOCK, token, 'PX', LEASE)
  local fence = redis.call('INCR', FENCE)
  run.status = 'in_progress'
  run.fence = fence
  local run_raw = cjson.encode(run)
  redis.call('HSET', RUN, 'run', run_raw, 'fence', fence, 'seq', 0)
  redis.call('SET', RUN_TEXT, '')
  redis.call('HSET', META, 'active_run', id)
  local reply_position = tonumber(redis.call('HGET', RUN, 'reply_position') or '')
  if reply_position == nil then reply_position = claim_position(nil) end
  local msg = {id = run.message_id, role = 'assistant', content = '', status = 'in_progress',
               position = reply_position, created_at = NOW, deleted = false, run_id = id}
  local msg_raw = bump_and_write(msg)
  emit(id, 'run.started', '{"run":' .. run_raw .. '}')
  emit(id, 'message.created', '{"message":' .. msg_raw .. '}')
  redis.call('DEL', RUN_GO)
  return run_raw, msg_raw, fence
end

-- What the holder of a run that took the thread gets: the run's and the assistant
-- message's JSON, the fence, and the whole thread as a sync object (epoch, version,
-- full, active, queued, messages), from which it renders the prompt without a second
-- read.
local function taken(run_raw, msg_raw, fence)
  local reply = {run_raw, msg_raw, fence}
  local whole = snapshot('', 0)
  for i = 2, #whole do reply[#reply + 1] = whole[i] end
  return reply
end
"""


def _prelude() -> str:
    text = _PRELUDE_TEMPLATE
    for name, value in _key_layout().items():
        text = text.replace(f"@{name}@", value)
    return text


PRELUDE = _prelude()

CREATE = r"""
-- create: make the thread unless it exists; answer its full state.
-- KEYS[1..9] fixed thread keys
-- ARGV[1..3] now, ttl ms, lease ms; ARGV[4] epoch for a new thread
if redis.call('EXISTS', META) == 0 then create_meta(ARGV[4]) end
reap()
touch()
return snapshot('', 0)
"""

SYNC = r"""
-- sync: the diff since (epoch, since), or the full state.
-- KEYS[1..9] fixed thread keys
-- ARGV[1..3] now, ttl ms, lease ms; ARGV[4] client epoch ('' = none); ARGV[5] since
if redis.call('EXISTS', META) == 0 then return {'gone'} end
reap()
touch()
return snapshot(ARGV[4], tonumber(ARGV[5]))
"""

PUSH = r"""
-- push: apply a device's mutations exactly once (the last applied mid per device is
-- stored in this same step), client wins; an edit or delete of an existing message
-- while a run generates interrupts that run first (its text so far kept). Answers
-- the diff since the client's version.
-- Mutation ids (Replicache's rule): a device numbers its mutations of a thread 1, 2,
-- 3 ... A mid at or below the last one applied for the device is a repeat (skipped),
-- last + 1 is applied, a higher one is a gap: then nothing is written and the answer
-- is {'gap', the expected mid, the mid sent}, so a push that names another device
-- cannot jump that device's counter ahead and silence its later mutations. A mutation
-- whose mid is not a whole number from 1 to 2^53 - 1, whose op is neither put nor
-- delete or whose message has no id answers {'badmutation', its JSON}: nothing written.
-- A stored last mid no valid push could have written (an older version stored 1e400
-- as inf) counts as unknown: the device's next push goes on from its own first mid.
-- KEYS[1..9] fixed thread keys
-- ARGV[1..3] now, ttl ms, lease ms; ARGV[4] device id; ARGV[5] client epoch;
-- ARGV[6] since; ARGV[7] '1' = reseed; ARGV[8] the new epoch if reseeding;
-- ARGV[9..] one mutation JSON each: {"mid": n, "op": "put"|"delete", "message": {...}}
local device = ARGV[4]
local MAX_MID = 9007199254740991
local function whole(n)
  return type(n) == 'number' and n >= 0 and n <= MAX_MID and n == math.floor(n)
end
local mutations = {}
for i = 9, #ARGV do
  local m = cjson.decode(ARGV[i])
  if type(m) ~= 'table' or not whole(m.mid) or m.mid < 1 or (m.op ~= 'put' and m.op ~= 'delete')
      or type(m.message) ~= 'table' or type(m.message.id) ~= 'string' then
    return {'badmutation', ARGV[i]}
  end
  mutations[#mutations + 1] = m
end

local exists = redis.call('EXISTS', META) == 1
if not exists and ARGV[7] ~= '1' then return {'epoch', ''} end
if exists then
  local epoch = redis.call('HGET', META, 'epoch')
  if epoch ~= ARGV[5] then return {'epoch', epoch} end
end
local last = tonumber(redis.call('HGET', MIDS, device) or '0')
if not whole(last) then last = nil end
local expect = last
for _, m in ipairs(mutations) do
  if expect == nil then expect = m.mid - 1 end
  if m.mid > expect + 1 then return {'gap', expect + 1, m.mid} end
  expect = math.max(expect, m.mid)
end
if exists then reap() else create_meta(ARGV[8]) end
last = last or 0

local FIELDS = {'role', 'content', 'status', 'position', 'created_at', 'run_id'}
local function differs(current, incoming)
  if current.deleted then return true end
  for _, f in ipairs(FIELDS) do
    if incoming[f] ~= nil and incoming[f] ~= current[f] then return true end
  end
  return false
end

local interrupted = false
for _, m in ipairs(mutations) do
  if m.mid > last then
    last = m.mid
    local incoming = m.message
    local raw = redis.call('HGET', MSGS, incoming.id)
    local current = nil
    if raw then current = cjson.decode(raw) end
    local edits = current ~= nil and ((m.op == 'delete' and not current.deleted)
                                      or (m.op == 'put' and differs(current, incoming)))
    if edits and not interrupted then
      interrupted = true
      local active = redis.call('HGET', META, 'active_run')
      if active ~= '' then
        local run = load_run(active)
        if run then
          end_run(run, 'incomplete', 'interrupted', nil, {cause = 'edit'})
          current = cjson.decode(redis.call('HGET', MSGS, incoming.id))
        end
      end
    end
    if m.op == 'put' and (current == nil or edits) then
      local msg = current
      if msg == nil then
        msg = {id = incoming.id, role = 'user', content = '', status = 'completed',
               created_at = NOW, run_id = cjson.null}
        msg.position = claim_position(incoming.position)
      elseif incoming.position ~= nil then
        msg.position = claim_position(incoming.position)
      end
      for _, f in ipairs(FIELDS) do
        if f ~= 'position' and incoming[f] ~= nil then msg[f] = incoming[f] end
      end
      msg.deleted = false
      bump_and_write(msg)
    elseif m.op == 'delete' and edits then
      current.deleted = true
      current.content = ''
      bump_and_write(current)
    end
  end
end
redis.call('HSET', MIDS, device, string.format('%d', last))
touch()
return snapshot(ARGV[5], tonumber(ARGV[6]))
"""

START_RUN = r"""
-- start_run: the user's input message lands in the thread (new version), the position
-- right after it is reserved for the reply, and a run is queued behind the active one
-- (enqueue), put first in line after cancelling the
-- active one (interrupt), or refused while the thread is busy (reject). Answers
-- {'ok', run JSON, sync object...} with the diff since the client's version. An input id
-- that already started a run (a retry whose answer was lost) starts nothing: the
-- answer is {'again', that run's JSON, sync object...}; an input id that names another
-- message is {'duplicate', id}.
-- KEYS[1..9] fixed thread keys; KEYS[10..13] the new run's keys
-- ARGV[1..3] now, ttl ms, lease ms; ARGV[4] client epoch ('' = the thread as it is now:
-- no epoch check, and the diff is this call's own); ARGV[5] since;
-- ARGV[6] policy enqueue|reject|interrupt; ARGV[7] run JSON (status queued);
-- ARGV[8] input message JSON (position may be null); ARGV[9] a lock token, or '': with
-- a token a run that finds the thread free and no one in line takes it at once (as
-- acquire would, the caller generates it next): then the answer ends with what acquire
-- answers after its run JSON (take, taken), one round trip instead of two. Until the
-- holder's first write the run is only claimed: a retry (same input id, a token) of a
-- start whose answer was lost takes it over, so a lost answer strands no turn
if redis.call('EXISTS', META) == 0 then return {'epoch', ''} end
reap()
local client_epoch, since = ARGV[4], tonumber(ARGV[5])
if client_epoch == '' then
  local now = redis.call('HMGET', META, 'epoch', 'version')
  client_epoch, since = now[1], tonumber(now[2])
end
local run = cjson.decode(ARGV[7])
local input = cjson.decode(ARGV[8])
local started = redis.call('HGET', INPUTS, input.id)
local started_raw = started and redis.call('HGET', run_key(started), 'run')
if started_raw then
  local holder = nil
  local again = cjson.decode(started_raw)
  if ARGV[9] ~= '' and again.status == 'in_progress'
      and redis.call('HGET', run_key(started), 'claim') == '1' then
    -- Taken by a start (take) whose caller has not written since: its answer may have
    -- been lost, so nobody generates it. This retry takes it over (a new fence: the
    -- first caller's writes, if it lives, fail and it follows the run instead).
    RUN, RUN_GO, RUN_TEXT = run_key(started), go_key(started), text_key(started)
    again.status = 'queued'
    local run_raw, msg_raw, fence = take(again, ARGV[9])
    redis.call('HSET', RUN, 'claim', '1')
    keep_run(started)  -- its keys were not declared: touch() does not reach them
    holder = taken(run_raw, msg_raw, fence)
    started_raw = run_raw
  end
  touch()
  local reply = snapshot(client_epoch, since)
  reply[1] = 'again'
  table.insert(reply, 2, started_raw)
  if holder then
    for _, part in ipairs(holder) do reply[#reply + 1] = part end
  end
  return reply
end
local epoch = redis.call('HGET', META, 'epoch')
if epoch ~= client_epoch then return {'epoch', epoch} end
if redis.call('HEXISTS', MSGS, input.id) == 1 then return {'duplicate', input.id} end
local active = redis.call('HGET', META, 'active_run')
local policy = ARGV[6]
local take_now = false
if policy == 'reject' then
  local blocker = active
  if blocker == '' then blocker = redis.call('LINDEX', QUEUE, 0) end
  if blocker then
    touch()
    return {'busy', redis.call('HGET', run_key(blocker), 'run') or ''}
  end
end
input.position = claim_position(input.position)
-- The reply's place is taken now, right after its input: however the queue plays out,
-- the transcript reads Q1 A1 Q2 A2 (see acquire).
local reply_position = claim_position(nil)
local input_raw = bump_and_write(input)
redis.call('ZADD', RUNS, redis.call('HGET', META, 'version'), run.id)
redis.call('HSET', INPUTS, input.id, run.id)
local run_raw = cjson.encode(run)
redis.call('HSET', run_key(run.id), 'run', run_raw, 'seq', 0, 'fence', '',
           'reply_position', reply_position)
emit(run.id, 'run.queued', '{"run":' .. run_raw .. '}')
emit(run.id, 'message.created', '{"message":' .. input_raw .. '}')
if policy == 'interrupt' then
  redis.call('LPUSH', QUEUE, run.id)
  local current = nil
  if active ~= '' then current = load_run(active) end
  if current then
    end_run(current, 'incomplete', 'interrupted', nil, {cause = 'interrupt'})
  else
    local lock = redis.call('GET', LOCK)
    if not lock or string.sub(lock, 1, #RESERVED) == RESERVED then
      redis.call('DEL', LOCK)
      wake_next()
    end
  end
else
  redis.call('RPUSH', QUEUE, run.id)
  if redis.call('EXISTS', LOCK) == 0 and redis.call('LLEN', QUEUE) == 1 then
    if ARGV[9] ~= '' then take_now = true else wake_next() end
  end
end
-- The diff and the run as the turn found them (queued, its reply not there yet), as
-- for any start; what taking the thread added reaches readers as the run's events.
local reply = snapshot(client_epoch, since)
table.insert(reply, 2, redis.call('HGET', run_key(run.id), 'run'))
if take_now then
  local run_raw, msg_raw, fence = take(run, ARGV[9])
  redis.call('HSET', RUN, 'claim', '1')  -- until its first write (confirm)
  for _, part in ipairs(taken(run_raw, msg_raw, fence)) do reply[#reply + 1] = part end
end
touch()
return reply
"""

ACQUIRE = r"""
-- acquire: take the thread for this run if the lock is free (or reserved for it) and
-- it is first in line: SET lock token PX lease, fence = INCR, run in_progress, active
-- run set, the assistant message created (in_progress, new version) at the position
-- start_run reserved for it, run.started and
-- message.created added. A holder whose lease ran out is ended (incomplete) first; so
-- are queued runs ahead that never took their reserved turn. Otherwise answers
-- {'wait', ms until the lock's lease or reservation runs out}. The same call again
-- (same token) after it took the thread answers the same 'ok'. 'ok' is
-- {'ok', run JSON, message JSON, fence, the whole thread as a sync object...} (take,
-- taken).
-- KEYS[1..9] fixed thread keys; KEYS[10..13] this run's keys
-- ARGV[1..3] now, ttl ms, lease ms; ARGV[4] run id; ARGV[5] token
local function ok(run_raw, msg_raw, fence)
  local reply = taken(run_raw, msg_raw, fence)
  table.insert(reply, 1, 'ok')
  return reply
end
if redis.call('EXISTS', META) == 0 then return {'gone'} end
local id, token = ARGV[4], ARGV[5]
local run = load_run(id)
if not run then return {'norun'} end
if run.status == 'in_progress' and redis.call('GET', LOCK) == token then
  -- Sent again after its reply was lost: this caller holds the run already.
  return ok(redis.call('HGET', RUN, 'run'), redis.call('HGET', MSGS, run.message_id),
            run.fence)
end
if run.status ~= 'queued' then return {'ended', cjson.encode(run)} end
reap()
local lock = redis.call('GET', LOCK)
if not lock then
  local head = redis.call('LINDEX', QUEUE, 0)
  while head and head ~= id do
    local ahead = load_run(head)
    if ahead then
      end_run(ahead, 'failed', 'error', nil,
              {error = 'the run did not take its turn within the lease (its device went away)'})
    else
      redis.call('LPOP', QUEUE)
    end
    head = redis.call('LINDEX', QUEUE, 0)
  end
elseif lock ~= RESERVED .. id then
  touch()
  return {'wait', redis.call('PTTL', LOCK)}
end
local run_raw, msg_raw, fence = take(run, token)
touch()
return ok(run_raw, msg_raw, fence)
"""

DELTA = r"""
-- delta: one batch of generated text, fenced: appended to the run's text and added as
-- message.delta {message_id, seq, text}. Nothing is written unless this holder still
-- has the lock (token) and the fence of its acquisition.
-- KEYS[1..9] fixed thread keys; KEYS[10..13] the run's keys
-- ARGV[1..3] now, ttl ms, lease ms; ARGV[4] run id; ARGV[5] token; ARGV[6] fence;
-- ARGV[7] message id; ARGV[8] the seq of the last text the holder had written before
-- these; ARGV[9..] texts, in order: one message.delta event each (pieces that arrived
-- while the previous write was in flight travel in one call)
if not fenced(ARGV[4], ARGV[5], ARGV[6]) then return {'lost'} end
confirm(ARGV[4])
return {'ok', append_deltas(ARGV[4], ARGV[7], tonumber(ARGV[8]), 9)}
"""

RENEW = r"""
-- renew: the watchdog extends the lease (fenced) and refreshes the thread's TTL.
-- KEYS[1..9] fixed thread keys; KEYS[10..13] the run's keys
-- ARGV[1..3] now, ttl ms, lease ms; ARGV[4] run id; ARGV[5] token; ARGV[6] fence
if not fenced(ARGV[4], ARGV[5], ARGV[6]) then return {'lost'} end
confirm(ARGV[4])
redis.call('PEXPIRE', LOCK, LEASE)
touch()
return {'ok'}
"""

FINISH = r"""
-- finish: the holder ends its run (fenced): the last text batch, then the assistant
-- message lands (new version), terminal events + done, the lock is released
-- (compare-and-delete: the token was checked in this same step) and the next queued
-- run woken.
-- KEYS[1..9] fixed thread keys; KEYS[10..13] the run's keys
-- ARGV[1..3] now, ttl ms, lease ms; ARGV[4] run id; ARGV[5] token; ARGV[6] fence;
-- ARGV[7] message id; ARGV[8] completed|failed|incomplete; ARGV[9] reason;
-- ARGV[10] usage JSON; ARGV[11] error text (failed) or what interrupted it (incomplete:
-- the cause of its run.cancelled event); ARGV[12] the seq of the last text written
-- before; ARGV[13..] the last texts, one message.delta each.
-- Sent again after its reply was lost, it finds its own end (the run hash keeps the
-- token that ended it): that run is answered, not 'lost'.
if not fenced(ARGV[4], ARGV[5], ARGV[6]) then
  if redis.call('HGET', RUN, 'ended_by') == ARGV[5] then
    return {'ok', redis.call('HGET', RUN, 'run')}
  end
  return {'lost'}
end
append_deltas(ARGV[4], ARGV[7], tonumber(ARGV[12]), 13)
local run = load_run(ARGV[4])
local info = {usage = cjson.decode(ARGV[10]), error = ARGV[11]}
if ARGV[8] == 'incomplete' then info = {cause = ARGV[11]} end
local raw = end_run(run, ARGV[8], ARGV[9], nil, info)
redis.call('HSET', RUN, 'ended_by', ARGV[5])
touch()
return {'ok', raw}
"""

CANCEL = r"""
-- cancel: stop a run from any device. A generating run ends cancelled and its message
-- keeps exactly content_seen (what the user saw) or, without it, the text so far; a
-- queued run is taken out of line. The holder's next fenced write fails.
-- KEYS[1..9] fixed thread keys; KEYS[10..13] the run's keys
-- ARGV[1..3] now, ttl ms, lease ms; ARGV[4] run id; ARGV[5] device id;
-- ARGV[6] '1' if content_seen is given; ARGV[7] content_seen
if redis.call('EXISTS', META) == 0 then return {'gone'} end
local run = load_run(ARGV[4])
if not run then return {'norun'} end
local text = nil
if ARGV[6] == '1' then text = ARGV[7] end
local raw = end_run(run, 'cancelled', 'cancelled', text, {cause = 'cancel'})
touch()
return {'ok', raw}
"""

READ_RUN = r"""
-- read_run: the run object (after ending the active run if its holder's lease ran out).
-- KEYS[1..9] fixed thread keys; KEYS[10..13] the run's keys
-- ARGV[1..3] now, ttl ms, lease ms; ARGV[4] run id
if redis.call('EXISTS', META) == 0 then return {'gone'} end
reap()
local raw = redis.call('HGET', RUN, 'run')
if not raw then return {'norun'} end
touch()
return {'ok', raw}
"""


# -- the fleet controller's functions (edgebundle.fleet.controller) --------------------
# They run under the controller's (admin's) user. A device may call them too, but Redis
# checks what they do against its user, whose keys and commands do not reach them.

WRITE_DESIRED = r"""
-- write_desired: compare-and-set of a device's DesiredState: written only if the stored
-- generation is still ARGV[1], so of two writers that read the same state one wins and
-- the other changes nothing; then the nudge is published. Returns 1 written, 0 someone
-- wrote in between.
-- KEYS[1] desired(id)
-- ARGV[1] the generation the caller read (0: the key was missing or unreadable)
-- ARGV[2] the new DesiredState JSON (its generation is ARGV[1] + 1)
-- ARGV[3] the device's nudge channel
local raw = redis.call('GET', KEYS[1])
local current = 0
if raw then
  local ok, doc = pcall(cjson.decode, raw)
  if ok and type(doc) == 'table' and tonumber(doc['generation']) then
    current = tonumber(doc['generation'])
  end
end
if current ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], '1')
return 1
"""

WRITE_ROLLOUT = r"""
-- write_rollout: compare-and-set of the fleet's Rollout, checking the caller's lease in
-- the same step. Returns 'ok', 'lease' (the caller no longer holds the lease: nothing
-- written) or 'changed' (the rollout changed since the caller read it: nothing written).
-- KEYS[1] rollout(fleet)  KEYS[2] controller_lock(fleet)  KEYS[3] revisions(fleet)
-- KEYS[4] paused(fleet)
-- ARGV[1] the Rollout JSON the caller read ('' = the key was missing)
-- ARGV[2] the new Rollout JSON
-- ARGV[3] the caller's lease token ('' = an operator command, no lease needed)
-- ARGV[4] a revision id to store in revisions ('' = none), ARGV[5] its Revision JSON
-- ARGV[6] 'resume' = also delete the paused key
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) ~= ARGV[3] then return 'lease' end
local raw = redis.call('GET', KEYS[1])
if (raw or '') ~= ARGV[1] then return 'changed' end
if ARGV[4] ~= '' then redis.call('HSETNX', KEYS[3], ARGV[4], ARGV[5]) end
redis.call('SET', KEYS[1], ARGV[2])
if ARGV[6] == 'resume' then redis.call('DEL', KEYS[4]) end
return 'ok'
"""

HOLD_LEASE = r"""
-- hold_lease: takes the controller's lease when free, renews it when the caller holds
-- it. Returns 1 held, 0 not.
-- KEYS[1] controller_lock(fleet)
-- ARGV[1] the caller's token, ARGV[2] the lease in ms
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

RELEASE_LEASE = r"""
-- release_lease: deletes the controller's lease only if the caller holds it.
-- KEYS[1] controller_lock(fleet)
-- ARGV[1] the caller's token
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# name -> body. Sync functions start with begin() (the common layout, checked); the
# fleet's with use().
SYNC_FUNCTIONS = {
    "create": CREATE, "sync": SYNC, "push": PUSH, "start_run": START_RUN,
    "acquire": ACQUIRE, "delta": DELTA, "renew": RENEW, "finish": FINISH,
    "cancel": CANCEL, "read_run": READ_RUN,
}
FLEET_FUNCTIONS = {
    "write_desired": WRITE_DESIRED, "write_rollout": WRITE_ROLLOUT,
    "hold_lease": HOLD_LEASE, "release_lease": RELEASE_LEASE,
}
SYNC_SOURCE = PRELUDE + "".join(SYNC_FUNCTIONS.values())  # what a device's user must allow

_VERSION_MARK = "@VERSION@"


def _library(version: str) -> str:
    """The library's source for ``version`` (the mark itself when computing the hash)."""
    def register(name: str, body: str, setup: str) -> str:
        return (f"redis.register_function{{function_name='eb_{version}_{name}', "
                f"callback=function(keys, args)\n{setup}(keys, args)\n{body}end}}\n")

    parts = [f"#!lua name=edgebundle_{version}\n", PRELUDE]
    parts += [register(name, body, "begin") for name, body in SYNC_FUNCTIONS.items()]
    parts += [register(name, body, "use") for name, body in FLEET_FUNCTIONS.items()]
    parts.append("-- version: this library's version, read-only (FCALL_RO). No KEYS, no ARGV.\n"
                 f"redis.register_function{{function_name='eb_{version}_version', "
                 f"callback=function() return '{version}' end, flags={{'no-writes'}}}}\n")
    return "".join(parts)


VERSION = hashlib.sha256(_library(_VERSION_MARK).encode()).hexdigest()[:12]
LIBRARY = f"edgebundle_{VERSION}"
SOURCE = _library(VERSION)


def function_name(name: str) -> str:
    """The Redis name of one of the library's functions (``eb_<version>_<name>``)."""
    if name != "version" and name not in SYNC_FUNCTIONS and name not in FLEET_FUNCTIONS:
        raise ValueError(f"no function {name!r} in the edgebundle library")
    return f"eb_{VERSION}_{name}"


def _missing(exc: ResponseError) -> bool:
    return "function not found" in str(exc).lower()


def _refusal(exc: ResponseError, what: str) -> RedisAccessError | None:
    """The clear error for a Redis that cannot run edgebundle's functions at all."""
    text = str(exc)
    if "unknown command" in text.lower() and "fcall" in text.lower():
        return RedisAccessError(
            f"this Redis cannot {what}: it has no FCALL, so it is older than 7.0; edgebundle "
            "calls its Lua as Redis Functions, which need Redis 7.0 or newer: upgrade it")
    if isinstance(exc, NoPermissionError) and "'fcall" in text.lower():
        return RedisAccessError(
            f"this Redis user may not {what} ({text}): a device user made by an older "
            "edgebundle has EVAL instead of FCALL; provision it again "
            "(edgebundle fleet provision FLEET --device ID)")
    return None


async def load_library(redis: Client) -> int:
    """FUNCTION LOAD REPLACE the library (on a cluster: on every primary, whose replicas
    copy it); the number of nodes it was loaded on. Loading it again is harmless: the
    name carries the version, so REPLACE only ever puts back the same code. A user that
    may not load gets redis-py's NoPermissionError; a Redis older than 7.0 a RedisAccessError."""
    try:
        reply = await redis.function_load(SOURCE, replace=True)
    except NoPermissionError:
        raise
    except ResponseError as exc:
        raise _refusal(exc, "load edgebundle's functions") or exc from None
    return len(reply) if isinstance(reply, dict) else 1


class Function:
    """One function of the library, called like a redis-py Script:
    ``await fn(keys=[...], args=[...])``."""

    def __init__(self, functions: Functions, name: str) -> None:
        self.functions = functions
        self.name = function_name(name)

    async def __call__(self, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        return await self.functions.fcall(self.name, keys, args)


class Functions:
    """The library on one client: FCALL, and FUNCTION LOAD when Redis answers "Function
    not found" and this user may load (else a RedisAccessError saying who can)."""

    def __init__(self, redis: Client) -> None:
        self.redis = redis
        self._loads = 0  # libraries loaded through this object (to load once per miss)
        self._lock: asyncio.Lock | None = None
        self.create = Function(self, "create")
        self.sync = Function(self, "sync")
        self.push = Function(self, "push")
        self.start_run = Function(self, "start_run")
        self.acquire = Function(self, "acquire")
        self.delta = Function(self, "delta")
        self.renew = Function(self, "renew")
        self.finish = Function(self, "finish")
        self.cancel = Function(self, "cancel")
        self.read_run = Function(self, "read_run")

    async def fcall(self, name: str, keys: Sequence[str],
                    args: Sequence[str | int | float]) -> Any:
        loads = self._loads
        try:
            return await self.redis.fcall(name, len(keys), *keys, *args)
        except ResponseError as exc:
            if not _missing(exc):
                raise _refusal(exc, "run edgebundle's functions") or exc from None
        await self.load(after=loads)
        return await self.redis.fcall(name, len(keys), *keys, *args)

    async def ensure_loaded(self) -> None:
        """Load the library unless this version of it answers (for pipelines, which
        cannot load half-way)."""
        loads = self._loads
        try:
            await self.redis.fcall_ro(function_name("version"), 0)
        except ResponseError as exc:
            if not _missing(exc):
                raise _refusal(exc, "run edgebundle's functions") or exc from None
            await self.load(after=loads)

    async def load(self, *, after: int | None = None) -> None:
        """Load the library; with ``after``: only if no call loaded it since ``after``
        (many calls that find it missing at once load it once)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if after is not None and self._loads != after:
                return
            try:
                await load_library(self.redis)
            except NoPermissionError as exc:
                raise RedisAccessError(
                    f"the edgebundle functions ({LIBRARY}) are not loaded on this Redis and "
                    f"this user may not load them ({exc}): an admin loads them with "
                    "`edgebundle fleet load-functions --redis-url ADMIN_URL` (provisioning "
                    "devices does it too)") from None
            self._loads += 1
