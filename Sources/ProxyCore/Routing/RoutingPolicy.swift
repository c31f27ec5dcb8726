import NIOCore
import NIOHTTP1

/// What the core tells a routing policy about a request: everything a policy may decide on, and nothing it
/// could do I/O with.
public struct RouteRequest: Sendable {
    public var method: HTTPMethod
    /// The request target's path, without the query (e.g. `/api/room/abc`).
    public var path: String
    /// The raw query string after `?`, without the `?` (empty when absent).
    public var query: Substring
    public var headers: HTTPHeaders
    /// The `Host` header (or the authority of an absolute-form target), empty when the client sent none.
    public var host: String
    /// `http` or `https`, as seen by the client.
    public var scheme: String
    /// The client's address as this proxy sees it (not taken from `X-Forwarded-For`).
    public var clientIP: String
    /// True when the request asks to switch protocols (e.g. a WebSocket handshake).
    public var isUpgrade: Bool
    /// The listener the request arrived on.
    public var listener: String

    public init(
        method: HTTPMethod,
        path: String,
        query: Substring,
        headers: HTTPHeaders,
        host: String,
        scheme: String,
        clientIP: String,
        isUpgrade: Bool,
        listener: String
    ) {
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.host = host
        self.scheme = scheme
        self.clientIP = clientIP
        self.isUpgrade = isUpgrade
        self.listener = listener
    }
}

/// What a routing policy decides for one request.
public enum RouteDecision: Sendable, Equatable {
    /// Any backend of the pool, chosen by the pool's stateless balancer.
    case pool(String)
    /// Exactly this backend (by id).
    case backend(String)
    /// Answer the client directly without contacting a backend.
    case respond(status: HTTPResponseStatus, headers: [(String, String)], body: String)

    public static func == (lhs: RouteDecision, rhs: RouteDecision) -> Bool {
        switch (lhs, rhs) {
        case (.pool(let a), .pool(let b)): return a == b
        case (.backend(let a), .backend(let b)): return a == b
        case (.respond(let s1, let h1, let b1), .respond(let s2, let h2, let b2)):
            return s1 == s2 && b1 == b2 && h1.elementsEqual(h2, by: { $0 == $1 })
        default: return false
        }
    }
}

/// The seam between the generic core and a routing plugin (the Lua scripts arrive as one).
///
/// `route` runs on the event loop of the client connection, once per request head, and must not block or do I/O.
/// A policy is created per event loop by a `RoutingPolicyFactory`, so it may keep loop-confined state.
public protocol RoutingPolicy: AnyObject {
    func route(_ request: RouteRequest) throws -> RouteDecision
}

/// Routes every request of a listener to one pool: the built-in policy until a script is configured.
public final class StaticPoolPolicy: RoutingPolicy {
    public let pool: String

    public init(pool: String) {
        self.pool = pool
    }

    public func route(_ request: RouteRequest) throws -> RouteDecision {
        .pool(self.pool)
    }
}
