-- stateless.lua: any backend of a pool.
--
-- Use it for stateless services, where any backend can answer any request: the pool's own balancer picks one.
-- It is what the proxy does without a script; start from here to add header rewrites or local answers.
--
-- proxy.options:
--   pool  (string, default "web")  the pool to forward to

local pool = proxy.options.pool or "web"

function route(req)
    if req.path == "/healthz" then
        return { respond = { status = 200, body = "ok\n" } }
    end
    return { pool = pool, remove_headers = { "x-internal-debug" } }
end
