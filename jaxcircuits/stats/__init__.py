"""Statistics of sweeps: criteria, rates and thresholds, bootstrap, set structure, games, summary and
agreement of scores (`tables` holds the subset tables they share)."""
