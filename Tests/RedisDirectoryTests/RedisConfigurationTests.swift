import Testing

@testable import RedisDirectory

@Suite("RedisConfiguration URLs")
struct RedisConfigurationTests {
    @Test func parsesRedisURLs() throws {
        let plain = try RedisConfiguration(url: "redis://localhost")
        #expect(plain.host == "localhost")
        #expect(plain.port == 6379)
        #expect(plain.database == 0)
        #expect(plain.password == nil && plain.username == nil && !plain.tls)

        let full = try RedisConfiguration(url: "redis://app:p%40ss@10.0.0.5:6380/3")
        #expect(full.host == "10.0.0.5")
        #expect(full.port == 6380)
        #expect(full.username == "app")
        #expect(full.password == "p@ss")
        #expect(full.database == 3)
        #expect(full.redactedURL == "redis://app:***@10.0.0.5:6380/3")

        let passwordOnly = try RedisConfiguration(url: "redis://:secret@redis:7000/")
        #expect(passwordOnly.username == nil)
        #expect(passwordOnly.password == "secret")

        let tls = try RedisConfiguration(url: "rediss://cache.example.com")
        #expect(tls.tls && tls.verifyCertificate)
        let insecure = try RedisConfiguration(url: "rediss://cache.example.com:6390/1?insecure=true")
        #expect(insecure.tls && !insecure.verifyCertificate)
        #expect(insecure.redactedURL == "rediss://cache.example.com:6390/1?insecure=true")

        let ipv6 = try RedisConfiguration(url: "redis://[::1]:6379")
        #expect(ipv6.host == "::1")
    }

    @Test(arguments: [
        ("localhost:6379", "missing scheme"),
        ("http://localhost", "unsupported scheme 'http'"),
        ("redis://", "missing host"),
        ("redis://localhost/abc", "database 'abc' is not a number"),
        ("redis://localhost/-1", "database '-1' is not a number"),
        ("redis://localhost/1/2", "database '1/2' is not a number"),
        ("redis://user@localhost", "a user name needs a password"),
        ("redis://localhost?insecure=true", "insecure=true only applies to rediss://"),
        ("rediss://localhost?insecure=maybe", "insecure must be true or false"),
        ("redis://localhost?timeout=5", "unknown parameter 'timeout'"),
        ("redis://localhost:0", "port 0 out of range"),
    ])
    func rejectsBadURLsClearly(_ url: String, _ expected: String) {
        do {
            _ = try RedisConfiguration(url: url)
            Issue.record("\(url) was accepted")
        } catch {
            guard case RedisError.invalidURL(let why) = error else {
                Issue.record("unexpected error \(error)")
                return
            }
            #expect(why.contains(expected), "\(why)")
        }
    }

    @Test func errorsNeverShowThePassword() {
        do {
            _ = try RedisConfiguration(url: "redis://u:hunter2@localhost/x")
        } catch {
            #expect(!"\(error)".contains("hunter2"))
        }
    }

    @Test func backoffGrowsExponentiallyWithJitterAndACap() {
        let backoff = Backoff(base: .milliseconds(50), max: .seconds(2))
        #expect(backoff.delay(attempt: 1, random: 1) == .milliseconds(50))
        #expect(backoff.delay(attempt: 2, random: 1) == .milliseconds(100))
        #expect(backoff.delay(attempt: 4, random: 1) == .milliseconds(400))
        #expect(backoff.delay(attempt: 10, random: 1) == .seconds(2))
        #expect(backoff.delay(attempt: 1_000, random: 1) == .seconds(2))
        #expect(backoff.delay(attempt: 3, random: 0.5) == .milliseconds(100))
        for attempt in 1...20 {
            let delay = backoff.delay(attempt: attempt)
            #expect(delay >= .milliseconds(25) && delay <= .seconds(2))
        }
    }
}
