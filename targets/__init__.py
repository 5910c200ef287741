"""Target profiles (TOML data files) shipped with edgepack; loaded by packager.plan.targets."""
