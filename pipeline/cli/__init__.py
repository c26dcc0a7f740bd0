"""The `lipsync` command: one module per subcommand family, registered by cli/main.py."""
