"""The run engine: patched fast paths, chunked batches, sweeps, subset families, memory."""
