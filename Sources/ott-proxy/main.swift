// Placeholder so the package resolves while the CLI is written on another branch; replace on merge.
print("ott-proxy: CLI not built on this branch yet")
