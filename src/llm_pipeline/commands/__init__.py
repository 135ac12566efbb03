"""CLI subcommand registrations, one module per area (argument parsing only, no logic)."""
