import NIOCore

/// The unit syntax of durations and sizes in configuration files (see "Durations and sizes" in
/// `docs/configuration.md`).
///
/// Both parsers are strict: they return `nil` rather than guess, so that a typo such as `5` (five what?) or
/// `5x` becomes an error in `ott-proxy check` instead of a surprising value at run time.
public enum ConfigUnits {
    private static let durationUnits: [(suffix: String, nanoseconds: Int64)] = [
        ("ns", 1),
        ("us", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60 * 1_000_000_000),
        ("h", 3_600 * 1_000_000_000),
    ]

    private static let sizeUnits: [(suffix: String, bytes: Int)] = [
        ("B", 1),
        ("KB", 1_000),
        ("MB", 1_000_000),
        ("GB", 1_000_000_000),
        ("KiB", 1 << 10),
        ("MiB", 1 << 20),
        ("GiB", 1 << 30),
    ]

    /// Parses a non-negative decimal number followed by a unit: `ns`, `us`, `ms`, `s`, `m` or `h`.
    ///
    /// A fraction is allowed (`1.5s`) as long as the result is a whole number of nanoseconds. A unit is required
    /// even for zero (`0s`), since a bare number is ambiguous between seconds and milliseconds.
    public static func parseDuration(_ s: String) -> TimeAmount? {
        guard let (number, suffix) = self.splitNumber(s),
            let unit = self.durationUnits.first(where: { $0.suffix == suffix }),
            let nanoseconds = number.scaled(by: unit.nanoseconds)
        else {
            return nil
        }
        return .nanoseconds(nanoseconds)
    }

    /// Parses a byte count: a plain integer (bytes) or an integer followed by `B`, `KB`, `MB`, `GB` (powers of
    /// 1000) or `KiB`, `MiB`, `GiB` (powers of 1024).
    public static func parseSize(_ s: String) -> Int? {
        guard let (number, suffix) = self.splitNumber(s), number.fractionDigits.isEmpty else {
            return nil
        }
        let multiplier: Int
        if suffix.isEmpty {
            multiplier = 1
        } else if let unit = self.sizeUnits.first(where: { $0.suffix == suffix }) {
            multiplier = unit.bytes
        } else {
            return nil
        }
        return number.scaled(by: Int64(multiplier)).flatMap { Int(exactly: $0) }
    }

    /// Splits `12.5ms` into the number `12.5` and the suffix `ms`; `nil` when there is no well-formed number.
    private static func splitNumber(_ s: String) -> (DecimalNumber, Substring)? {
        let digitsEnd = s.firstIndex { !$0.isASCIIDigit } ?? s.endIndex
        let integerDigits = s[..<digitsEnd]
        guard !integerDigits.isEmpty else { return nil }

        var fractionDigits: Substring = ""
        var rest = s[digitsEnd...]
        if rest.first == "." {
            let afterDot = rest.dropFirst()
            let fractionEnd = afterDot.firstIndex { !$0.isASCIIDigit } ?? afterDot.endIndex
            fractionDigits = afterDot[..<fractionEnd]
            guard !fractionDigits.isEmpty else { return nil }
            rest = afterDot[fractionEnd...]
        }
        return (DecimalNumber(integerDigits: integerDigits, fractionDigits: fractionDigits), rest)
    }
}

/// A non-negative decimal number kept as its digits, so that `1.5s` converts to nanoseconds without floating point
/// rounding.
private struct DecimalNumber {
    var integerDigits: Substring
    var fractionDigits: Substring

    /// `self × multiplier`, or `nil` on overflow or when the result is not a whole number.
    func scaled(by multiplier: Int64) -> Int64? {
        guard let integer = Int64(self.integerDigits) else { return nil }
        let (whole, overflow) = integer.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { return nil }
        guard !self.fractionDigits.isEmpty else { return whole }

        // Beyond 18 digits the denominator would overflow; no unit needs that precision.
        guard self.fractionDigits.count <= 18, let fraction = Int64(self.fractionDigits) else { return nil }
        var denominator: Int64 = 1
        for _ in 0..<self.fractionDigits.count { denominator *= 10 }
        let (scaledFraction, fractionOverflow) = fraction.multipliedReportingOverflow(by: multiplier)
        guard !fractionOverflow, scaledFraction % denominator == 0 else { return nil }
        let (total, totalOverflow) = whole.addingReportingOverflow(scaledFraction / denominator)
        return totalOverflow ? nil : total
    }
}

extension Character {
    fileprivate var isASCIIDigit: Bool { ("0"..."9").contains(self) }
}
