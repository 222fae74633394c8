"""End-to-end studies behind the experiment binaries (each writes a report directory), built on
the kit (`kit.py`: tasks as patching problems, scans, options as flags); no study imports another."""
