"""The web console: a read-only page of studies and trials, fed by the optimizer."""
