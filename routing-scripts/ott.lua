-- ott.lua: the OpenTogetherTube preset. Every WebSocket and every room-scoped HTTP call of a room reaches the one
-- OTT server (monolith) that has the room loaded, so unmodified OTT servers scale out behind the proxy.
--
-- Use it in front of several OpenTogetherTube servers (examples/ott.yaml). Facts it relies on
-- (shared/reference/ott-routing.md): rooms live in one server's memory and load lazily on the first WebSocket auth or
-- room-scoped HTTP call; names compare case-insensitively; `vote`/`undo` need the caller's WebSocket on the same
-- server; `POST /api/room/generate` names the new room only in its 201 response; each server's `/api/room/list`
-- lists only its own rooms.
--
-- proxy.options:
--   pool       (string, default "ott")         the pool of OTT servers
--   placement  (string, default: the pool's)   how a new room is placed: "least-keys", "rendezvous", ...
--   base_url   (string, default "")            OTT's base_url (OTT_BASE_URL), e.g. "/ott"
--   apikey     (string, optional)              OTT's admin api_key: enables the reconciliation probe, which lists
--                                              every server's rooms (including private ones) to relearn owners

local pool = proxy.options.pool or "ott"
local placement = proxy.options.placement
local base = proxy.options.base_url or ""
if base:sub(-1) == "/" then base = base:sub(1, -2) end
local api = base .. "/api/room"

-- OTT's room name pattern (ROOM_NAME_REGEX, case-insensitive): [a-z0-9_-]+. The 3-32 length rule applies only when
-- a user picks a name (`create`); generated rooms are UUIDs (36 characters). These three are endpoints, not rooms.
local reserved = { list = true, create = true, generate = true }
local function room_key(name)
    if type(name) ~= "string" or name == "" or #name > 64 or name:find("[^%w_%-]") then return nil end
    local key = name:lower()
    if reserved[key] then return nil end
    return key
end

local function keyed(key, extra)
    local decision = extra or {}
    decision.key = key
    decision.pool = pool
    decision.place = placement
    return decision
end

function route(req)
    local path = req.path
    if path:sub(1, #api + 1) ~= api .. "/" then
        -- SPA pages, assets, /api/auth, /api/user, /api/data, /api/status: any server will do.
        return { pool = pool }
    end
    local name, rest = path:sub(#api + 2):match("^([^/]*)(.*)$")

    if name == "list" and req.method == "GET" and rest == "" and not req.is_upgrade then
        -- Each server lists only its own rooms: ask them all and merge.
        return { fanout = pool, merge = "merge_room_list", timeout = 3 }
    end
    if name == "create" and req.method == "POST" and rest == "" then
        if req.body == nil then return { need_body = true } end
        local ok, body = pcall(proxy.json.decode, req.body)
        local key = ok and type(body) == "table" and room_key(body.name) or nil
        if key then return keyed(key) end
        return { pool = pool } -- not a valid create: let OTT answer its 400
    end
    if name == "generate" and req.method == "POST" and rest == "" then
        -- The new room's name exists only in the response: any server creates it, on_response claims it there.
        return { pool = pool, response_body = true }
    end

    local key = room_key(name)
    if key then return keyed(key) end
    return { pool = pool } -- not a room name: OTT answers (or closes the WebSocket with 4001)
end

function on_response(req, res)
    if res.status == 201 and req.method == "POST" and req.path == api .. "/generate" and res.body then
        local ok, body = pcall(proxy.json.decode, res.body)
        local key = ok and type(body) == "table" and room_key(body.room) or nil
        if key then return { claim = key } end
    end
    return nil
end

-- GET /api/room/list: de-duplicate by lower-cased name (a room on two servers is one room to users), then sort as
-- OTT does: users descending, then name ascending. The apikey header passes through to every server unchanged.
function merge_room_list(req, responses)
    local seen, rooms = {}, {}
    local status = 502
    for _, res in ipairs(responses) do
        if res.status == 200 then
            status = 200
            local ok, list = pcall(proxy.json.decode, res.body)
            if ok and type(list) == "table" then
                for _, room in ipairs(list) do
                    local lower = type(room) == "table" and type(room.name) == "string" and room.name:lower()
                    if lower and not seen[lower] then
                        seen[lower] = true
                        rooms[#rooms + 1] = room
                    end
                end
            end
        elseif status ~= 200 and res.status >= 400 and res.status < 500 then
            status = res.status -- e.g. a wrong apikey: every server says 400, so do we
        end
    end
    if status ~= 200 then
        return { status = status, headers = { ["content-type"] = "application/json" },
                 body = proxy.json.encode({ success = false }) }
    end
    table.sort(rooms, function(a, b)
        local ua, ub = tonumber(a.users) or 0, tonumber(b.users) or 0
        if ua ~= ub then return ua > ub end
        return a.name:lower() < b.name:lower()
    end)
    local body = #rooms == 0 and "[]" or proxy.json.encode(rooms)
    return { status = 200, headers = { ["content-type"] = "application/json; charset=utf-8" }, body = body }
end

-- Reconciliation: with the admin apikey, every server's list names all rooms it has loaded (private ones too), so a
-- restarted proxy relearns owners and duplicates are reported. The proxy never unloads a room itself.
if proxy.options.apikey then
    probe = {
        pool = pool,
        path = api .. "/list",
        headers = { apikey = proxy.options.apikey },
        interval = tonumber(proxy.options.probe_interval) or 30,
    }
    function probe_keys(backend, res)
        local keys = {}
        local ok, list = pcall(proxy.json.decode, res.body)
        if ok and type(list) == "table" then
            for _, room in ipairs(list) do
                local key = type(room) == "table" and room_key(room.name)
                if key then keys[#keys + 1] = key end
            end
        end
        return keys
    end
end
