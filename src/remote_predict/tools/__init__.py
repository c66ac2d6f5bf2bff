"""Command-line tools: exporters, demo, and the production tooling."""
