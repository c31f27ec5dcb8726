import Foundation
import Yams

/// Loads a `ProxyConfig` from YAML, reporting every problem with its `file:line:column` and key path.
///
/// The tree is walked by hand rather than through `Codable` because decoding errors lose the position of the value
/// and stop at the first problem, while `ott-proxy check` must point at each one.
public enum ConfigLoader {
    /// Reads and parses the file at `path`; a file that cannot be read is one error at line 0, column 0.
    public static func load(path: String) throws(ConfigErrors) -> ProxyConfig {
        let text: String
        switch self.read(path: path) {
        case .success(let contents):
            text = contents
        case .failure(let error):
            throw ConfigErrors(errors: [error])
        }
        return try self.parse(yaml: text, file: path)
    }

    /// Parses YAML text; `file` only labels the errors.
    public static func parse(yaml: String, file: String) throws(ConfigErrors) -> ProxyConfig {
        let root: Node?
        do {
            root = try Yams.compose(yaml: yaml)
        } catch {
            throw ConfigErrors(errors: [self.syntaxError(error, yaml: yaml, file: file)])
        }
        guard let root, !root.isNull else {
            throw ConfigErrors(errors: [
                ConfigError(file: file, line: 1, column: 1, path: "", message: "configuration is empty")
            ])
        }

        let reader = NodeReader(file: file)
        let config = ConfigDecoder(reader: reader).config(root)
        guard reader.errors.isEmpty else {
            // Sections are read in schema order and cross-references last; file order is what a reader fixes by.
            let sorted = reader.errors.enumerated().sorted { a, b in
                (a.element.line, a.element.column, a.offset) < (b.element.line, b.element.column, b.offset)
            }
            throw ConfigErrors(errors: sorted.map(\.element))
        }
        return config
    }

    private static func read(path: String) -> Result<String, ConfigError> {
        func failure(_ problem: String) -> Result<String, ConfigError> {
            .failure(
                ConfigError(file: path, line: 0, column: 0, path: "", message: "cannot read '\(path)': \(problem)")
            )
        }
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) else {
            return failure("no such file")
        }
        guard !isDirectory.boolValue else {
            return failure("it is a directory")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            return failure("permission denied or I/O error")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            return failure("not valid UTF-8")
        }
        return .success(text)
    }

    private static func syntaxError(_ error: any Error, yaml: String, file: String) -> ConfigError {
        func located(_ mark: (line: Int, column: Int), _ message: String) -> ConfigError {
            ConfigError(file: file, line: mark.line, column: mark.column, path: "", message: message)
        }
        guard let error = error as? YamlError else {
            return ConfigError(file: file, line: 0, column: 0, path: "", message: "invalid YAML: \(error)")
        }
        switch error {
        case .scanner(let context, let problem, let mark, _),
            .parser(let context, let problem, let mark, _),
            .composer(let context, let problem, let mark, _):
            var message = "invalid YAML: \(problem)"
            if let context {
                message += " (\(context.text) at line \(context.mark.line), column \(context.mark.column))"
            }
            return located((mark.line, mark.column), message)
        case .duplicatedKeysInMapping(let duplicates, let context):
            // Yams points at the first occurrence; the message says so, since the later one is usually the mistake.
            let keys = duplicates.map { "'\($0)'" }.joined(separator: ", ")
            return located(
                (context.mark.line, context.mark.column),
                "invalid YAML: key \(keys) appears more than once in this mapping"
            )
        case .reader(let problem, let offset, _, _):
            let mark = offset.map { self.position(atCharacterOffset: $0, in: yaml) } ?? (0, 0)
            return located(mark, "invalid YAML: \(problem)")
        default:
            return ConfigError(file: file, line: 0, column: 0, path: "", message: "invalid YAML: \(error)")
        }
    }

    private static func position(atCharacterOffset offset: Int, in text: String) -> (line: Int, column: Int) {
        var line = 1
        var column = 1
        for character in text.prefix(offset) {
            if character == "\n" {
                line += 1
                column = 1
            } else {
                column += character.unicodeScalars.count
            }
        }
        return (line, column)
    }
}
