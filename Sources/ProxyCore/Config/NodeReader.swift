import Foundation
import NIOCore
import Yams

/// A YAML mapping whose keys were checked against the keys its section allows.
struct Section {
    /// Key path of the mapping itself ("" for the document root).
    var path: String
    /// Where the mapping starts: missing keys are reported here, since they have no position of their own.
    var mark: Mark?
    var values: [String: Node]

    func path(of key: String) -> String {
        self.path.isEmpty ? key : "\(self.path).\(key)"
    }
}

/// Reads typed values out of a composed YAML tree and records every problem instead of stopping at the first, so
/// that one run of `ott-proxy check` shows everything that needs fixing.
///
/// Each reader returns `nil` after reporting an error; callers fall back to a default or skip the value and carry on.
final class NodeReader {
    let file: String
    private(set) var errors: [ConfigError] = []

    init(file: String) {
        self.file = file
    }

    func report(_ message: String, at mark: Mark?, path: String) {
        self.errors.append(
            ConfigError(file: self.file, line: mark?.line ?? 0, column: mark?.column ?? 0, path: path, message: message)
        )
    }

    // MARK: Containers

    /// A mapping with a fixed set of keys; an empty value stands for an empty mapping.
    func section(_ node: Node, path: String, keys: [String]) -> Section? {
        if node.isNull {
            return Section(path: path, mark: node.mark, values: [:])
        }
        guard let mapping = node.mapping else {
            self.report("expected a mapping of keys to values, got \(node.summary)", at: node.mark, path: path)
            return nil
        }
        var section = Section(path: path, mark: node.mark, values: [:])
        for (keyNode, value) in mapping {
            guard let key = self.key(keyNode, path: path) else { continue }
            guard keys.contains(key) else {
                self.report(Self.unknownKeyMessage(key, allowed: keys), at: keyNode.mark, path: section.path(of: key))
                continue
            }
            section.values[key] = value
        }
        return section
    }

    /// A mapping whose keys are names chosen by the user (e.g. pool names), in declaration order.
    func namedEntries(_ node: Node, path: String) -> [(name: String, keyNode: Node, value: Node)]? {
        if node.isNull {
            return []
        }
        guard let mapping = node.mapping else {
            self.report("expected a mapping of names to values, got \(node.summary)", at: node.mark, path: path)
            return nil
        }
        return mapping.compactMap { keyNode, value in
            self.key(keyNode, path: path).map { (name: $0, keyNode: keyNode, value: value) }
        }
    }

    /// A sequence; an empty value stands for an empty list.
    func list(_ node: Node, path: String) -> [Node]? {
        if node.isNull {
            return []
        }
        guard let sequence = node.sequence else {
            self.report("expected a list, got \(node.summary)", at: node.mark, path: path)
            return nil
        }
        return Array(sequence)
    }

    private func key(_ node: Node, path: String) -> String? {
        guard let scalar = node.scalar, !node.isNull else {
            self.report("expected a plain string as key, got \(node.summary)", at: node.mark, path: path)
            return nil
        }
        return scalar.string
    }

    /// A path from the file, made absolute against the configuration file's directory (as nginx does with its prefix).
    func resolvePath(_ path: String) -> String {
        if path.hasPrefix("/") { return path }
        let directory = URL(fileURLWithPath: self.file).deletingLastPathComponent()
        return directory.appendingPathComponent(path).standardizedFileURL.path
    }

    // MARK: Keys of a section

    func optional<T>(_ section: Section, _ key: String, _ read: (Node, String) -> T?) -> T? {
        guard let node = section.values[key] else { return nil }
        return read(node, section.path(of: key))
    }

    func required<T>(_ section: Section, _ key: String, _ read: (Node, String) -> T?) -> T? {
        guard let node = section.values[key] else {
            self.report("missing required key '\(key)'", at: section.mark, path: section.path)
            return nil
        }
        return read(node, section.path(of: key))
    }

    // MARK: Scalars

    /// Any non-empty scalar, whatever YAML would resolve it to: `region: no` means the string "no".
    func string(_ node: Node, path: String) -> String? {
        guard let scalar = node.scalar, !node.isNull else {
            self.report("expected a string, got \(node.summary)", at: node.mark, path: path)
            return nil
        }
        guard !scalar.string.isEmpty else {
            self.report("must not be empty", at: node.mark, path: path)
            return nil
        }
        return scalar.string
    }

    func int(_ node: Node, path: String, min: Int, max: Int = .max) -> Int? {
        guard node.hasTag(.int), let value = node.int else {
            self.report("expected an integer, got \(node.summary)", at: node.mark, path: path)
            return nil
        }
        guard value >= min, value <= max else {
            let range = max == .max ? "at least \(min)" : "between \(min) and \(max)"
            self.report("must be \(range), got \(value)", at: node.mark, path: path)
            return nil
        }
        return value
    }

    func bool(_ node: Node, path: String) -> Bool? {
        guard node.hasTag(.bool), let value = node.bool else {
            self.report("expected true or false, got \(node.summary)", at: node.mark, path: path)
            return nil
        }
        return value
    }

    func duration(_ node: Node, path: String, allowZero: Bool) -> TimeAmount? {
        guard let text = node.plainText, let value = ConfigUnits.parseDuration(text) else {
            self.report("expected a duration like 5s or 300ms, got \(node.summary)", at: node.mark, path: path)
            return nil
        }
        guard allowZero || value > .zero else {
            self.report("must be greater than 0s, got \(node.summary)", at: node.mark, path: path)
            return nil
        }
        return value
    }

    func size(_ node: Node, path: String, min: Int, max: Int = .max) -> Int? {
        guard let text = node.plainText, let value = ConfigUnits.parseSize(text) else {
            self.report("expected a size like 64KiB or 1MiB, got \(node.summary)", at: node.mark, path: path)
            return nil
        }
        guard value >= min, value <= max else {
            let range: String
            if max == .max {
                range = "at least \(Self.sizeText(min))"
            } else {
                range = "between \(Self.sizeText(min)) and \(Self.sizeText(max))"
            }
            self.report("must be \(range), got \(node.summary)", at: node.mark, path: path)
            return nil
        }
        return value
    }

    func choice<Value: RawRepresentable<String> & CaseIterable>(
        _ node: Node,
        path: String,
        of _: Value.Type
    ) -> Value? {
        let allowed = Value.allCases.map(\.rawValue)
        guard let text = node.plainText, let value = Value(rawValue: text) else {
            var message = "expected one of \(allowed.joined(separator: ", ")), got \(node.summary)"
            if let text = node.plainText, let suggestion = Self.closest(to: text, in: allowed) {
                message += " (did you mean '\(suggestion)'?)"
            }
            self.report(message, at: node.mark, path: path)
            return nil
        }
        return value
    }

    // MARK: Messages

    private static func unknownKeyMessage(_ key: String, allowed: [String]) -> String {
        if let suggestion = self.closest(to: key, in: allowed) {
            return "unknown key '\(key)' (did you mean '\(suggestion)'?)"
        }
        return "unknown key '\(key)' (expected one of: \(allowed.joined(separator: ", ")))"
    }

    /// The candidate nearest to `word`, if near enough to be a plausible typo rather than a different word.
    static func closest(to word: String, in candidates: [String]) -> String? {
        let normalized = word.lowercased()
        var best: (candidate: String, distance: Int)?
        for candidate in candidates {
            let distance = self.editDistance(normalized, candidate.lowercased())
            let tolerance = Swift.max(1, Swift.min(3, candidate.count / 3))
            if distance <= tolerance, distance < (best?.distance ?? .max) {
                best = (candidate, distance)
            }
        }
        return best?.candidate
    }

    /// Levenshtein distance: insertions, deletions and substitutions each cost 1.
    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a)
        let b = Array(b)
        guard !a.isEmpty else { return b.count }
        guard !b.isEmpty else { return a.count }
        var previous = Array(0...b.count)
        var current = Array(repeating: 0, count: b.count + 1)
        for i in 1...a.count {
            current[0] = i
            for j in 1...b.count {
                let substitution = previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)
                current[j] = Swift.min(previous[j] + 1, current[j - 1] + 1, substitution)
            }
            swap(&previous, &current)
        }
        return previous[b.count]
    }

    /// A byte count in the largest binary unit that divides it, so limits print as they are usually written.
    private static func sizeText(_ bytes: Int) -> String {
        for (suffix, unit) in [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if bytes != 0, bytes.isMultiple(of: unit) {
                return "\(bytes / unit)\(suffix)"
            }
        }
        return "\(bytes)B"
    }
}

extension Node {
    var isNull: Bool {
        self.scalar != nil && self.hasTag(.null)
    }

    /// The tag YAML resolves the node to (a plain `8080` is an int, a quoted `"8080"` a string).
    func hasTag(_ name: Tag.Name) -> Bool {
        self.tag.rawValue == name.rawValue
    }

    /// The text of a non-empty scalar, for values such as durations whose syntax is checked separately.
    var plainText: String? {
        guard let scalar = self.scalar, !self.isNull else { return nil }
        return scalar.string
    }

    /// How a value is quoted back in error messages.
    var summary: String {
        switch self {
        case .scalar(let scalar):
            return self.isNull ? "an empty value" : "'\(scalar.string)'"
        case .mapping:
            return "a mapping"
        case .sequence:
            return "a list"
        case .alias:
            return "an alias"
        }
    }
}
