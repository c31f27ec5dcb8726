/// The placement strategies a keyed decision may name (`place = "..."` in a script).
///
/// The names are exactly the raw values of `PlacementStrategyKind`, whose implementations are in `Placement`.
/// Until the ownership directory uses them, every name places by rendezvous hashing over the pool, so all proxies
/// agree on a key's backend without talking to each other.
public enum PlacementStrategy {
    public static let names: Set<String> = Set(PlacementStrategyKind.allCases.map(\.rawValue))

    /// The strategy with this name, nil for an unknown one.
    public static func kind(named name: String) -> PlacementStrategyKind? {
        PlacementStrategyKind(rawValue: name)
    }
}
