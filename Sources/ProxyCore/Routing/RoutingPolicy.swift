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
    /// The request body, only when the policy asked for it with `needBody` (bounded by `limits.max_buffered_body`).
    public var body: ByteBuffer?

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
        self.body = nil
    }

    /// The request a routing policy sees for a parsed head: the target split into path and query at the first `?`,
    /// the `Host` field as `host`.
    public init(head: HTTPRequestHead, isUpgrade: Bool, scheme: String, clientIP: String, listener: String) {
        let uri = head.uri
        let path: String
        let query: Substring
        // On UTF-8 bytes: `firstIndex(of: Character)` walks grapheme clusters (1.7 % of the fast path's user time).
        if let mark = uri.utf8.firstIndex(of: UInt8(ascii: "?")) {
            path = String(uri[..<mark])
            query = uri[uri.utf8.index(after: mark)...]
        } else {
            path = uri
            query = ""
        }
        self.init(
            method: head.method, path: path, query: query, headers: head.headers,
            host: head.headers.first(name: "host") ?? "", scheme: scheme, clientIP: clientIP, isUpgrade: isUpgrade,
            listener: listener)
    }
}

/// A response the proxy writes itself, without a backend.
public struct LocalResponse: Sendable, Equatable {
    public var status: HTTPResponseStatus
    public var headers: [Header]
    public var body: String

    public init(status: HTTPResponseStatus, headers: [Header] = [], body: String = "") {
        self.status = status
        self.headers = headers
        self.body = body
    }
}

/// One header field, as a policy sets it.
public struct Header: Sendable, Equatable {
    public var name: String
    public var value: String

    public init(_ name: String, _ value: String) {
        self.name = name
        self.value = value
    }
}

/// A fan-out: one request to every usable backend of a pool, answers merged into one response.
public struct Fanout: Sendable, Equatable {
    /// The built-in merge: every 2xx answer's JSON array, concatenated into one array.
    public static let jsonArrayMerge = "json-array"

    public var pool: String
    /// `json-array`, or the name of a merge function the policy provides (`mergeFanout`).
    public var merge: String
    /// How long each backend gets to answer completely; a backend that does not is skipped (and logged).
    public var timeout: TimeAmount

    public init(pool: String, merge: String = Fanout.jsonArrayMerge, timeout: TimeAmount = .seconds(5)) {
        self.pool = pool
        self.merge = merge
        self.timeout = timeout
    }
}

/// One backend's complete answer to a fan-out.
public struct FanoutResponse: Sendable {
    public var backend: String
    public var status: Int
    public var headers: HTTPHeaders
    public var body: ByteBuffer

    public init(backend: String, status: Int, headers: HTTPHeaders, body: ByteBuffer) {
        self.backend = backend
        self.status = status
        self.headers = headers
        self.body = body
    }
}

/// Where a forwarded request goes.
public enum RouteTarget: Sendable, Equatable {
    /// Any backend of the pool, chosen by the pool's stateless balancer.
    case pool(String)
    /// Exactly this backend (by id).
    case backend(String)
    /// The backend that owns `key`, placing the key on the pool by `placement` if nobody owns it yet.
    case keyed(key: String, pool: String, placement: String?)
}

/// What a routing policy decides for one request.
public struct RouteDecision: Sendable, Equatable {
    public enum Action: Sendable, Equatable {
        case forward(RouteTarget)
        case respond(LocalResponse)
        /// Read the request body (up to `limits.max_buffered_body`) and route again with it.
        case needBody
        /// Send the (bodiless) request to every usable backend of a pool in parallel and answer with the merge.
        case fanout(Fanout)
    }

    public var action: Action
    /// Hand the response body (up to `limits.max_buffered_body`) to the policy's `onResponse`.
    public var responseBody: Bool
    /// Set (replace) these request headers before forwarding.
    public var setHeaders: [Header]
    /// Remove these request headers before forwarding (lower-case names).
    public var removeHeaders: [String]
    /// Replace the request path (the query is kept) before forwarding.
    public var path: String?

    public init(
        action: Action,
        setHeaders: [Header] = [],
        removeHeaders: [String] = [],
        path: String? = nil,
        responseBody: Bool = false
    ) {
        self.action = action
        self.responseBody = responseBody
        self.setHeaders = setHeaders
        self.removeHeaders = removeHeaders
        self.path = path
    }

    public static func pool(_ name: String) -> RouteDecision { RouteDecision(action: .forward(.pool(name))) }
    public static func backend(_ id: String) -> RouteDecision { RouteDecision(action: .forward(.backend(id))) }
    public static func respond(_ response: LocalResponse) -> RouteDecision { RouteDecision(action: .respond(response)) }
}

/// What the core tells a policy about a backend's response, when the policy observes responses.
public struct RouteResponse: Sendable {
    public var status: Int
    public var headers: HTTPHeaders
    /// The response body, only when the decision asked for it (`responseBody`) and it fit the buffer limit.
    public var body: ByteBuffer?
    /// The backend that answered.
    public var backend: String

    public init(status: Int, headers: HTTPHeaders, body: ByteBuffer?, backend: String) {
        self.status = status
        self.headers = headers
        self.body = body
        self.backend = backend
    }
}

/// What a policy may do after seeing a response.
public enum ResponseAction: Sendable, Equatable {
    /// The backend that answered now owns this key (a key named only in a response, like a generated room name).
    case claim(String)
}

/// The seam between the generic core and a routing plugin (Lua scripts are one).
///
/// `route` runs on the event loop of the client connection, once per request head, and must not block or do I/O.
/// A policy is created per event loop by a `RoutingPolicyFactory`, so it may keep loop-confined state.
public protocol RoutingPolicy: AnyObject {
    func route(_ request: RouteRequest) throws -> RouteDecision
    /// Whether the core should call `onResponse` (it keeps the request around only then).
    var observesResponses: Bool { get }
    /// Called with the response head (and the body when the decision asked for it) before the response completes.
    func onResponse(_ request: RouteRequest, _ response: RouteResponse) throws -> ResponseAction?
    /// Merges the answers of a fan-out whose decision named the merge `function` (not the built-in `json-array`).
    func mergeFanout(_ request: RouteRequest, function: String, responses: [FanoutResponse]) throws -> LocalResponse
    /// The reconciliation probe this policy declares (nil: none).
    var probe: ProbeSpec? { get }
    /// The keys a backend's probe answer says it holds.
    func probeKeys(backend: String, response: FanoutResponse) throws -> [String]
}

/// A fan-out named a merge function the policy does not have.
public struct UnknownMergeFunction: Error, CustomStringConvertible {
    public var name: String
    public init(name: String) { self.name = name }
    public var description: String { "no merge function '\(self.name)'" }
}

extension RoutingPolicy {
    public var observesResponses: Bool { false }
    public func onResponse(_ request: RouteRequest, _ response: RouteResponse) throws -> ResponseAction? { nil }
    public func mergeFanout(_ request: RouteRequest, function: String, responses: [FanoutResponse]) throws -> LocalResponse {
        throw UnknownMergeFunction(name: function)
    }
    public var probe: ProbeSpec? { nil }
    public func probeKeys(backend: String, response: FanoutResponse) throws -> [String] { [] }
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
