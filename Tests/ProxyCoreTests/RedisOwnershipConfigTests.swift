import NIOCore
import ProxyCore
import Testing

@Suite("RedisOwnershipConfig")
struct RedisOwnershipConfigTests {
    @Test("store redis with every key")
    func full() throws {
        let yaml = minimal + """
            ownership:
              store: redis
              redis:
                url: redis://127.0.0.1:6390/2
                prefix: "p1:"
                timeout: 100ms
                on_unavailable: fail
                lease_renew_interval: 5s

            """
        let config = try ConfigLoader.parse(yaml: yaml, file: "test.yaml")
        #expect(config.ownership.store == .redis)
        #expect(
            config.ownership.redis
                == RedisOwnershipConfig(
                    url: "redis://127.0.0.1:6390/2", prefix: "p1:", timeout: .milliseconds(100), onUnavailable: .fail,
                    leaseRenewInterval: .seconds(5)))
    }

    @Test("defaults: prefix ott:, 250ms, degrade, renewal from idle_ttl")
    func defaults() throws {
        let yaml = minimal + "ownership:\n  store: redis\n  redis:\n    url: redis://localhost\n"
        let config = try ConfigLoader.parse(yaml: yaml, file: "test.yaml")
        #expect(config.ownership.redis == RedisOwnershipConfig(url: "redis://localhost"))
        #expect(config.ownership.redis?.prefix == "ott:")
        #expect(config.ownership.redis?.timeout == .milliseconds(250))
        #expect(config.ownership.redis?.onUnavailable == .degrade)
        #expect(config.ownership.redis?.leaseRenewInterval == nil)
        #expect(try ConfigLoader.parse(yaml: minimal, file: "test.yaml").ownership.redis == nil)
    }

    @Test("bad values are reported with their positions")
    func badValues() {
        let yaml = minimal + """
            ownership:
              store: redis
              redis:
                url: http://x
                timeout: soon
                on_unavailable: degrad
                lease_renew_interval: 0s

            """
        #expect(
            errors(in: yaml) == [
                error(line: 12, column: 10, path: "ownership.redis.url", "expected a redis:// or rediss:// URL, got 'http://x'"),
                error(line: 13, column: 14, path: "ownership.redis.timeout", "expected a duration like 5s or 300ms, got 'soon'"),
                error(
                    line: 14, column: 21, path: "ownership.redis.on_unavailable",
                    "expected one of degrade, fail, got 'degrad' (did you mean 'degrade'?)"),
                error(line: 15, column: 27, path: "ownership.redis.lease_renew_interval", "must be greater than 0s, got '0s'"),
            ])
    }

    @Test("store redis needs the redis section; the section needs store redis; url is required")
    func missing() {
        #expect(
            errors(in: minimal + "ownership:\n  store: redis\n") == [
                error(line: 10, column: 3, path: "ownership", "store redis needs a 'redis' section (at least its url)")
            ])
        #expect(
            errors(in: minimal + "ownership:\n  redis:\n    url: redis://h\n") == [
                error(line: 11, column: 5, path: "ownership.redis", "'redis' applies only with store: redis")
            ])
        #expect(
            errors(in: minimal + "ownership:\n  store: redis\n  redis:\n    prefix: x\n") == [
                error(line: 12, column: 5, path: "ownership.redis", "missing required key 'url'")
            ])
        #expect(
            errors(in: minimal + "ownership:\n  store: redis\n  redis:\n    urll: redis://h\n").first?.message
                == "unknown key 'urll' (did you mean 'url'?)")
    }
}
