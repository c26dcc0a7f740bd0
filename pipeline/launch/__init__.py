"""Starting the roles: all of them under one supervisor (`lipsync serve`), or one as its
own process (`lipsync role`, what a systemd unit runs)."""
