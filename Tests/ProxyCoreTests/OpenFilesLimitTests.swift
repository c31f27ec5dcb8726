import ProxyCore
import Testing

@Suite("Open-file limit against limits.max_connections")
struct OpenFilesLimitTests {
    private func config(maxConnections: Int, idlePerBackend: Int, backends: Int) throws -> ProxyConfig {
        let entries = (0..<backends).map { "      - { id: b\($0), address: 127.0.0.1:\(9000 + $0) }" }.joined(separator: "\n")
        return try ConfigLoader.parse(
            yaml: """
                listeners:
                  - { name: web, port: 8080, pool: main }
                pools:
                  main:
                    backends:
                \(entries)
                limits:
                  max_connections: \(maxConnections)
                  max_idle_upstream_per_backend: \(idlePerBackend)
                """,
            file: "test.yaml")
    }

    @Test func neededCountsTwoPerConnectionThePoolsAndTheReserve() throws {
        let config = try self.config(maxConnections: 1000, idlePerBackend: 64, backends: 3)
        #expect(OpenFilesLimit.needed(for: config, loops: 2) == 2 * 1000 + 64 * 3 * 2 + OpenFilesLimit.reserve)
        #expect(OpenFilesLimit.needed(for: config, loops: 0) == 2 * 1000 + 64 * 3 + OpenFilesLimit.reserve)
        let unpooled = try self.config(maxConnections: 10, idlePerBackend: 0, backends: 1)
        #expect(OpenFilesLimit.needed(for: unpooled, loops: 4) == 20 + OpenFilesLimit.reserve)
    }

    @Test func aLimitBelowWhatIsNeededIsReportedWithWhatFits() {
        #expect(OpenFilesLimit.shortfall(limit: 5000, needed: 5000, maxConnections: 2000) == nil)
        #expect(OpenFilesLimit.shortfall(limit: 65536, needed: 5000, maxConnections: 2000) == nil)
        let warning = OpenFilesLimit.shortfall(limit: 1024, needed: 16_896, maxConnections: 8192)
        #expect(warning?.contains("the open-file limit (1024) is below the 16896 descriptors") == true)
        #expect(warning?.contains("limits.max_connections (8192)") == true)
        #expect(warning?.contains("about 384 connections fit") == true)
        #expect(warning?.contains("limits.max_connections is lowered to 384 for this run") == true)
        #expect(OpenFilesLimit.connectionsFitting(limit: 1024) == 384)
        // A limit smaller than the reserve still leaves one (max_connections cannot be 0).
        #expect(OpenFilesLimit.connectionsFitting(limit: 100) == 1)
        #expect(OpenFilesLimit.shortfall(limit: 100, needed: 300, maxConnections: 10)?.contains("about 1 connection fits") == true)
    }

    /// Raising never lowers the limit, and never goes beyond the hard limit.
    @Test func raisingKeepsWithinTheHardLimitAndNeverLowers() throws {
        let (before, after) = try #require(OpenFilesLimit.raise(to: 0))
        #expect(after == before)
        let (_, raised) = try #require(OpenFilesLimit.raise(to: Int.max))
        #expect(raised.soft == raised.hard)
        #expect(raised.soft >= before.soft)
    }
}
