import Foundation
import NIOCore
import NIOHTTP1
import NIOWebSocket

/// An HTTP answer of `OTTBackend`.
struct OTTResponse {
    var status: HTTPResponseStatus
    var contentType: String
    var body: String

    static func json(_ status: HTTPResponseStatus, _ object: Any) -> OTTResponse {
        OTTResponse(status: status, contentType: "application/json; charset=utf-8", body: OTTJSON.encode(object))
    }
}

/// Collects one request (head and body) at a time and answers it with `OTTRouter`, Content-Length framed so
/// keep-alive works.
final class OTTHTTPHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private static let maxBody = 1024 * 1024

    private let state: OTTBackendState
    private var head: HTTPRequestHead?
    private var body: [UInt8] = []

    init(state: OTTBackendState) {
        self.state = state
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch Self.unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            self.body = []
        case .body(let buffer):
            if self.body.count < Self.maxBody {
                self.body.append(contentsOf: buffer.readableBytesView.prefix(Self.maxBody - self.body.count))
            }
        case .end:
            guard let head = self.head else { return }
            self.head = nil
            self.state.requestReceived()
            let response = OTTRouter(state: self.state).respond(to: head, body: self.body)
            self.body = []
            self.write(response, for: head, context: context)
        }
    }

    private func write(_ response: OTTResponse, for head: HTTPRequestHead, context: ChannelHandlerContext) {
        let keepAlive = head.isKeepAlive
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: response.contentType)
        headers.add(name: "Content-Length", value: String(response.body.utf8.count))
        headers.add(name: "X-OTT-Backend", value: self.state.id)
        if !keepAlive {
            headers.add(name: "Connection", value: "close")
        } else if head.version.major == 1 && head.version.minor == 0 {
            headers.add(name: "Connection", value: "keep-alive")
        }
        context.write(Self.wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: response.status, headers: headers))),
                      promise: nil)
        if head.method != .HEAD {
            context.write(Self.wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: response.body)))), promise: nil)
        }
        let written = context.writeAndFlush(Self.wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let channel = context.channel
            written.whenComplete { _ in channel.close(promise: nil) }
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A refused upgrade (e.g. no Sec-WebSocket-Key) is still answered as plain HTTP.
        if error is NIOWebSocketUpgradeError { return }
        context.close(promise: nil)
    }
}

/// OTT's HTTP surface (`server/api/room.ts`, `auth`, `status`), as far as routing is concerned.
struct OTTRouter {
    let state: OTTBackendState

    private var id: String { self.state.id }
    private var store: OTTSharedStore { self.state.store }

    func respond(to head: HTTPRequestHead, body: [UInt8]) -> OTTResponse {
        let base = self.state.config.baseURL
        let path = head.uri.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        guard base.isEmpty || path == base || path.hasPrefix(base + "/") else {
            return OTTResponse(status: .notFound, contentType: "text/plain; charset=utf-8",
                               body: "Cannot \(head.method.rawValue) \(path) (outside base_url, \(self.id))\n")
        }
        let segments = path.dropFirst(base.count).split(separator: "/").map(String.init)
        guard segments.first == "api" else {
            // The single-page app's pages and /assets.
            return OTTResponse(status: .ok, contentType: "text/html; charset=utf-8",
                               body: "<!doctype html><title>OpenTogetherTube</title><!-- served by \(self.id): \(path) -->\n")
        }
        let method = head.method
        let api = segments.dropFirst().joined(separator: "/")
        switch (method, api) {
        case (.GET, "status"):
            return self.json(.ok, ["status": "ok"])
        case (.GET, "auth/grant"):
            if let token = Self.bearerToken(head.headers), self.store.isValidToken(token) {
                return self.json(.ok, ["token": token])
            }
            return self.json(.ok, ["token": self.store.mintToken()])
        case (.GET, "room/list"):
            return self.list(head.headers)
        case (.POST, "room/create"):
            return self.create(body)
        case (.POST, "room/generate"):
            return self.generate()
        default:
            break
        }
        guard segments.count >= 3, segments[1] == "room" else {
            // /api/user, /api/data, /api/announce...: any server answers (their state is shared).
            return self.json(.ok, ["success": true, "path": path])
        }
        let name = segments[2]
        guard OTTRoomName.matchesPattern(name) else {
            return self.error(.badRequest, "BadApiArgumentException", "invalid room name")
        }
        switch (method, segments.dropFirst(3).joined(separator: "/")) {
        case (.GET, ""):
            guard let view = self.state.load(name) else { return self.roomNotFound() }
            return self.json(.ok, self.roomJSON(view))
        case (.PATCH, ""):
            return self.patch(name, body)
        case (.DELETE, ""):
            return self.adminUnload(name, head.headers)
        case (.POST, "queue"), (.PATCH, "queue"), (.DELETE, "queue"):
            return self.queue(method, name, body)
        case (.POST, "vote"), (.DELETE, "vote"), (.POST, "undo"):
            return self.needsLocalClient(name, head.headers)
        default:
            return self.error(.notFound, "NotFound", "no such room endpoint")
        }
    }

    // MARK: Endpoints

    /// Only this server's rooms; public ones unless the admin `apikey` is given (a wrong one is refused).
    private func list(_ headers: HTTPHeaders) -> OTTResponse {
        var includeAll = false
        if let apiKey = headers.first(name: "apikey") {
            guard apiKey == self.state.config.apiKey else {
                return self.error(.badRequest, "BadApiArgumentException", "apikey is invalid")
            }
            includeAll = true
        }
        let rooms = self.state.allRooms()
            .filter { includeAll || $0.snapshot.visibility == "public" }
            .sorted { a, b in
                if a.users != b.users { return a.users > b.users }
                let (la, lb) = (a.snapshot.name.lowercased(), b.snapshot.name.lowercased())
                return la != lb ? la < lb : a.snapshot.name < b.snapshot.name
            }
        let items: [[String: Any]] = rooms.map { view in
            [
                "name": view.snapshot.name, "title": view.snapshot.title, "description": view.snapshot.description,
                "isTemporary": view.snapshot.isTemporary, "visibility": view.snapshot.visibility,
                "queueMode": view.snapshot.queueMode, "currentSource": NSNull(), "users": view.users,
                "served_by": self.id,
            ]
        }
        return .json(.ok, items)
    }

    private func create(_ body: [UInt8]) -> OTTResponse {
        guard let object = OTTJSON.decodeObject(body), let name = object["name"] as? String else {
            return self.error(.badRequest, "BadApiArgumentException", "name is required")
        }
        guard OTTRoomName.isValidForCreate(name) else {
            return self.error(.badRequest, "BadApiArgumentException", "invalid room name")
        }
        let snapshot = OTTSharedStore.RoomSnapshot(
            name: name,
            title: object["title"] as? String ?? "",
            description: object["description"] as? String ?? "",
            visibility: object["visibility"] as? String ?? "public",
            queueMode: object["queueMode"] as? String ?? "manual",
            isTemporary: object["isTemporary"] as? Bool ?? true
        )
        guard case .created = self.state.create(snapshot) else {
            return self.error(.badRequest, "RoomNameTakenException", "room name is taken")
        }
        return self.json(.created, ["success": true])
    }

    private func generate() -> OTTResponse {
        while true {
            let name = UUID().uuidString.lowercased()
            if case .created = self.state.create(OTTSharedStore.RoomSnapshot(name: name)) {
                return self.json(.created, ["success": true, "room": name])
            }
        }
    }

    private func patch(_ name: String, _ body: [UInt8]) -> OTTResponse {
        let object = OTTJSON.decodeObject(body) ?? [:]
        let view = self.state.update(name) { snapshot in
            if let title = object["title"] as? String { snapshot.title = title }
            if let description = object["description"] as? String { snapshot.description = description }
            if let visibility = object["visibility"] as? String { snapshot.visibility = visibility }
            if let queueMode = object["queueMode"] as? String { snapshot.queueMode = queueMode }
        }
        guard view != nil else { return self.roomNotFound() }
        return self.json(.ok, ["success": true])
    }

    private func queue(_ method: HTTPMethod, _ name: String, _ body: [UInt8]) -> OTTResponse {
        let object = OTTJSON.decodeObject(body) ?? [:]
        let item = (object["service"] as? String).flatMap { service in
            (object["id"] as? String).map { OTTSharedStore.QueueItem(service: service, id: $0) }
        }
        let view = self.state.update(name) { snapshot in
            guard let item else { return }
            switch method {
            case .POST: snapshot.queue.append(item)
            case .DELETE: snapshot.queue.removeAll { $0 == item }
            default: break
            }
        }
        guard view != nil else { return self.roomNotFound() }
        return self.json(.ok, ["success": true])
    }

    /// `vote` and `undo`: OTT looks up the caller's WebSocket client in this server's memory.
    private func needsLocalClient(_ name: String, _ headers: HTTPHeaders) -> OTTResponse {
        guard let token = Self.bearerToken(headers) else {
            return self.error(.badRequest, "MissingToken", "a token is required")
        }
        guard self.store.isValidToken(token) else {
            return self.error(.unauthorized, "InvalidToken", "unknown token")
        }
        guard self.state.hasClient(token: token, in: name) else {
            return self.error(.badRequest, "ClientNotFoundInRoomException", "client not found in room \(name)")
        }
        return self.json(.ok, ["success": true])
    }

    /// Admin unload: clients closed with 4003 and the shared snapshot deleted.
    private func adminUnload(_ name: String, _ headers: HTTPHeaders) -> OTTResponse {
        guard let apiKey = headers.first(name: "apikey"), apiKey == self.state.config.apiKey else {
            return self.error(.badRequest, "BadApiArgumentException", "an admin apikey is required")
        }
        if let snapshot = self.state.unload(name, code: OTTCloseCode.roomUnloaded) {
            self.store.deleteRoom(named: snapshot.name)
        } else if let snapshot = self.store.snapshot(named: name) {
            self.store.deleteRoom(named: snapshot.name)
        } else {
            return self.roomNotFound()
        }
        return self.json(.ok, ["success": true])
    }

    // MARK: Helpers

    private func roomJSON(_ view: OTTBackendState.RoomView) -> [String: Any] {
        [
            "name": view.snapshot.name, "title": view.snapshot.title, "description": view.snapshot.description,
            "isTemporary": view.snapshot.isTemporary, "visibility": view.snapshot.visibility,
            "queueMode": view.snapshot.queueMode, "hasOwner": false,
            "queue": view.snapshot.queue.map { ["service": $0.service, "id": $0.id] },
            "users": view.clientIDs.map { ["id": $0] }, "loadEpoch": view.loadEpoch, "served_by": self.id,
        ]
    }

    private func json(_ status: HTTPResponseStatus, _ object: [String: Any]) -> OTTResponse {
        var object = object
        object["served_by"] = self.id
        return .json(status, object)
    }

    private func error(_ status: HTTPResponseStatus, _ name: String, _ message: String) -> OTTResponse {
        self.json(status, ["success": false, "error": ["name": name, "message": message]])
    }

    private func roomNotFound() -> OTTResponse {
        self.error(.notFound, "RoomNotFoundException", "room not found")
    }

    static func bearerToken(_ headers: HTTPHeaders) -> String? {
        guard let value = headers.first(name: "authorization") else { return nil }
        let parts = value.split(separator: " ", maxSplits: 1)
        guard parts.count == 2, parts[0].lowercased() == "bearer" else { return nil }
        let token = parts[1].trimmingCharacters(in: .whitespaces)
        return token.isEmpty ? nil : token
    }
}
