"""Layer 4, the command line: one module per ``tpdm-rl`` subcommand (train; eval, sample and export; make-*; sweep;
config) and the docs generator. ``tpdm_rl/cli.py`` builds the parser from them and turns errors into one line."""
