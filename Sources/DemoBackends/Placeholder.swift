// Replaced by the demo servers.
