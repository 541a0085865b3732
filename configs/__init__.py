"""The shipped workflow configs, installed as the package `wmss.configs` (see wmss.config.config_file)."""
