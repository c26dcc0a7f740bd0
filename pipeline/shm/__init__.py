"""The only code that creates, maps and unlinks shared memory."""
