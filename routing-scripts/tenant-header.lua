-- tenant-header.lua: tenant sharding by a request header.
--
-- Use it when every request names its tenant in a header (here `x-tenant`) and all of a tenant's traffic should
-- reach the one backend that holds that tenant's state. The tenant is the key: the first request places it on the
-- pool (rendezvous hashing), later requests go to its owner. Requests without the header get a 400.
--
-- proxy.options:
--   header  (string, default "x-tenant")  the header naming the tenant
--   pool    (string, default "tenants")   the pool tenants live on

local header = proxy.options.header or "x-tenant"
local pool = proxy.options.pool or "tenants"

function route(req)
    local tenant = req.headers[header]
    if tenant == nil or tenant == "" then
        return { respond = { status = 400, headers = { ["content-type"] = "text/plain" },
                             body = "missing " .. header .. " header\n" } }
    end
    return { key = "tenant:" .. tenant, pool = pool, place = "rendezvous",
             set_headers = { ["x-routed-tenant"] = tenant } }
end
