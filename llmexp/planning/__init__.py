"""Will it fit, will it run: the plan of a composed config, in pure Python (no torch)."""
