import Foundation
import NIOCore
import NIOSSL

/// Where and how to connect: parsed from `redis://[[user]:password@]host[:port][/db][?insecure=true]` or `rediss://...`
/// (TLS, verifying the server certificate unless `insecure=true`), plus timeouts and limits set in code.
public struct RedisConfiguration: Sendable {
    public var host: String
    public var port: Int
    public var username: String?
    public var password: String?
    public var database: Int
    /// TLS (`rediss://`).
    public var tls: Bool
    /// Verify the server's certificate and host name (TLS only). `?insecure=true` turns it off.
    public var verifyCertificate: Bool
    /// Extra trust roots for TLS (for example a private CA); the system's roots otherwise.
    public var trustRoots: NIOSSLTrustRoots?

    public var connectTimeout: TimeAmount = .seconds(2)
    /// Per-command timeout; a timed-out command fails and its connection is closed and reconnected.
    public var commandTimeout: TimeAmount = .seconds(2)
    /// Connections in a `RedisClient`'s pool.
    public var poolSize: Int = 2
    /// Reconnect back-off: the first delay, doubled per failed attempt up to the maximum, with jitter.
    public var reconnectBaseDelay: TimeAmount = .milliseconds(50)
    public var reconnectMaxDelay: TimeAmount = .seconds(2)
    public var limits: RESPLimits = .default

    public init(
        host: String,
        port: Int = 6379,
        username: String? = nil,
        password: String? = nil,
        database: Int = 0,
        tls: Bool = false,
        verifyCertificate: Bool = true
    ) {
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.database = database
        self.tls = tls
        self.verifyCertificate = verifyCertificate
    }

    /// Parses a `redis://` or `rediss://` URL; throws `RedisError.invalidURL` saying what is wrong.
    public init(url string: String) throws {
        func invalid(_ why: String) -> RedisError { .invalidURL("\(why) in '\(Self.redacted(string))'") }
        guard string.contains("://") else { throw invalid("missing scheme (expected redis:// or rediss://)") }
        guard let components = URLComponents(string: string) else { throw invalid("not a URL") }
        let tls: Bool
        switch components.scheme?.lowercased() {
        case "redis": tls = false
        case "rediss": tls = true
        case nil: throw invalid("missing scheme (expected redis:// or rediss://)")
        case let other?: throw invalid("unsupported scheme '\(other)' (expected redis or rediss)")
        }
        guard var host = components.host, !host.isEmpty else { throw invalid("missing host") }
        if host.hasPrefix("["), host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        let port = components.port ?? 6379
        guard (1...65535).contains(port) else { throw invalid("port \(port) out of range") }

        let user = components.user.flatMap { $0.isEmpty ? nil : $0 }
        let password = components.password.flatMap { $0.isEmpty ? nil : $0 }
        if user != nil, password == nil {
            throw invalid("a user name needs a password (redis://user:password@host, or redis://:password@host)")
        }

        var database = 0
        let path = components.path
        if !path.isEmpty, path != "/" {
            let digits = path.dropFirst()
            guard path.hasPrefix("/"), let number = Int(digits), number >= 0, digits.allSatisfy(\.isNumber) else {
                throw invalid("database '\(path.dropFirst())' is not a number ≥ 0")
            }
            database = number
        }

        var verify = true
        for item in components.queryItems ?? [] {
            switch item.name {
            case "insecure":
                switch item.value?.lowercased() {
                case "true", "1", "yes", nil: verify = false
                case "false", "0", "no": verify = true
                case let other?: throw invalid("insecure must be true or false, not '\(other)'")
                }
            default:
                throw invalid("unknown parameter '\(item.name)' (supported: insecure)")
            }
        }
        if !verify, !tls { throw invalid("insecure=true only applies to rediss://") }

        self.init(
            host: host, port: port, username: user, password: password, database: database, tls: tls,
            verifyCertificate: verify
        )
    }

    /// The URL with the password replaced by `***` (for logs and errors).
    public static func redacted(_ url: String) -> String {
        guard var components = URLComponents(string: url), components.password != nil else { return url }
        components.password = "***"
        return components.string ?? url
    }

    /// This configuration as a URL, password redacted.
    public var redactedURL: String {
        var text = self.tls ? "rediss://" : "redis://"
        if self.password != nil { text += "\(self.username ?? ""):***@" }
        text += self.host.contains(":") ? "[\(self.host)]" : self.host
        text += ":\(self.port)/\(self.database)"
        if self.tls, !self.verifyCertificate { text += "?insecure=true" }
        return text
    }

    func makeSSLContext() throws -> NIOSSLContext {
        var tlsConfiguration = TLSConfiguration.makeClientConfiguration()
        if !self.verifyCertificate {
            tlsConfiguration.certificateVerification = .none
        }
        if let roots = self.trustRoots {
            tlsConfiguration.trustRoots = roots
        }
        return try NIOSSLContext(configuration: tlsConfiguration)
    }
}
