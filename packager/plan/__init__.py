"""Stage 3, plan: target profiles, the host probe, weight sizes and the pure planner that fits a model to a target."""
