"""One module per subcommand; `options.py` holds the flags several commands share."""
