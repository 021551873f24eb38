"""Results: the results.json record of a run, experiment trackers, and the comparison table and plots."""
