#ifndef CLUA_SHIM_H
#define CLUA_SHIM_H

#include <stddef.h>
#include <stdint.h>
#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

/* ---- Macros Swift cannot import ------------------------------------------------------------------------------ */

static inline int clua_registryindex(void) { return LUA_REGISTRYINDEX; }
static inline int clua_upvalueindex(int i) { return lua_upvalueindex(i); }
static inline void clua_pop(lua_State *L, int n) { lua_settop(L, -(n) - 1); }
static inline void clua_newtable(lua_State *L) { lua_createtable(L, 0, 0); }
static inline const char *clua_tostring(lua_State *L, int i) { return lua_tolstring(L, i, NULL); }
static inline int clua_isnoneornil(lua_State *L, int i) { return lua_type(L, i) <= 0; }
static inline void clua_pushcfunction(lua_State *L, lua_CFunction f) { lua_pushcclosure(L, f, 0); }
static inline void clua_insert(lua_State *L, int i) { lua_rotate(L, i, 1); }
static inline void clua_gc_collect(lua_State *L) { lua_gc(L, LUA_GCCOLLECT); }
static inline int clua_gc_count_bytes(lua_State *L) { return lua_gc(L, LUA_GCCOUNT) * 1024 + lua_gc(L, LUA_GCCOUNTB); }

/* ---- The per-state control block: memory cap and instruction budget --------------------------------------- */

/* Owned by the Swift `LuaScript`; it is also the allocator's `ud`, so C code reaches it with `lua_getallocf`. */
typedef struct clua_Control {
    size_t memory_used;      /* bytes currently allocated by this state */
    size_t memory_limit;     /* 0 = unlimited */
    int soft;                /* != 0: the limit is not enforced (Swift is touching the state outside a pcall) */
    int memory_hit;          /* set when an allocation was refused, or a Swift callback overran the cap */
    int64_t instructions_used;
    int64_t instruction_limit; /* 0 = unlimited */
    int granularity;         /* the count hook fires every `granularity` VM instructions */
    int instruction_hit;     /* set when the budget ran out */
} clua_Control;

/* A state whose allocator charges `control` (which must outlive the state). NULL when malloc fails. */
lua_State *clua_newstate(clua_Control *control);

/* Opens the sandboxed library set into the globals: base (without dofile/loadfile; `load` text-only;
   collectgarbage limited to "count"/"collect"/"step"), string (without dump), table, math, utf8, coroutine
   (create/wrap charged against the instruction budget), os (time, clock only). Must be called in soft mode. */
void clua_opensandbox(lua_State *L);

/* Resets the budgets before a call and makes the limits binding (soft = 0). */
void clua_begin_call(lua_State *L, clua_Control *control);
/* Back to soft mode after a call. */
void clua_end_call(clua_Control *control);

/* ---- Swift callbacks --------------------------------------------------------------------------------------- */

/* Returns the number of results pushed, or -1 to raise the value on top of the stack as an error (a string error
   gets the caller's position prepended). Never call anything that raises (lua_error, luaL_check*, lua_call) in
   such a function: a longjmp must not cross Swift frames. The memory cap is lifted while it runs, and checked
   again when it returns. */
typedef int (*clua_SwiftFn)(lua_State *L, void *ctx);

/* Pushes a Lua function calling `fn(L, ctx)` through the C trampoline. */
void clua_pushswiftfunction(lua_State *L, clua_SwiftFn fn, void *ctx);

/* Pushes `proxy.now()`: wall-clock seconds since the epoch, as a float. */
void clua_pushnowfunction(lua_State *L);

/* parse_query(q) -> args, all: `a=1&b=x+y&a=2&flag` gives {a="2", b="x y", flag=""} and
   {a={"1","2"}, b={"x y"}, flag={""}}; '+' and valid %XX escapes are decoded. A Lua C function. */
int clua_parsequery(lua_State *L);

/* Loads a text chunk; the same as luaL_loadbufferx with mode "t". */
int clua_loadtext(lua_State *L, const char *buffer, size_t size, const char *chunkname);

#endif
