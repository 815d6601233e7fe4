"""MLflow at the edges: the store, the run, the registry. Records outputs; decides none of them."""
