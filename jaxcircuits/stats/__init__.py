"""Statistics of sweeps: criteria, rates and thresholds, bootstrap, set structure, games."""
