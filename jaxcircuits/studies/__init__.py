"""End-to-end studies behind the experiment binaries (each writes a report directory)."""
