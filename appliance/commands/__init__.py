"""Sub-commands of the appliance CLI, one module per area."""
