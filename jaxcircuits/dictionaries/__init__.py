"""Sparse feature dictionaries (SAEs, transcoders): their math (`core`), files, splicing, training."""
