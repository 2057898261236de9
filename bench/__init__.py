"""mqnode benches and load tools (run from the repository root)."""
