"""Operations at the edges: experiment tracking (MLflow behind a queue and a disk spool) and the promotion gate.
Nothing here imports mlflow at module level."""
