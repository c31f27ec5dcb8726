// Placeholder so the package resolves while the demo backends are written on another branch; delete on merge.
enum DemoBackendsPlaceholder {}
