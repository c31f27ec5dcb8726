/// The `host:port` syntax of backend addresses.
enum HostAndPort {
    struct Problem: Error {
        var message: String
    }

    /// Splits `127.0.0.1:9001`, `backend.local:9001` or `[::1]:9001`; IPv6 hosts are returned without brackets.
    static func parse(_ text: String) -> Result<(host: String, port: Int), Problem> {
        let example = "expected host:port like 127.0.0.1:9001 or [::1]:9001, got '\(text)'"
        let host: Substring
        let portText: Substring
        if text.hasPrefix("[") {
            // Brackets are the only way to tell an IPv6 host's colons from the port separator.
            guard let close = text.firstIndex(of: "]") else { return .failure(Problem(message: example)) }
            host = text[text.index(after: text.startIndex)..<close]
            let afterHost = text[text.index(after: close)...]
            guard afterHost.first == ":" else { return .failure(Problem(message: example)) }
            portText = afterHost.dropFirst()
        } else {
            guard let colon = text.lastIndex(of: ":") else { return .failure(Problem(message: example)) }
            host = text[..<colon]
            portText = text[text.index(after: colon)...]
            if host.contains(":") {
                return .failure(Problem(message: "an IPv6 host needs brackets, like [::1]:9001, got '\(text)'"))
            }
        }
        guard !host.isEmpty, !portText.isEmpty, portText.allSatisfy(\.isASCII), let port = Int(portText) else {
            return .failure(Problem(message: example))
        }
        guard (1...65535).contains(port) else {
            return .failure(Problem(message: "port must be between 1 and 65535, got '\(text)'"))
        }
        return .success((String(host), port))
    }
}
