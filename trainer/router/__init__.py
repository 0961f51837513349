"""The mixture router's training and the `ensemble-train router` command (the router itself is shared: it is served)."""
