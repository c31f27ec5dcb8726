-- path-key.lua: one backend per named resource in the path, e.g. a chat or video room.
--
-- Use it when the URL names a stateful object (`/rooms/{name}`, `/rooms/{name}/ws`, ...) that lives on exactly
-- one backend, so every request and WebSocket for that room must meet on the same process. The room name is the
-- key, placed on the pool with rendezvous hashing; other paths go to any backend of the pool.
--
-- proxy.options:
--   prefix  (string, default "rooms")  the first path segment before the name
--   pool    (string, default "rooms")  the pool rooms live on

local prefix = proxy.options.prefix or "rooms"
local pool = proxy.options.pool or "rooms"
local pattern = "^/" .. prefix .. "/([^/]+)"

function route(req)
    local name = req.path:match(pattern)
    if name then
        return { key = "room:" .. name, pool = pool, place = "rendezvous" }
    end
    return { pool = pool }
end
