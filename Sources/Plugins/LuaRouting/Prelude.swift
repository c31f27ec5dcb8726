/// Lua run once per state before the script, with the `proxy` table as its argument. It returns the metatable of
/// `req`/`res` tables (lazy `args`, `args_all`, `headers_all`, `header_list`) and the `proxy.json.null` sentinel,
/// and routes `print` to `proxy.log("info", …)`. It keeps the library functions it needs in locals, so a script
/// replacing `string.gsub` and the like does not change how requests are parsed.
let luaPrelude = #"""
local proxy = ...
local rawget, rawset, type, pairs, tonumber, tostring, select = rawget, rawset, type, pairs, tonumber, tostring, select
local gsub, char, lower, gmatch, find, sub, concat = string.gsub, string.char, string.lower, string.gmatch,
    string.find, string.sub, table.concat
local log = proxy.log

local function hexchar(h) return char(tonumber(h, 16)) end

local function unescape(s)
    s = gsub(s, "+", " ")
    return (gsub(s, "%%(%x%x)", hexchar))
end

-- "a=1&b=x%20y&a=2&flag" -> args = {a="2", b="x y", flag=""}, all = {a={"1","2"}, b={"x y"}, flag={""}}
local function parse_query(q)
    local args, all = {}, {}
    if type(q) == "string" and q ~= "" then
        for pair in gmatch(q, "[^&]+") do
            local eq = find(pair, "=", 1, true)
            local k, v
            if eq then
                k, v = unescape(sub(pair, 1, eq - 1)), unescape(sub(pair, eq + 1))
            else
                k, v = unescape(pair), ""
            end
            args[k] = v
            local list = all[k]
            if list then list[#list + 1] = v else all[k] = { v } end
        end
    end
    return args, all
end

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
