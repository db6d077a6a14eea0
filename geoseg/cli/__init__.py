"""Command-line interface: ``geoseg <command>``; one module per command."""
