extension ProxyServer {
    /// Installs the backends DNS discovery found for `pool` (replacing what it found before) as a new generation,
    /// through the same path as `reload(_:)` but with the configuration in force, so no file is read again.
    ///
    /// Backends that keep their id keep their health state; those no longer found become `removed`. Fails like a
    /// reload does (e.g. while another reload is in progress); the discovered set is kept either way and is part of
    /// the next generation built.
    @discardableResult
    public func applyDiscovered(pool: String, backends: [BackendConfig]) async -> Result<Int, ReloadError> {
        self.backendServices.registry.setDiscovered(pool: pool, backends: backends)
        return await self.reload(self.runtime.config)
    }

    /// Health state across generations, by backend id.
    public var backendRegistry: BackendRegistry { self.backendServices.registry }
}

extension Result {
    var isSuccess: Bool {
        if case .success = self { return true }
        return false
    }
}
