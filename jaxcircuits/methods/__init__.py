"""Methods: DLA, folding, attribution, circuits, learned masks, weight space."""
