/// Lua run once per state before the script, with the `proxy` table and the C query parser as its arguments.
/// It returns the metatable of `req`/`res` tables (lazy `args`, `args_all`, `headers_all`, `header_list`) and the
/// `proxy.json.null` sentinel, and routes `print` to `proxy.log("info", …)`. It keeps the library functions it
/// needs in locals, so a script replacing `string.lower` and the like does not change how requests are parsed.
let luaPrelude = #"""
local proxy, parse_query = ...
local rawget, rawset, type, pairs, tostring, select = rawget, rawset, type, pairs, tostring, select
local lower, concat = string.lower, table.concat
local log = proxy.log

local mt = { __metatable = false }
mt.__index = function(t, k)
    if k == "args" or k == "args_all" then
        local args, all = parse_query(rawget(t, "query"))
        rawset(t, "args", args)
        rawset(t, "args_all", all)
        if k == "args" then return args end
        return all
    elseif k == "headers_all" then
        local all = {}
        local h = rawget(t, "headers")
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

return mt, null
"""#
