import NIOCore
import ProxyCore
import Testing

@Suite("ConfigUnits")
struct ConfigUnitsTests {
    @Test(
        "durations with a unit",
        arguments: [
            ("5s", TimeAmount.seconds(5)),
            ("300ms", .milliseconds(300)),
            ("2m", .minutes(2)),
            ("1h", .hours(1)),
            ("1500us", .microseconds(1500)),
            ("250ns", .nanoseconds(250)),
            ("1.5s", .milliseconds(1500)),
            ("0.25ms", .microseconds(250)),
            ("0s", .zero),
            ("90m", .minutes(90)),
        ]
    )
    func parsesDuration(text: String, expected: TimeAmount) {
        #expect(ConfigUnits.parseDuration(text) == expected)
    }

    @Test(
        "durations that are rejected",
        arguments: [
            "", "5", "0", "5x", "-1s", "+1s", "s", "1.s", ".5s", "1.5", "5 s", " 5s", "5s ", "5S", "1h30m",
            "1.5ns", "99999999999h",
        ]
    )
    func rejectsDuration(text: String) {
        #expect(ConfigUnits.parseDuration(text) == nil)
    }

    @Test(
        "sizes",
        arguments: [
            ("512B", 512),
            ("64KiB", 64 * 1024),
            ("1MiB", 1024 * 1024),
            ("2GiB", 2 * 1024 * 1024 * 1024),
            ("10KB", 10_000),
            ("1MB", 1_000_000),
            ("3GB", 3_000_000_000),
            ("4096", 4096),
            ("0", 0),
            ("0B", 0),
        ]
    )
    func parsesSize(text: String, expected: Int) {
        #expect(ConfigUnits.parseSize(text) == expected)
    }

    @Test(
        "sizes that are rejected",
        arguments: [
            "", "5x", "-1", "-1KiB", "1.5MiB", "KiB", "64 KiB", "64kib", "64K", "1TiB", "99999999999999999999",
            "9999999999GiB",
        ]
    )
    func rejectsSize(text: String) {
        #expect(ConfigUnits.parseSize(text) == nil)
    }
}
