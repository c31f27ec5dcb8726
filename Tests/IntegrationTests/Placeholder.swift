// Placeholder so the package resolves while integration tests are written on another branch; delete on merge.
enum IntegrationTestsPlaceholder {}
