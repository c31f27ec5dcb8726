/// One problem found in a configuration file, located precisely enough for an editor to jump to it.
public struct ConfigError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The file name as given to the loader.
    public var file: String
    /// 1-based; 0 when the problem is with the file as a whole (e.g. it cannot be read).
    public var line: Int
    /// 1-based, counted in Unicode scalars; 0 when the problem is with the file as a whole.
    public var column: Int
    /// The key path of the offending value, e.g. `pools.rooms.backends[0].weight`; empty for the document root.
    public var path: String
    public var message: String

    public init(file: String, line: Int, column: Int, path: String, message: String) {
        self.file = file
        self.line = line
        self.column = column
        self.path = path
        self.message = message
    }

    /// `file:line:column: path: message`, the format compilers use, so editors and CI annotate the right line.
    public var description: String {
        if self.path.isEmpty {
            return "\(self.file):\(self.line):\(self.column): \(self.message)"
        }
        return "\(self.file):\(self.line):\(self.column): \(self.path): \(self.message)"
    }
}

/// Every problem found in a configuration file, in file order; never empty when thrown.
public struct ConfigErrors: Error, Sendable, CustomStringConvertible {
    public var errors: [ConfigError]

    public init(errors: [ConfigError]) {
        self.errors = errors
    }

    /// One error per line.
    public var description: String {
        self.errors.map(\.description).joined(separator: "\n")
    }
}
