"""One pure validator per kind (sans-IO), built on `nodeagent.config.schema`."""
