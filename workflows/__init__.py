"""The drivers, which read like the method: each one is the order of its stages on the stage engine
(wmss.workflow). `wmss_pipeline` is `wmss run`, `tune` is `wmss tune`; the CLI's command table names them,
and no library module imports from them."""
