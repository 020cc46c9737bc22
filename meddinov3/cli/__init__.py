"""Command line interface (`meddinov3 VERB ...`)."""
