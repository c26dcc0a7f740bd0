"""What every process of the server shares: addresses, sockets, the role prologue, logs."""
