"""`meshctl`: the operator's command line for the configuration API (apply, get, delete,
validate), in the manner of kubectl."""
