"""What every loratune service shares: bootstrap, config, logging, errors, metrics, auth."""
