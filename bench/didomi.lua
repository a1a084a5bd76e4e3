-- wrk script: realistic Didomi user.updated deliveries (5–8 purposes, a preference) for a pool of
-- users. Each request carries a unique (user, version) unless the mix asks for duplicates or
-- out-of-order deliveries.
--   BENCH_USERS   pool size (default 1000000)
--   BENCH_DUP     share of duplicates (re-sent earlier deliveries), e.g. 0.10
--   BENCH_OOO     share of out-of-order deliveries (an older version than already sent), e.g. 0.10
--   BENCH_TOKEN   bearer token
--   BENCH_DELAY_MS  pause after each response on a connection (paces the load below saturation)
local users = tonumber(os.getenv("BENCH_USERS") or "1000000")
local dup_share = tonumber(os.getenv("BENCH_DUP") or "0")
local ooo_share = tonumber(os.getenv("BENCH_OOO") or "0")
local token = os.getenv("BENCH_TOKEN") or ""
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "0")
local purposes = {"newsletter", "sms_offers", "analytics", "geolocation_data", "profiling", "partners", "push", "ads"}
local thread_id = 0
local counter = 0
local recent = {}

function setup(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
end

local function body(user, version)
  local n = 5 + (version % 4)
  local parts = {}
  for i = 1, n do
    local enabled = ((version + i) % 3 ~= 0) and "true" or "false"
    if i == 1 then
      parts[i] = string.format('{"id":"%s","enabled":%s,"values":{"topics":{"value":"t%d,t%d"}}}',
        purposes[i], enabled, version % 7, version % 5 + 10)
    else
      parts[i] = string.format('{"id":"%s","enabled":%s}', purposes[i], enabled)
    end
  end
  -- updated_at grows with the version, as on the platform (one millisecond per version step)
  local ts = os.date("!%Y-%m-%dT%H:%M:%S", 1704067200 + math.floor(version / 1000)) .. string.format(".%03dZ", version % 1000)
  return string.format('{"type":"user.updated","parameters":{"new_entity":{"id":"u-%d","organization_id":"bench",' ..
    '"organization_user_id":"u%d@example.com","version":%d,"created_at":"2024-01-01T00:00:00Z",' ..
    '"updated_at":"%s","metadata":{"segment":"bench"},"country":"FR","last_seen_country":"FR",' ..
    '"consents":{"purposes":[%s],"vendors":{"enabled":["google"],"disabled":[],"enabled_li":[],"disabled_li":[]}}}}}',
    user, user, version, ts, table.concat(parts, ","))
end

function request()
  counter = counter + 1
  local r = math.random()
  local payload
  if r < dup_share and #recent > 0 then
    payload = recent[math.random(#recent)]
  elseif r < dup_share + ooo_share then
    -- an older version of some user: must come back stale, never applied over newer state
    local user = math.random(users)
    payload = body(user, 1)
  else
    -- versions grow with time, so the newest delivery per user is the one with the highest version
    local version = 2 + counter * 64 + tid
    local user = math.random(users)
    payload = body(user, version)
    if #recent < 1000 then recent[#recent + 1] = payload else recent[math.random(1000)] = payload end
  end
  return wrk.format("POST", "/webhooks/didomi",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}, payload)
end

if pause > 0 then
  function delay()
    return pause
  end
end

function init(args)
  math.randomseed(os.time() + tid * 7919)
end

local statuses = {}
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  io.write(string.format("RESULT requests=%d duration_s=%.2f rps=%.1f p50_ms=%.2f p99_ms=%.2f max_ms=%.2f errors=%d non2xx=%d\n",
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
