"""The drivers, which read like the method: each one is the order of its stages on the stage engine
(wmss.workflow). `wmss_pipeline` is `wmss run`, `tune` is `wmss tune`. Library code (wmss/) never imports them."""
