"""Models that ship inside fastbon."""
