"""Interventions: sites, edges, positions, sources, the metrics a patched run is read by."""
