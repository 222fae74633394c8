"""Statistics of sweeps: criteria, rates and thresholds, bootstrap, set structure, games, summary
(`tables` holds the subset tables they share)."""
