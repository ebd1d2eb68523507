"""pfa_fx's test suite (a regular package, so that a top-level ``tests`` package some
third-party distribution installs cannot shadow it)."""
