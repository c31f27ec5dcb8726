import ProxyCore

/// Every error `ConfigLoader` reports for `yaml` (as file `test.yaml`), in file order; empty when it loads.
func errors(in yaml: String) -> [ConfigError] {
    do {
        _ = try ConfigLoader.parse(yaml: yaml, file: "test.yaml")
        return []
    } catch {
        return error.errors
    }
}

/// The error expected at a position of `test.yaml`.
func error(line: Int, column: Int, path: String, _ message: String) -> ConfigError {
    ConfigError(file: "test.yaml", line: line, column: column, path: path, message: message)
}

/// The smallest valid file: one listener, one pool `rooms` with one backend (ends at line 9, so a test appending
/// sections knows their line numbers).
let minimal = """
    listeners:
      - port: 8080
        pool: rooms
    pools:
      rooms:
        backends:
          - id: a
            address: 127.0.0.1:9001

    """
