#include "CLuaShim.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

static clua_Control *control_of(lua_State *L) {
    void *ud = NULL;
    lua_getallocf(L, &ud);
    return (clua_Control *)ud;
}

/* ---- Allocator: refuses growth beyond the cap unless in soft mode ----------------------------------------- */

static void *clua_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    clua_Control *c = (clua_Control *)ud;
    size_t old = ptr != NULL ? osize : 0; /* when ptr is NULL, osize encodes the object type */
    if (nsize == 0) {
        free(ptr);
        c->memory_used -= old;
        return NULL;
    }
    if (nsize > old && c->memory_limit != 0 && !c->soft && c->memory_used - old + nsize > c->memory_limit) {
        c->memory_hit = 1;
        return NULL; /* Lua runs an emergency collection, retries, then raises LUA_ERRMEM */
    }
    void *p = realloc(ptr, nsize);
    if (p == NULL) return NULL;
    c->memory_used = c->memory_used - old + nsize;
    return p;
}

lua_State *clua_newstate(clua_Control *control) {
    control->soft = 1;
    lua_State *L = lua_newstate(clua_alloc, control);
    if (L != NULL) {
        lua_setwarnf(L, NULL, NULL);
        /* Generational: a routing call's garbage (the request table, its strings) dies young, and the incremental
           collector's periodic full cycles showed as latency: HTTP p99 through a script 4.4-4.8 ms -> 2.4-2.5 ms
           (wrk -c64, docs/benchmarks.md "Fourth session"). */
        lua_gc(L, LUA_GCGEN, 0, 0);
    }
    return L;
}

/* ---- Instruction budget ------------------------------------------------------------------------------------ */

static void clua_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    clua_Control *c = control_of(L);
    if (!c->instruction_hit) {
        int n = lua_gethookcount(L);
        c->instructions_used += n;
        if (n != c->granularity) lua_sethook(L, clua_hook, LUA_MASKCOUNT, c->granularity);
        if (c->instruction_limit == 0 || c->instructions_used < c->instruction_limit) return;
        c->instruction_hit = 1;
    }
    /* Out of budget: fail on every further instruction of this thread, so a `pcall` loop cannot swallow it. */
    lua_sethook(L, clua_hook, LUA_MASKCOUNT, 1);
    luaL_error(L, "instruction limit exceeded");
}

/* Charges a coroutine's creation with one hook period: a new thread starts a fresh hook count, so without this a
   loop creating short coroutines could run instructions the hook never sees. */
static int clua_charge(lua_State *L) {
    clua_Control *c = control_of(L);
    c->instructions_used += c->granularity;
    if (c->instruction_hit || (c->instruction_limit != 0 && c->instructions_used >= c->instruction_limit)) {
        c->instruction_hit = 1;
        return luaL_error(L, "instruction limit exceeded");
    }
    return 0;
}

static int clua_charged_call(lua_State *L) {
    clua_charge(L);
    int n = lua_gettop(L);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, n, LUA_MULTRET);
    return lua_gettop(L);
}

void clua_begin_call(lua_State *L, clua_Control *c) {
    c->instructions_used = 0;
    c->instruction_hit = 0;
    c->memory_hit = 0;
    int granularity = 1000;
    if (c->instruction_limit != 0 && c->instruction_limit < granularity) granularity = (int)c->instruction_limit;
    c->granularity = granularity;
    lua_sethook(L, clua_hook, LUA_MASKCOUNT, granularity);
    c->soft = 0;
}

void clua_end_call(clua_Control *c) {
    c->soft = 1;
}

/* ---- Sandbox ----------------------------------------------------------------------------------------------- */

/* load(chunk [, chunkname [, mode [, env]]]) with the mode forced to "t": binary chunks are refused. */
static int clua_safe_load(lua_State *L) {
    int n = lua_gettop(L);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_pushvalue(L, 1);
    if (n >= 2) lua_pushvalue(L, 2); else lua_pushnil(L);
    lua_pushliteral(L, "t");
    int nargs = 3;
    if (n >= 4) {
        lua_pushvalue(L, 4);
        nargs = 4;
    }
    lua_call(L, nargs, LUA_MULTRET);
    return lua_gettop(L) - n;
}

/* collectgarbage limited to the options that cannot change how the collector runs. */
static int clua_safe_collectgarbage(lua_State *L) {
    const char *opt = luaL_optstring(L, 1, "collect");
    if (strcmp(opt, "collect") == 0) {
        lua_gc(L, LUA_GCCOLLECT);
        lua_pushinteger(L, 0);
        return 1;
    }
    if (strcmp(opt, "count") == 0) {
        int k = lua_gc(L, LUA_GCCOUNT);
        int b = lua_gc(L, LUA_GCCOUNTB);
        lua_pushnumber(L, (lua_Number)k + ((lua_Number)b / 1024));
        return 1;
    }
    if (strcmp(opt, "step") == 0) {
        lua_pushboolean(L, lua_gc(L, LUA_GCSTEP, 0));
        return 1;
    }
    return luaL_error(L, "collectgarbage option '%s' is not available in the sandbox", opt);
}

/* setmetatable refusing `__gc`: Lua disables hooks while a finalizer runs, so a finalizer could loop forever
   outside the instruction budget. An object is marked for finalization only if its metatable has `__gc` when it
   is set, so checking here is enough. */
static int clua_safe_setmetatable(lua_State *L) {
    if (lua_type(L, 2) == LUA_TTABLE) {
        lua_pushliteral(L, "__gc");
        if (lua_rawget(L, 2) != LUA_TNIL) return luaL_error(L, "__gc metamethods are not available in the sandbox");
        lua_pop(L, 1);
    }
    lua_settop(L, 2);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, 2, 1);
    return 1;
}

static void clua_wrap_charged(lua_State *L, int table, const char *name) {
    lua_getfield(L, table, name);
    lua_pushcclosure(L, clua_charged_call, 1);
    lua_setfield(L, table, name);
}

void clua_opensandbox(lua_State *L) {
    static const struct { const char *name; lua_CFunction open; } libs[] = {
        {LUA_GNAME, luaopen_base},
        {LUA_STRLIBNAME, luaopen_string},
        {LUA_TABLIBNAME, luaopen_table},
        {LUA_MATHLIBNAME, luaopen_math},
        {LUA_UTF8LIBNAME, luaopen_utf8},
        {LUA_COLIBNAME, luaopen_coroutine},
    };
    for (size_t i = 0; i < sizeof(libs) / sizeof(libs[0]); i++) {
        luaL_requiref(L, libs[i].name, libs[i].open, 1);
        lua_pop(L, 1);
    }

    lua_pushglobaltable(L);
    int g = lua_gettop(L);

    lua_pushnil(L);
    lua_setfield(L, g, "dofile");
    lua_pushnil(L);
    lua_setfield(L, g, "loadfile");

    lua_getfield(L, g, "load");
    lua_pushcclosure(L, clua_safe_load, 1);
    lua_setfield(L, g, "load");

    lua_getfield(L, g, "setmetatable");
    lua_pushcclosure(L, clua_safe_setmetatable, 1);
    lua_setfield(L, g, "setmetatable");

    lua_pushcfunction(L, clua_safe_collectgarbage);
    lua_setfield(L, g, "collectgarbage");

    lua_getfield(L, g, LUA_STRLIBNAME);
    lua_pushnil(L);
    lua_setfield(L, -2, "dump");
    lua_pop(L, 1);

    lua_getfield(L, g, LUA_COLIBNAME);
    int co = lua_gettop(L);
    clua_wrap_charged(L, co, "create");
    clua_wrap_charged(L, co, "wrap");
    lua_pop(L, 1);

    /* os: only time and clock, from a library table that is never published itself. */
    luaopen_os(L);
    int os = lua_gettop(L);
    lua_createtable(L, 0, 2);
    lua_getfield(L, os, "time");
    lua_setfield(L, -2, "time");
    lua_getfield(L, os, "clock");
    lua_setfield(L, -2, "clock");
    lua_setfield(L, g, "os");
    lua_pop(L, 1);

    /* luaL_requiref left the libraries in the registry's _LOADED table; nothing in the sandbox can reach it, but
       drop it anyway so no library escapes through a future API. */
    lua_pushnil(L);
    lua_setfield(L, LUA_REGISTRYINDEX, LUA_LOADED_TABLE);

    lua_pop(L, 1);
}

/* ---- Swift callbacks --------------------------------------------------------------------------------------- */

typedef struct {
    clua_SwiftFn fn;
    void *ctx;
} clua_Binding;

static int clua_trampoline(lua_State *L) {
    clua_Binding *b = (clua_Binding *)lua_touserdata(L, lua_upvalueindex(1));
    clua_Control *c = control_of(L);
    int was_soft = c->soft;
    c->soft = 1;
    int n = b->fn(L, b->ctx);
    c->soft = was_soft;
    if (!was_soft && c->memory_limit != 0 && c->memory_used > c->memory_limit) {
        c->memory_hit = 1;
        lua_pushliteral(L, "not enough memory");
        return lua_error(L);
    }
    if (n >= 0) return n;
    if (lua_type(L, -1) == LUA_TSTRING) {
        luaL_where(L, 1);
        lua_insert(L, -2);
        lua_concat(L, 2);
    }
    return lua_error(L);
}

void clua_pushswiftfunction(lua_State *L, clua_SwiftFn fn, void *ctx) {
    clua_Binding *b = (clua_Binding *)lua_newuserdatauv(L, sizeof(clua_Binding), 0);
    b->fn = fn;
    b->ctx = ctx;
    lua_pushcclosure(L, clua_trampoline, 1);
}

static int clua_now(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
    return 1;
}

void clua_pushnowfunction(lua_State *L) {
    lua_pushcfunction(L, clua_now);
}

int clua_loadtext(lua_State *L, const char *buffer, size_t size, const char *chunkname) {
    return luaL_loadbufferx(L, buffer, size, chunkname, "t");
}

/* ---- Query parsing ----------------------------------------------------------------------------------------- */

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Pushes s[0..n) with '+' → ' ' and valid %XX escapes decoded. */
static void push_unescaped(lua_State *L, const char *s, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) {
        if (s[i] == '%' || s[i] == '+') break;
    }
    if (i == n) {
        lua_pushlstring(L, s, n);
        return;
    }
    luaL_Buffer b;
    char *out = luaL_buffinitsize(L, &b, n);
    size_t o = 0;
    for (i = 0; i < n; i++) {
        char c = s[i];
        if (c == '+') {
            c = ' ';
        } else if (c == '%' && i + 2 < n && hexval((unsigned char)s[i + 1]) >= 0 && hexval((unsigned char)s[i + 2]) >= 0) {
            c = (char)(hexval((unsigned char)s[i + 1]) * 16 + hexval((unsigned char)s[i + 2]));
            i += 2;
        }
        out[o++] = c;
    }
    luaL_pushresultsize(&b, o);
}

int clua_parsequery(lua_State *L) {
    size_t n = 0;
    const char *q = lua_type(L, 1) == LUA_TSTRING ? lua_tolstring(L, 1, &n) : "";
    lua_settop(L, 1);
    lua_createtable(L, 0, 4); /* 2: args */
    lua_createtable(L, 0, 4); /* 3: all */
    size_t start = 0;
    while (start < n) {
        size_t end = start;
        while (end < n && q[end] != '&') end++;
        if (end > start) {
            size_t eq = start;
            while (eq < end && q[eq] != '=') eq++;
            push_unescaped(L, q + start, eq - start); /* 4: key */
            if (eq < end) push_unescaped(L, q + eq + 1, end - eq - 1);
            else lua_pushliteral(L, "");              /* 5: value */
            lua_pushvalue(L, 4);
            lua_pushvalue(L, 5);
            lua_rawset(L, 2);
            lua_pushvalue(L, 4);
            if (lua_rawget(L, 3) == LUA_TNIL) {        /* 6: list */
                lua_pop(L, 1);
                lua_createtable(L, 1, 0);
                lua_pushvalue(L, 5);
                lua_rawseti(L, -2, 1);
                lua_pushvalue(L, 4);
                lua_insert(L, -2);
                lua_rawset(L, 3);
            } else {
                lua_pushvalue(L, 5);
                lua_rawseti(L, 6, (lua_Integer)lua_rawlen(L, 6) + 1);
                lua_pop(L, 1);
            }
            lua_pop(L, 2);
        }
        start = end + 1;
    }
    return 2;
}
