"""Below every step: labels, prompts and parsers, sampling, files, configuration and settings."""
