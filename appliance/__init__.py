"""appliance: the CLI, daemons and orchestration; the only package that knows all the others."""
