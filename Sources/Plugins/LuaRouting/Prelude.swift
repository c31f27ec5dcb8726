/// Lua run once per state before the script, with the `proxy` table, the C query parser and the Swift filler of
/// lazy `req` fields as its arguments. It returns the metatables of `req` tables (lazy `query`, `host`, `scheme`,
/// `client_ip`, `listener`, `headers`; derived `args`, `args_all`, `headers_all`, `header_list`) and of `res`
/// tables (derived fields only), and the
/// `proxy.json.null` sentinel, and routes `print` to `proxy.log("info", …)`. It keeps the library functions it
/// needs in locals, so a script replacing `string.lower` and the like does not change how requests are parsed.
let luaPrelude = #"""
local proxy, parse_query, fill = ...
local rawget, rawset, type, pairs, next, tostring, select = rawget, rawset, type, pairs, next, tostring, select
local lower, concat = string.lower, table.concat
local log = proxy.log

-- Fields of `req` that Swift fills on first read (`fill(t, k)` sets and returns them): most scripts read only
-- `method` and `path`, so building the others up front would cost every request.
local lazy = { query = true, host = true, scheme = true, client_ip = true, listener = true, headers = true }

-- Computed on first use, for `req` and `res` alike.
local function derived(t, k)
    if k == "args" or k == "args_all" then
        local args, all = parse_query(t.query)
        rawset(t, "args", args)
        rawset(t, "args_all", all)
        if k == "args" then return args end
        return all
    elseif k == "headers_all" then
        local h = t.headers
        local all = rawget(t, "headers_all")
        if all then return all end
        all = {}
        if type(h) == "table" then
            for name, value in pairs(h) do all[name] = { value } end
        end
        rawset(t, "headers_all", all)
        return all
    elseif k == "header_list" then
        local f = function(name)
            local list = t.headers_all[lower(name)]
            local out = {}
            if list then
                for i = 1, #list do out[i] = list[i] end
            end
            return out
        end
        rawset(t, "header_list", f)
        return f
    end
    return nil
end

local reqmt = { __metatable = false }
reqmt.__index = function(t, k)
    if lazy[k] then return fill(t, k) end
    return derived(t, k)
end
reqmt.__pairs = function(t)
    for k in pairs(lazy) do local _ = t[k] end
    return next, t, nil
end

local resmt = { __metatable = false, __index = derived }

local null = setmetatable({}, {
    __tostring = function() return "null" end,
    __newindex = function() error("proxy.json.null is read-only", 2) end,
    __metatable = false,
})
proxy.json.null = null

print = function(...)
    local n = select("#", ...)
    local parts = { ... }
    for i = 1, n do parts[i] = tostring(parts[i]) end
    log("info", concat(parts, "\t", 1, n))
end

return reqmt, resmt, null
"""#
