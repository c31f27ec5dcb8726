/// The placement strategies a keyed decision may name (`place = "..."` in a script).
///
/// The ownership directory implements them; until it does, every name places by rendezvous hashing over the pool,
/// so all proxies agree on a key's backend without talking to each other.
public enum PlacementStrategy {
    public static let names: Set<String> = [
        "least-keys", "least-connections", "power-of-two-choices", "random", "weighted-round-robin",
        "rendezvous", "ketama", "maglev", "jump", "bounded-load",
    ]
}
