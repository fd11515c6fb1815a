"""One module per `synthpert` subcommand of the workflow; a step never imports another."""
