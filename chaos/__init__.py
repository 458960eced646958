"""make chaos: fault injection and bad-input suites against a real mesh."""
