"""Rails: checks on what reaches a model and what it answers, for the server and as an evaluation condition."""
